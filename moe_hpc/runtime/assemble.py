"""The engine's parts, made in the order a run needs them: ``wire`` (communicators' collectives,
the exchange, the attention core: collective), ``load_weights`` (what this rank's roles read,
prepared by ``model.weights.prepare_block``), then ``assemble`` (block objects, the MoE layer,
the stage links) -> an ``Engine`` that only composes them.  The bench fills ``RankWeights``
with random weights and assembles the same engine.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..comm.exchange import Exchange
from ..comm.failure import collective
from ..comm.groups import make_group
from ..comm.stages import StageLink
from ..comm.transports import make_transport
from ..config.roles import stage_blocks
from ..device.dtypes import BF16
from ..device.kernels import set_expert_gemm_carveout
from ..model.attention import choose_attention, fuse_qkv
from ..model.blocks import AttentionBlock, Embedding, MlpBlock, OutputHead
from ..model.dense_tp import local_model, shard_dense_layer
from ..model.experts import LocalExperts
from ..model.weights import prepare_block
from ..moe.dispatch import RouteTables, route_tables
from ..moe.layer import MoeLayer
from ..moe.router import run_step
from .engine import Engine, PhaseTimes


@dataclass
class Wiring:
    """What is made before any weight: the exchange and the groups' collectives (device ones on
    GPUs), and the attention core all ranks agreed on (flash: the fused core or None)."""
    exchange: Exchange
    tp_group: object
    dense_group: object
    flash: object
    attention_core: str


def wire(cfg, topo, backend) -> Wiring:
    """Collective over the world (the attention choice is agreed on by every rank)."""
    m = cfg.model
    # a transport the run cannot have (ipc on the CPU, across nodes) is refused on every rank: one error line
    transport = collective(topo.world, make_transport, cfg.run.transport, topo.exchange, m.hidden_size, backend,
                           cfg.run.cuda_aware_mpi)
    exchange = Exchange(topo.exchange, m.hidden_size, backend, transport)
    tp_group = None if topo.tp is None else make_group(topo.tp, backend)
    dense_group = None if topo.dense_tp_comm is None else make_group(topo.dense_tp_comm, backend)
    # only ranks that attend hold cuDNN's handle and workspace; all ranks agree on the outcome
    # (run.attention = cudnn without cuDNN fails on the dense ranks alone: everyone must stop)
    flash, core = collective(topo.world, lambda: choose_attention(cfg.run.attention, backend, topo.rank == 0)
                             if topo.is_dense else (None, "tiles"))
    set_expert_gemm_carveout(cfg.run.expert_gemm_carveout if topo.exchange.Get_size() > 1 else 0, backend.xp)
    return Wiring(exchange, tp_group, dense_group, flash, core)


@dataclass
class RankWeights:
    """This rank's weights on the device: its stage's blocks (model.weights.BlockWeights), every
    expert's output bias [M*E, H] (dense ranks), the globals it needs, and its hosted experts."""
    blocks: dict = field(default_factory=dict)
    expert_b2: object = None
    final_norm: object = None
    embed: object = None
    lm_head: object = None
    experts: LocalExperts | None = None


def stage_of(cfg, topo) -> tuple[int, range]:
    """This rank's pipeline stage and its blocks (no blocks on expert-only ranks)."""
    if not topo.is_dense:
        return 0, range(0)
    return topo.stage, stage_blocks(cfg.model.num_layers, topo.roles.dense_stages)[topo.stage]


def load_weights(cfg, topo, placement, backend, wiring: Wiring, ckpt, head: bool = False) -> RankWeights:
    """Read what this rank's roles need (collective-safe: raises InputError on bad data); ``head``:
    the last stage also needs the LM head (generation), whatever run.logits and run.logprobs say."""
    m, dtype, put = cfg.model, backend.weight_dtype, backend.asarray
    out = RankWeights(experts=LocalExperts(m.ffn_kind, backend.xp))
    if topo.is_dense:
        stage, blocks = stage_of(cfg, topo)
        dense_tp = topo.roles.dense_tp
        rank = topo.dense_tp_comm.Get_rank() if topo.dense_tp_comm is not None else 0
        shard = (lambda b: shard_dense_layer(b, m, dense_tp, rank)) if wiring.dense_group is not None else \
            (lambda b: b)
        fuse = (lambda a: fuse_qkv(a, backend.xp)) if wiring.flash is not None else (lambda a: a)
        b2s = []
        for layer in range(m.num_layers):
            if m.is_moe(layer):   # the experts' output biases are added at the combine
                b2 = ckpt.read_expert_b2(layer, dtype)
                b2s.append(np.zeros((m.num_experts, m.hidden_size), dtype) if b2 is None else b2)
            if layer in blocks:
                out.blocks[layer] = prepare_block(ckpt.read_dense_layer(layer, dtype), shard, put, fuse)
        out.expert_b2 = put(np.concatenate(b2s)) if b2s else None
        _load_globals(cfg, stage, topo.roles.dense_stages, ckpt, out, put, dtype, head)
    if topo.is_expert and m.num_moe_layers:
        _load_experts(cfg, topo, placement, ckpt, out.experts, put, dtype)
    return out


def _load_globals(cfg, stage: int, stages: int, ckpt, out: RankWeights, put, dtype, head: bool) -> None:
    m, last = cfg.model, stage == stages - 1
    if last:
        out.final_norm = put(ckpt.read_global("final_norm", dtype))
    if m.vocab_size and stage == 0:
        out.embed = put(ckpt.read_global("embed", BF16))
    if m.vocab_size and (cfg.run.logits or cfg.run.logprobs or head) and last:
        out.lm_head = put(ckpt.read_global("lm_head", dtype))


def _load_experts(cfg, topo, placement, ckpt, experts: LocalExperts, put, dtype) -> None:
    m = cfg.model
    for f in placement.hosted()[topo.expert_slot]:
        layer, e = divmod(f, m.num_experts)
        x = ckpt.read_expert(layer + m.first_dense_layers, e, dtype, topo.tp_rank, topo.expert_tp)
        x.w1, x.w2 = put(x.w1), put(x.w2)
        x.b1 = None if x.b1 is None else put(x.b1)
        x.b2 = None      # added at the combine, from the dense ranks' copy
        experts.add(f, x)
    experts.stack()


def _tables(placement, topo, backend, model) -> RouteTables:
    t = route_tables(placement, topo.slot_leaders) if model.num_moe_layers else RouteTables(
        np.zeros((0, 1), np.int64), np.zeros(0, np.int64), np.zeros((0, 1), np.int64), 1)
    return RouteTables(backend.asarray(t.holders), backend.asarray(t.replicas), backend.asarray(t.slot), t.num_slots)


def assemble(cfg, topo, backend, placement, wiring: Wiring, weights: RankWeights, *, balancer=None, trace=None,
             hook=run_step) -> Engine:
    """The engine of this rank: its blocks over ``weights``, its MoE layer and stage links."""
    m, xp, times = cfg.model, backend.xp, PhaseTimes()
    stage, blocks = stage_of(cfg, topo)
    group = wiring.dense_group
    reduce = None if group is None else group.allreduce_sum
    local = local_model(m, topo.roles.dense_tp) if topo.roles.dense_tp > 1 else m
    attention = {layer: AttentionBlock(w.attention, m, local, cfg.run.attention_block, xp, reduce, wiring.flash)
                 for layer, w in weights.blocks.items()}
    mlps = {layer: MlpBlock(w.mlp, m.ffn_kind, xp, reduce) for layer, w in weights.blocks.items() if w.mlp}
    gates = {layer: w.gate for layer, w in weights.blocks.items() if w.gate is not None}
    moe = MoeLayer(m, cfg.run.micro_batch_tokens, gates, weights.expert_b2, wiring.exchange, topo.world,
                   _tables(placement, topo, backend, m), weights.experts, backend, times, balancer=balancer,
                   trace=trace, tp=topo.tp, tp_group=wiring.tp_group, dense_group=group,
                   dense_leader=topo.dense_tp_comm is None or topo.dense_tp_comm.Get_rank() == 0, hook=hook)
    stages = topo.roles.dense_stages
    link = None
    if topo.is_dense and stages > 1:
        link = StageLink(topo.group, topo.stage_peer(stage - 1) if stage > 0 else None,
                         topo.stage_peer(stage + 1) if stage < stages - 1 else None, backend)
    embedding = Embedding(weights.embed, xp) if weights.embed is not None else None
    head = OutputHead(weights.final_norm, weights.lm_head, m, backend) if weights.final_norm is not None else None
    return Engine(cfg, topo, backend, placement, wiring, attention=attention, mlps=mlps, moe=moe,
                  embedding=embedding, head=head, link=link, blocks=blocks, times=times)


__all__ = ["Wiring", "wire", "RankWeights", "load_weights", "assemble", "stage_of"]
