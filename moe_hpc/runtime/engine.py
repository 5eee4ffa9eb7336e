"""One rank's share of the model and its forward pass over a chunk of sequences.

Blocks run in order for each wave of sequences. With ``run.pipeline_waves = p > 1`` a chunk's
sequences are cut into p waves that enter the stack one step apart: at step s wave w is at
block s - w, so one MoE exchange step (``moe/block.py``) carries tokens of up to p blocks and, with
the per-layer-disjoint placement, up to p blocks' expert ranks compute at once instead of one.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from ..comm.exchange import Exchange
from ..comm.failure import collective
from ..comm.groups import make_group
from ..comm.topology import Topology
from ..comm.transports import make_transport
from ..config.roles import stage_blocks
from ..config.run_config import Config
from ..device.backend import Backend, matmul_bf16, words
from ..device.dtypes import BF16, F32
from ..device.kernels import add_rmsnorm, add_rows, set_expert_gemm_carveout, take_rows
from ..files.checkpoint import Checkpoint, DenseLayer, fuse_gate_up
from ..model.attention import attention, choose_attention, fuse_qkv
from ..model.dense_tp import local_model, shard_dense_layer
from ..model.experts import LocalExperts
from ..model.layers import mlp, shared_expert, token_logprobs
from ..moe.block import MoeBlock
from ..moe.dispatch import RouteTables, route_tables
from ..moe.gate import Router
from ..placement.table import Placement


@dataclass
class PhaseTimes:
    """Wall seconds per phase on this rank: attention, dense_mlp, gating, exchange, experts,
    final_norm (timed here) and io (timed by the runner); the summary gives mean and max over ranks.
    On the GPU these are host times of asynchronous work: a phase absorbs waits for earlier ones,
    unless ``sync`` (the device's synchronise, set by the bench for one profiled call) makes each
    phase wait for its own work: then they are GPU times, at the cost of the overlap."""
    seconds: dict = field(default_factory=lambda: defaultdict(float))
    sync: object = None
    chunk_ends: list = field(default_factory=list)   # perf_counter at each chunk's end (the runner's)

    def add(self, phase: str, t0: float) -> float:
        if self.sync is not None:
            self.sync()
        now = time.perf_counter()
        self.seconds[phase] += now - t0
        return now


def zero_rows(a, rows) -> None:
    words(a)[rows] = 0


class Engine:
    """One rank's share of the model: dense weights if it owns sequences, experts if it hosts
    any, and the MoE block that joins them (its router is where the runner attaches a balancer
    and a trace recorder)."""

    def __init__(self, cfg: Config, topo: Topology, backend: Backend, placement: Placement):
        self.cfg, self.topo, self.backend, self.xp = cfg, topo, backend, backend.xp
        self.placement = placement
        m = cfg.model
        self.dense: dict[int, DenseLayer] = {}
        self.globals: dict[str, np.ndarray] = {}
        self.local_experts = LocalExperts(m.ffn_kind, self.xp)
        set_expert_gemm_carveout(cfg.run.expert_gemm_carveout if topo.exchange.Get_size() > 1 else 0, self.xp)
        transport = make_transport(cfg.run.transport, topo.exchange, m.hidden_size, backend, cfg.run.cuda_aware_mpi)
        self.exchange = Exchange(topo.exchange, m.hidden_size, backend, transport)
        self.times = PhaseTimes()
        t = route_tables(placement, topo.slot_leaders) if m.num_moe_layers else RouteTables(
            np.zeros((0, 1), np.int64), np.zeros(0, np.int64), np.zeros((0, 1), np.int64), 1)
        tables = RouteTables(backend.asarray(t.holders), backend.asarray(t.replicas),
                             backend.asarray(t.slot), t.num_slots)
        self.router = Router(m, cfg.run.micro_batch_tokens, self.dense, backend, topo.world)
        self.tp_group = None if topo.tp is None else make_group(topo.tp, backend)
        # dense tensor parallelism: this member's heads and columns, and its group's collectives
        T = topo.roles.dense_tp
        self.dense_group = None if topo.dense_tp_comm is None else make_group(topo.dense_tp_comm, backend)
        self.dense_rank = topo.dense_tp_comm.Get_rank() if topo.dense_tp_comm is not None else 0
        self.attn_model = local_model(m, T) if T > 1 else m
        self.reduce = None if self.dense_group is None else self.dense_group.allreduce_sum
        # pipeline stages: this dense rank's blocks, and where its activations come from / go to
        P = topo.roles.dense_stages
        self.stage = topo.stage if topo.is_dense else 0
        self.blocks = stage_blocks(m.num_layers, P)[self.stage] if topo.is_dense else range(0)
        self.first_stage, self.last_stage = self.stage == 0, self.stage == P - 1
        # only ranks that attend hold cuDNN's handle and workspace; all ranks agree on the outcome
        # (run.attention = cudnn without cuDNN fails on the dense ranks alone: everyone must stop)
        self.flash, self.attention_core = collective(
            topo.world, lambda: choose_attention(cfg.run.attention, backend, topo.rank == 0)
            if topo.is_dense else (None, "tiles"))
        self.moe = MoeBlock(m, cfg.run.micro_batch_tokens, self.router, self.exchange, topo.exchange, tables,
                            self.local_experts, backend, self.times, topo.tp, self.tp_group)

    # ------------------------------------------------------------------ weights
    def load(self, ckpt: Checkpoint) -> None:
        """Read what this rank's roles need (collective-safe: raises InputError on bad data)."""
        dtype = self.backend.weight_dtype
        put = self.backend.asarray
        m = self.cfg.model
        if self.topo.is_dense:
            b2s = []
            for layer in range(m.num_layers):
                if m.is_moe(layer):   # the experts' output biases are added at the combine
                    b2 = ckpt.read_expert_b2(layer, dtype)
                    b2s.append(np.zeros((m.num_experts, m.hidden_size), dtype) if b2 is None else b2)
                if layer not in self.blocks:                   # another stage's block
                    continue
                d = ckpt.read_dense_layer(layer, dtype)
                if self.dense_group is not None:
                    d = shard_dense_layer(d, m, self.topo.roles.dense_tp, self.dense_rank)
                d.w1, d.w3 = fuse_gate_up(d.w1, d.w3), None     # gated: one GEMM makes gate and up
                d.shared_w1, d.shared_w3 = fuse_gate_up(d.shared_w1, d.shared_w3), None
                self.install_dense(layer, DenseLayer(**{k: None if v is None else put(v) for k, v in vars(d).items()}))
            if b2s:
                self.moe.expert_b2 = put(np.concatenate(b2s))
            if self.last_stage:
                self.globals["final_norm"] = put(ckpt.read_global("final_norm", dtype))
            if m.vocab_size and self.first_stage:
                self.globals["embed"] = put(ckpt.read_global("embed", BF16))
            if m.vocab_size and (self.cfg.run.logits or self.cfg.run.logprobs) and self.last_stage:
                self.globals["lm_head"] = put(ckpt.read_global("lm_head", dtype))
        if self.topo.is_expert and m.num_moe_layers:
            for f in self.placement.hosted()[self.topo.expert_slot]:
                layer, e = divmod(f, m.num_experts)
                x = ckpt.read_expert(layer + m.first_dense_layers, e, dtype, self.topo.tp_rank, self.topo.expert_tp)
                x.w1, x.w2 = put(x.w1), put(x.w2)
                x.b1 = None if x.b1 is None else put(x.b1)
                x.b2 = None      # added at the combine, from the dense ranks' copy
                self.local_experts.add(f, x)
            self.local_experts.stack()

    def install_dense(self, layer: int, d: DenseLayer) -> None:
        """Block ``layer``'s dense weights, already on the device (QKV fused for flash attention
        where the fused path can run the block, see ``fuse_qkv``)."""
        self.dense[layer] = fuse_qkv(d, self.xp) if self.flash is not None else d

    # ------------------------------------------------------------------ compute
    def waves(self, num_sequences: int) -> list[tuple[int, int]]:
        """Sequence ranges of the pipeline's waves (some may be empty)."""
        p = self.cfg.run.pipeline_waves
        return [(w * num_sequences // p, (w + 1) * num_sequences // p) for w in range(p)]

    def schedule(self):
        """Steps of the wavefront: for each step, the (wave, block) pairs active in it. The
        same on every rank, so all ranks agree on which steps exchange tokens."""
        p, L = self.cfg.run.pipeline_waves, self.cfg.model.num_layers
        return [[(w, s - w) for w in range(p) if 0 <= s - w < L] for s in range(L + p - 1)]

    def forward_chunk(self, inputs, lengths: np.ndarray, first_seq: int, seq_len: int | None = None):
        """inputs: [s, L, H] bf16 hidden or [s, L] int tokens (the first stage; None on later
        stages, whose activations arrive from the stage before: ``seq_len`` gives L then) ->
        (hidden [s, L, H] bf16 with padding zeroed, logits [s, L, V] bf16 or None) on the last
        stage, (None, None) on the others. Dense ranks only."""
        xp, m = self.xp, self.cfg.model
        if inputs is None:
            x = xp.zeros((len(lengths), seq_len, m.hidden_size), BF16)
        elif inputs.ndim == 2:
            x = take_rows(self.globals["embed"], xp.asarray(inputs.reshape(-1))).reshape(*inputs.shape, m.hidden_size)
        else:
            x = xp.asarray(inputs)
        s, L, H = x.shape
        valid = np.arange(L)[None, :] < lengths[:, None]
        token_ids = (first_seq + np.arange(s))[:, None] * L + np.arange(L)[None, :]
        waves = [(a, b, xp.asarray(np.flatnonzero(valid[a:b])), xp.asarray(token_ids[a:b][valid[a:b]]))
                 for a, b in self.waves(s)]
        empty, no_ids = xp.empty((0, H), BF16), xp.zeros(0, np.int64)
        sends = []
        for step in self.schedule():
            parts, pending = [], []
            for w, layer in step:
                a, b, rows, ids = waves[w]
                if layer not in self.blocks:                  # another stage's block: join its exchange
                    if m.is_moe(layer):
                        parts.append((layer, empty, no_ids))
                        pending.append(None)
                    continue
                if layer == self.blocks.start and not self.first_stage:
                    self._receive(x, a, b)
                h = self._attend(x, a, b, rows, layer)
                if m.is_moe(layer):
                    parts.append((layer, h, ids))
                    pending.append(w)
                elif b > a:
                    d = self.dense[layer]
                    t0 = time.perf_counter()
                    self._residual(x, a, b, rows, mlp(h, d.w1, d.b1, d.w2, d.b2, m.ffn_kind, xp, self.reduce))
                    self.times.add("dense_mlp", t0)
            if parts:
                for (layer, h, _), w, f in zip(parts, pending, self._moe_of_group(parts)):
                    if w is not None:
                        a, b, rows, _ = waves[w]
                        self._residual(x, a, b, rows, self._with_shared(layer, h, f))
            for w, layer in step:                             # waves leaving this stage
                if layer == self.blocks.stop - 1 and not self.last_stage:
                    sends.append(self._send(x, *waves[w][:2]))
        self._wait_sends(sends)
        return self._final(x, valid) if self.last_stage else (None, None)

    # ------------------------------------------------------------------ stage to stage
    def _send(self, x, a: int, b: int):
        """Sequences [a, b) go on to the next stage (non-blocking; host copies: MPI here need
        not take device memory)."""
        from mpi4py import MPI
        if b == a:
            return None
        host = np.ascontiguousarray(self.backend.to_host(x[a:b])).view(np.uint16)
        peer = self.topo.stage_peer(self.stage + 1)
        return host, self.topo.group.Isend([host, MPI.UINT16_T], dest=peer, tag=a)

    def _receive(self, x, a: int, b: int) -> None:
        """Sequences [a, b) arrive from the stage before, into ``x``."""
        from mpi4py import MPI
        if b == a:
            return
        host = np.empty(x[a:b].shape, np.uint16)
        self.topo.group.Recv([host, MPI.UINT16_T], source=self.topo.stage_peer(self.stage - 1), tag=a)
        words(x[a:b])[...] = self.backend.asarray(host)

    @staticmethod
    def _wait_sends(sends) -> None:
        from mpi4py import MPI
        MPI.Request.Waitall([request for _, request in filter(None, sends)])

    def _attend(self, x, a: int, b: int, rows, layer: int):
        """Attention with residual for sequences [a, b) at ``layer``, then the normed MLP input
        of their valid positions [T_w, H] (padding is never routed)."""
        m, xp, w = self.cfg.model, self.xp, self.dense[layer]
        if b == a:
            return xp.empty((0, m.hidden_size), BF16)
        t0 = time.perf_counter()
        xw = x[a:b]
        y = attention(add_rmsnorm(xw, None, w.attn_norm, m.norm_eps), w, self.attn_model, self.cfg.run.attention_block,
                      xp, self.reduce, self.flash)
        h = add_rmsnorm(xw, y, w.mlp_norm, m.norm_eps)      # the residual add, then the MLP's norm
        self.times.add("attention", t0)
        return take_rows(h.reshape(-1, m.hidden_size), rows)

    def _moe_of_group(self, parts):
        """The MoE step for a dense group: its leader routes the group's tokens (the others
        join the exchange with none, like expert-only ranks) and broadcasts each part's output."""
        if self.dense_group is None:
            return self.moe(parts)
        xp, H = self.xp, self.cfg.model.hidden_size
        leader = self.dense_rank == 0
        empty, none = xp.empty((0, H), BF16), xp.zeros(0, np.int64)
        outs = self.moe(parts if leader else [(layer, empty, none) for layer, _, _ in parts])
        result = []
        for (_, h, _), f in zip(parts, outs):
            buf = f if leader else xp.empty((h.shape[0], H), BF16)
            self.dense_group.broadcast(buf, root=0)
            result.append(buf)
        return result

    def _with_shared(self, layer: int, h, f):
        """f [T, H] bf16 (the routed experts' sum) plus the block's shared expert of h, if any."""
        d = self.dense[layer]
        if d.shared_w1 is None or not h.shape[0]:
            return f
        t0 = time.perf_counter()
        out = (f.astype(F32) + shared_expert(h, d, self.cfg.model, self.xp).astype(F32)).astype(BF16)
        self.times.add("dense_mlp", t0)
        return out

    def _residual(self, x, a: int, b: int, rows, f) -> None:
        """x[a:b] at the valid positions += f."""
        if b > a:
            add_rows(x[a:b].reshape(-1, self.cfg.model.hidden_size), rows, f)

    def _final(self, x, valid: np.ndarray):
        xp, H = self.xp, self.cfg.model.hidden_size
        t0 = time.perf_counter()
        s, L = valid.shape
        out = add_rmsnorm(x, None, self.globals["final_norm"], self.cfg.model.norm_eps)
        pad = xp.asarray(np.flatnonzero(~valid.reshape(-1)))
        zero_rows(out.reshape(-1, H), pad)
        logits = None
        if self.cfg.run.logits:
            logits = matmul_bf16(out, self.globals["lm_head"], xp)
            # by V, not -1: a rank holding no sequence in this chunk has s = 0
            zero_rows(logits.reshape(s * L, self.cfg.model.vocab_size), pad)
        self.times.add("final_norm", t0)
        return out, logits

    def next_token_logprobs(self, out, tokens: np.ndarray, lengths: np.ndarray, rows_per_step: int = 1024):
        """out: [s, L, H] bf16 final hidden states; tokens: [s, L] host ints -> [s, L] float32
        host: log p(tokens[:, t+1]) at position t, NaN at each sequence's last position and at
        padding. ``rows_per_step`` positions at a time, so [rows, V] fp32 logits are the most
        this ever holds, whatever the chunk."""
        xp = self.xp
        s, L, H = out.shape
        has_next = np.arange(L)[None, :] < lengths[:, None] - 1
        rows = np.flatnonzero(has_next)                   # flat positions; row + 1 is the next token
        targets = tokens.reshape(-1)[rows + 1]
        result = np.full(s * L, np.nan, np.float32)
        flat = out.reshape(-1, H)
        t0 = time.perf_counter()
        for a in range(0, rows.size, rows_per_step):
            r = rows[a:a + rows_per_step]
            lp = token_logprobs(take_rows(flat, xp.asarray(r)), self.globals["lm_head"], xp.asarray(targets[a:a + r.size]), xp)
            result[r] = self.backend.to_host(lp)
        self.times.add("final_norm", t0)
        return result.reshape(s, L)

    def serve_chunk(self) -> None:
        """An expert-only rank's part of one chunk: every exchange step, no tokens of its own."""
        m, xp = self.cfg.model, self.xp
        empty, no_ids = xp.empty((0, m.hidden_size), BF16), xp.zeros(0, np.int64)
        for step in self.schedule():
            parts = [(layer, empty, no_ids) for _, layer in step if m.is_moe(layer)]
            if parts:
                self.moe(parts)

    def expert_idle_fraction(self) -> float:
        """Share of exchange micro-batches in which this rank's expert slots got no token."""
        return 1.0 - self.moe.busy_steps / self.moe.steps if self.moe.steps else 0.0

    def close(self) -> None:
        self.exchange.close()
        for group in (self.tp_group, self.dense_group):
            if group is not None:
                group.close()


__all__ = ["Engine", "PhaseTimes"]
