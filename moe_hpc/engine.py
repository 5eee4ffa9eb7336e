"""The run: chunks of sequences through every block, with the MoE blocks spread over ranks.

Per MoE block the schedule is double-buffered (one short loop in ``MoeBlock.__call__``):

    post dispatch(0)
    for i in micro-batches:
        post dispatch(i+1)            # travels while i computes
        rows = wait dispatch(i); out = experts(rows)
        post combine(i)
        wait combine(i-1); weighted sum into f
    wait combine(last)

Every rank runs the same loop with the same micro-batch count (agreed per block), sending
nothing where it has nothing, so the collectives match on all ranks.
"""
from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from .backend import BF16, F32, Backend, matmul_bf16
from .checkpoint import Checkpoint, DenseLayer
from .config import Config
from .dispatcher import plan_dispatch, replica_table
from .exchange import Exchange, expert_slots, peer_major, slot_capacity
from .kernels import combine as combine_rows, put_rows, take_rows
from .model import attention, mlp, rmsnorm, route
from .model.experts import LocalExperts
from .placement import Placement
from .topology import Topology


@dataclass
class PhaseTimes:
    """Wall seconds per phase on this rank."""
    seconds: dict = field(default_factory=lambda: defaultdict(float))

    def add(self, phase: str, t0: float) -> float:
        now = time.perf_counter()
        self.seconds[phase] += now - t0
        return now


class MoeBlock:
    """Gate, dispatch, experts, combine for one MoE block, on the engine's buffers."""

    def __init__(self, engine: "Engine"):
        self.e = engine

    def __call__(self, layer: int, m, token_ids: np.ndarray):
        """m: [T, H] bf16 valid tokens of this rank (T may be 0); token_ids: [T] -> f [T, H] bf16."""
        e, xp, cfg = self.e, self.e.xp, self.e.cfg.model
        T, k, P, E, H = m.shape[0], cfg.top_k, e.topo.exchange.Get_size(), cfg.num_experts, cfg.hidden_size
        t0 = time.perf_counter()
        experts, weights = xp.zeros((0, k), np.int32), xp.zeros((0, k), F32)
        if T:
            w = e.dense[layer]
            routing = route(m, w.gate, w.gate_bias, k, cfg.normalize_topk, xp)
            experts, weights = routing.experts, routing.weights
            e.expert_tokens[layer - cfg.first_dense_layers] += e.backend.to_host(
                xp.bincount(experts.reshape(-1), minlength=E))
        mbt = e.cfg.run.micro_batch_tokens
        nmb = e.topo.exchange.allreduce(math.ceil(T / mbt), op=_max())
        f = xp.empty((T, H), dtype=BF16)
        if nmb == 0:
            return f
        holders, replicas = e.replicas[layer]
        plan = plan_dispatch(experts, xp.asarray(token_ids), holders, replicas, mbt, nmb, P, E, xp,
                             e.backend.to_host)
        recv_counts = e.exchange.exchange_counts(plan.counts)
        self.last_send_counts, self.last_recv_counts = plan.counts, recv_counts   # for bench/trace
        t0 = e.times.add("gating", t0)
        b2 = e.dense[layer].expert_b2 if T else None
        ex = e.exchange
        slots = e.local_experts.slot_of(layer)

        def dispatch(i):
            a, b = int(plan.starts[i]), int(plan.starts[i + 1])
            send = ex.buffer("dispatch-send", i % 2, b - a)
            take_rows(m, plan.order[a:b] // k, out=send)
            recv_layout = expert_slots(recv_counts[i], slots, slot_capacity(recv_counts[i][:, slots >= 0]))
            recv = ex.buffer("dispatch-recv", i % 2, recv_layout.extent)
            return ex.post(send, peer_major(plan.counts[i]), recv, recv_layout), recv_layout

        def combine(i, out, layout):
            back_layout = peer_major(plan.counts[i])
            back = ex.buffer("combine-recv", i % 2, back_layout.rows)
            return ex.post(out, layout, back, back_layout)

        def reduce(i, handle):
            rows = handle.wait()
            a, b = i * mbt, min(T, (i + 1) * mbt)
            if b > a:   # the k choices summed in a fixed order: the result is split-independent
                combine_rows(rows, plan.positions[a:b], weights[a:b], experts[a:b], b2, out=f[a:b])

        pending = None
        nxt = dispatch(0)
        for i in range(nmb):
            handle, layout = nxt
            if i + 1 < nmb:
                nxt = dispatch(i + 1)          # travels while micro-batch i computes
            t0 = time.perf_counter()
            rows = handle.wait()
            t0 = e.times.add("exchange_wait", t0)
            out = ex.buffer("combine-send", i % 2, layout.extent)
            if e.topo.tp is None:
                e.local_experts.forward(layer, rows, layout, out, ex.buffer)
            else:
                e.tensor_parallel_experts(layer, rows, layout, out, i % 2)
            t0 = e.times.add("experts", t0)
            posted = combine(i, out, layout)
            if pending is not None:
                reduce(*pending)
            pending = (i, posted)
            e.times.add("exchange_wait", t0)
        t0 = time.perf_counter()
        reduce(*pending)
        e.times.add("exchange_wait", t0)
        return f


def _words(array):
    """Raw 16-bit view of a bf16 array: gathers and copies need no bf16 support."""
    return array.view(np.uint16)


def zero_rows(a, rows) -> None:
    _words(a)[rows] = 0


def _mpi():
    from mpi4py import MPI
    return MPI


def _max():
    return _mpi().MAX


class Engine:
    """One rank's share of the model: dense weights if it owns sequences, experts if it hosts
    any, and the exchange that joins them."""

    def __init__(self, cfg: Config, topo: Topology, backend: Backend, placement: Placement):
        self.cfg, self.topo, self.backend, self.xp = cfg, topo, backend, backend.xp
        self.placement = placement
        m = cfg.model
        self.dense: dict[int, DenseLayer] = {}
        self.globals: dict[str, np.ndarray] = {}
        self.local_experts = LocalExperts(m.num_experts, m.activation, self.xp)
        self.exchange = Exchange(topo.exchange, m.hidden_size, backend, cfg.run.transport,
                                 cfg.run.cuda_aware_mpi)
        self.expert_tokens = np.zeros((m.num_moe_layers, m.num_experts), dtype=np.int64)
        self.times = PhaseTimes()
        self.replicas = {l: tuple(map(backend.asarray, replica_table(placement, l, topo.slot_leaders)))
                         for l in m.moe_layers}
        self.moe = MoeBlock(self)

    # ------------------------------------------------------------------ weights
    def load(self, ckpt: Checkpoint) -> None:
        """Read what this rank's roles need (collective-safe: raises InputError on bad data)."""
        dtype = self.backend.weight_dtype
        put = self.backend.asarray
        m = self.cfg.model
        if self.topo.is_dense:
            for layer in range(m.num_layers):
                d = ckpt.read_dense_layer(layer, dtype)
                self.dense[layer] = DenseLayer(**{k: None if v is None else put(v) for k, v in vars(d).items()})
                if m.is_moe(layer):   # the experts' output biases are added at the combine
                    b2 = ckpt.read_expert_b2(layer, dtype)
                    self.dense[layer].expert_b2 = None if b2 is None else put(b2)
            self.globals["final_norm"] = put(ckpt.read_global("final_norm", dtype))
            if m.vocab_size:
                self.globals["embed"] = put(ckpt.read_global("embed", BF16))
                if self.cfg.run.logits:
                    self.globals["lm_head"] = put(ckpt.read_global("lm_head", dtype))
        if self.topo.is_expert:
            for layer, e in self.placement.experts_on(self.topo.expert_slot):
                x = ckpt.read_expert(layer, e, dtype, self.topo.tp_rank, self.topo.expert_tp)
                x.w1, x.w2 = put(x.w1), put(x.w2)
                x.b1 = None if x.b1 is None else put(x.b1)
                x.b2 = None      # added at the combine, from the dense ranks' copy
                self.local_experts.add(layer, e, x)
            self.local_experts.stack()

    def tensor_parallel_experts(self, layer: int, rows, layout, out, slot: int) -> None:
        """The slot leader received the tokens; every TP partner computes its column/row shard
        on them, partial outputs are summed in fp32 on the leader and rounded once.

        Blocking collectives on the TP communicator, called by all partners in the same order
        (the world exchanges meanwhile stay in flight). Host buffers: on the GPU this stages
        through the host; a CUDA-aware MPI or NCCL all-reduce is the faster road there.
        """
        tp, be, ex = self.topo.tp, self.backend, self.exchange
        MPI = _mpi()
        work = tp.bcast(layout if tp.Get_rank() == 0 else None, root=0)
        shared = be.to_host(rows[:work.extent]) if tp.Get_rank() == 0 else np.empty((work.extent, rows.shape[1]), BF16)
        tp.Bcast([shared.view(np.uint16), MPI.UINT16_T], root=0)
        partial = self.xp.empty((work.extent, self.cfg.model.hidden_size), dtype=F32)
        self.local_experts.forward(layer, be.asarray(shared), work, partial, ex.buffer)
        partial = be.to_host(partial)
        total = np.empty_like(partial) if tp.Get_rank() == 0 else None
        tp.Reduce(partial, total, op=MPI.SUM, root=0)
        if tp.Get_rank() == 0:
            out[:work.extent] = be.asarray(total.astype(BF16))

    # ------------------------------------------------------------------ compute
    def forward_chunk(self, inputs, lengths: np.ndarray, first_seq: int):
        """inputs: [s, L, H] bf16 hidden or [s, L] int tokens; -> (hidden [s, L, H] bf16 with
        padding zeroed, logits [s, L, V] bf16 or None). Dense ranks only."""
        xp, m = self.xp, self.cfg.model
        t0 = time.perf_counter()
        if inputs.ndim == 2:
            x = take_rows(self.globals["embed"], xp.asarray(inputs.reshape(-1))).reshape(*inputs.shape, -1)
        else:
            x = xp.asarray(inputs)
        s, L, H = x.shape
        valid_host = (np.arange(L)[None, :] < lengths[:, None]).reshape(-1)
        rows = xp.asarray(np.flatnonzero(valid_host))          # valid positions of [s*L]
        token_ids = ((first_seq + np.arange(s))[:, None] * L + np.arange(L)[None, :]).reshape(-1)[valid_host]
        for layer in range(m.num_layers):
            w = self.dense[layer]
            a = rmsnorm(x, w.attn_norm, m.norm_eps, xp)
            x = (x.astype(F32) + attention(a, w, m, self.cfg.run.attention_block, xp).astype(F32)).astype(BF16)
            t0 = self.times.add("attention", t0)
            xv = take_rows(x.reshape(-1, H), rows)              # padding is never routed
            h = rmsnorm(xv, w.mlp_norm, m.norm_eps, xp)
            if m.is_moe(layer):
                f = self.moe(layer, h, token_ids)
            else:
                f = mlp(h, w.w1, w.b1, w.w2, w.b2, m.activation, xp)
                t0 = self.times.add("dense_mlp", t0)
            put_rows(x.reshape(-1, H), rows, (xv.astype(F32) + f.astype(F32)).astype(BF16))
            t0 = time.perf_counter()
        out = rmsnorm(x, self.globals["final_norm"], m.norm_eps, xp)
        pad = xp.asarray(np.flatnonzero(~valid_host))
        zero_rows(out.reshape(-1, H), pad)
        logits = None
        if "lm_head" in self.globals:
            logits = matmul_bf16(out, self.globals["lm_head"], xp)
            zero_rows(logits.reshape(s * L, -1), pad)
        self.times.add("final", t0)
        return out, logits

    def serve_chunk(self) -> None:
        """An expert-only rank's part of one chunk: every MoE block, with no tokens of its own."""
        m = self.cfg.model
        empty = self.xp.empty((0, m.hidden_size), dtype=BF16)
        for layer in m.moe_layers:
            self.moe(layer, empty, np.zeros(0, np.int64))

    def close(self) -> None:
        self.exchange.close()


__all__ = ["Engine", "MoeBlock", "PhaseTimes"]
