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
from .balance import with_bias
from .checkpoint import Checkpoint, DenseLayer
from .config import Config
from .dispatcher import plan_dispatch, replica_table
from .exchange import Exchange
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
    """Gate, dispatch, experts, combine for one MoE block; owns nothing but references."""

    def __init__(self, engine: "Engine"):
        self.e = engine

    def __call__(self, layer: int, m, token_ids: np.ndarray):
        """m: [T, H] bf16 valid tokens of this rank (T may be 0); token_ids: [T] -> f [T, H] bf16."""
        e, xp, cfg = self.e, self.e.xp, self.e.cfg.model
        T, k, P = m.shape[0], cfg.top_k, e.topo.size
        t0 = time.perf_counter()
        experts = np.zeros((0, k), np.int64)
        weights = replica = None
        mbt = e.cfg.run.micro_batch_tokens
        nmb = e.topo.exchange.allreduce(math.ceil(T / mbt), op=_max())
        bounds = [(min(T, i * mbt), min(T, (i + 1) * mbt)) for i in range(nmb)]
        if e.balancer is not None:   # routes micro-batch by micro-batch, moving the bias between them
            gate = lambda x, b: route(x, e.dense[layer].gate, with_bias(e.dense[layer].gate_bias, b, xp),
                                      k, cfg.normalize_topk, xp)
            experts, weights, replica = e.balancer.route(layer, m, token_ids, bounds, gate)
        elif T:
            w = e.dense[layer]
            routing = route(m, w.gate, w.gate_bias, k, cfg.normalize_topk, xp)
            experts, weights = e.backend.to_host(routing.experts), routing.weights
        e.expert_tokens[layer - cfg.first_dense_layers] += np.bincount(
            experts.reshape(-1), minlength=cfg.num_experts)
        if e.trace is not None:
            e.trace.record(layer, experts)
        t0 = e.times.add("gating", t0)
        holders, replicas = e.replicas[layer]
        plans = [plan_dispatch(experts[a:b], token_ids[a:b], holders, replicas, P,
                               None if replica is None else replica[a:b]) for a, b in bounds]
        f = xp.empty((T, cfg.hidden_size), dtype=BF16)
        if nmb == 0:
            return f
        recv_counts = e.exchange.exchange_counts(np.stack([p.send_counts for p in plans]))
        t0 = e.times.add("dispatch_plan", t0)

        def post_dispatch(i):
            a, _ = bounds[i]
            rows = m[a + plans[i].order // k]
            return e.exchange.post_dispatch(i % 2, rows, plans[i].expert_ids, plans[i].send_counts,
                                            recv_counts[i])

        def finish_combine(i, handle):
            (rows,) = handle.wait()
            a, b = bounds[i]
            if a == b:
                return
            y = xp.empty((rows.shape[0], cfg.hidden_size), dtype=BF16)
            y[plans[i].order] = rows
            y = y.reshape(b - a, k, cfg.hidden_size)
            acc = xp.zeros((b - a, cfg.hidden_size), dtype=F32)
            for j in range(k):   # fixed order over the k choices: the sum is split-independent
                acc += weights[a:b, j:j + 1] * y[:, j].astype(F32)
            f[a:b] = acc.astype(BF16)

        pending = None
        nxt = post_dispatch(0)
        for i in range(nmb):
            current = nxt
            if i + 1 < nmb:
                nxt = post_dispatch(i + 1)
            t0 = time.perf_counter()
            rows, ids = current.wait()
            t0 = e.times.add("exchange_wait", t0)
            out = e.local_experts.forward(layer, rows, ids) if rows.shape[0] else rows
            t0 = e.times.add("experts", t0)
            combine = e.exchange.post_combine(i % 2, out, recv_counts[i], plans[i].send_counts)
            if pending is not None:
                finish_combine(*pending)
            pending = (i, combine)
            e.times.add("exchange_wait", t0)
        t0 = time.perf_counter()
        finish_combine(*pending)
        e.times.add("exchange_wait", t0)
        return f


def _max():
    from mpi4py import MPI
    return MPI.MAX


class Engine:
    """One rank's share of the model: dense weights if it owns sequences, experts if it hosts
    any, and the exchange that joins them. The runner may attach a balancer and a trace recorder."""
    balancer = None     # balance.Balancer when run.balance is on
    trace = None        # trace.TraceRecorder under ``moe-hpc run --trace``

    def __init__(self, cfg: Config, topo: Topology, backend: Backend, placement: Placement):
        self.cfg, self.topo, self.backend, self.xp = cfg, topo, backend, backend.xp
        self.placement = placement
        m = cfg.model
        self.dense: dict[int, DenseLayer] = {}
        self.globals: dict[str, np.ndarray] = {}
        self.local_experts = LocalExperts({}, m.activation, m.hidden_size, self.xp)
        self.exchange = Exchange(topo.exchange, m.hidden_size)
        self.expert_tokens = np.zeros((m.num_moe_layers, m.num_experts), dtype=np.int64)
        self.times = PhaseTimes()
        ranks = topo.roles.expert_ranks
        self.replicas = {l: replica_table(placement, l, ranks) for l in m.moe_layers}
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
            self.globals["final_norm"] = put(ckpt.read_global("final_norm", dtype))
            if m.vocab_size:
                self.globals["embed"] = put(ckpt.read_global("embed", BF16))
                if self.cfg.run.logits:
                    self.globals["lm_head"] = put(ckpt.read_global("lm_head", dtype))
        if self.topo.is_expert:
            for layer, e in self.placement.experts_on(self.topo.expert_index):
                x = ckpt.read_expert(layer, e, dtype)
                x.w1, x.w2 = put(x.w1), put(x.w2)
                x.b1 = None if x.b1 is None else put(x.b1)
                x.b2 = None if x.b2 is None else put(x.b2)
                self.local_experts.experts[(layer, e)] = x

    # ------------------------------------------------------------------ compute
    def forward_chunk(self, inputs, lengths: np.ndarray, first_seq: int):
        """inputs: [s, L, H] bf16 hidden or [s, L] int tokens; -> (hidden [s, L, H] bf16 with
        padding zeroed, logits [s, L, V] bf16 or None). Dense ranks only."""
        xp, m = self.xp, self.cfg.model
        t0 = time.perf_counter()
        x = self.globals["embed"][xp.asarray(inputs)] if inputs.ndim == 2 else xp.asarray(inputs)
        s, L, H = x.shape
        valid_host = np.arange(L)[None, :] < lengths[:, None]
        valid = xp.asarray(valid_host)
        token_ids = ((first_seq + np.arange(s))[:, None] * L + np.arange(L)[None, :])[valid_host]
        for layer in range(m.num_layers):
            w = self.dense[layer]
            a = rmsnorm(x, w.attn_norm, m.norm_eps, xp)
            x = (x.astype(F32) + attention(a, w, m, self.cfg.run.attention_block, xp).astype(F32)).astype(BF16)
            t0 = self.times.add("attention", t0)
            h = rmsnorm(x[valid], w.mlp_norm, m.norm_eps, xp)
            if m.is_moe(layer):
                f = self.moe(layer, h, token_ids)
            else:
                f = mlp(h, w.w1, w.b1, w.w2, w.b2, m.activation, xp)
                t0 = self.times.add("dense_mlp", t0)
            x[valid] = (x[valid].astype(F32) + f.astype(F32)).astype(BF16)
            t0 = time.perf_counter()
        out = rmsnorm(x, self.globals["final_norm"], m.norm_eps, xp)
        out[~valid] = 0
        logits = None
        if "lm_head" in self.globals:
            logits = matmul_bf16(out, self.globals["lm_head"], xp)
            logits[~valid] = 0
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
