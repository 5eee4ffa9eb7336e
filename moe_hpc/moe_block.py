"""One MoE exchange step: gate, dispatch, experts, combine, double-buffered.

A step carries tokens of one MoE block, or of several at once when the cross-layer pipeline
has waves at different blocks: experts are named by flat id m*E + e, so each token row knows
its block. The schedule is one short loop:

    post dispatch(0)
    for i in micro-batches:
        post dispatch(i+1)            # travels while i computes
        rows = wait dispatch(i); out = experts(rows)
        post combine(i)
        wait combine(i-1); weighted sum into f
    wait combine(last)

Every rank runs the same loop with the same micro-batch count (agreed per step), sending
nothing where it has nothing, so the collectives match on all ranks.
"""
from __future__ import annotations

import math
import time

import numpy as np

from .backend import BF16, F32
from .balance import with_bias
from .dispatcher import plan_dispatch
from .exchange import expert_slots, peer_major, slot_capacity
from .kernels import combine as combine_rows
from .model import route


def _mpi():
    from mpi4py import MPI
    return MPI


class MoeBlock:
    """Runs exchange steps on the engine's weights, tables and buffers."""

    def __init__(self, engine):
        self.e = engine
        self.last_send_counts = self.last_recv_counts = None      # for bench and traces
        self.steps = self.busy_steps = 0                           # expert-slot occupancy

    def layer(self, layer: int, m, token_ids: np.ndarray):
        """One block's tokens: m [T, H] bf16, token_ids [T] -> f [T, H] bf16."""
        return self([(layer, m, token_ids)])[0]

    def _route_part(self, layer: int, m, tok):
        """One part's routing -> (flat experts [T, k] device, weights [T, k], replica [T, k] host
        or None). With run-time balancing on, the balancer routes micro-batch by micro-batch (a
        collective: every rank calls it for every part, empty or not)."""
        e, xp, cfg = self.e, self.e.xp, self.e.cfg.model
        k, first = cfg.top_k, cfg.first_dense_layers
        T = m.shape[0]
        replica = None
        if e.balancer is not None:
            mbt = e.cfg.run.micro_batch_tokens
            nmb = e.topo.world.allreduce(math.ceil(T / mbt), op=_mpi().MAX)
            bounds = [(min(T, i * mbt), min(T, (i + 1) * mbt)) for i in range(nmb)]
            w = e.dense.get(layer)
            gate = lambda x, bias: route(x, w.gate, with_bias(w.gate_bias, bias, xp), k, cfg.normalize_topk, xp)
            experts, weights, replica = e.balancer.route(layer, m, e.backend.to_host(tok), bounds, gate)
            experts = xp.asarray(experts)
            weights = xp.zeros((0, k), F32) if weights is None else weights
        elif T:
            w = e.dense[layer]
            r = route(m, w.gate, w.gate_bias, k, cfg.normalize_topk, xp)
            experts, weights = r.experts, r.weights
        else:
            experts, weights = xp.zeros((0, k), np.int64), xp.zeros((0, k), F32)
        host = e.backend.to_host(experts).astype(np.int64)
        e.expert_tokens[layer - first] += np.bincount(host.reshape(-1), minlength=cfg.num_experts)
        if e.trace is not None:
            e.trace.record(layer, host)
        return experts.astype(np.int64) + (layer - first) * cfg.num_experts, weights, replica

    def _gate(self, parts):
        """Route every part; -> (m [T, H], flat experts [T, k], weights [T, k], token ids [T],
        replica [T, k] or None)."""
        e, xp, cfg = self.e, self.e.xp, self.e.cfg.model
        k = cfg.top_k
        rows, experts, weights, ids, replicas = [], [], [], [], []
        for layer, m, tok in parts:
            ex, w, rep = self._route_part(layer, m, tok)
            if rep is not None:
                replicas.append(rep)
            if not m.shape[0]:
                continue
            rows.append(m)
            experts.append(ex)
            weights.append(w)
            ids.append(e.backend.to_host(tok))
        replica = np.concatenate(replicas) if replicas else None
        if not rows:
            return (xp.empty((0, cfg.hidden_size), BF16), xp.zeros((0, k), np.int64),
                    xp.zeros((0, k), F32), np.zeros(0, np.int64), replica)
        if len(rows) == 1:
            return rows[0], experts[0], weights[0], ids[0], replica
        m = xp.empty((sum(r.shape[0] for r in rows), cfg.hidden_size), BF16)
        a = 0
        for r in rows:                    # raw 16-bit copies: no bf16 kernels needed
            m.view(np.uint16)[a:a + r.shape[0]] = r.view(np.uint16)
            a += r.shape[0]
        return m, xp.concatenate(experts), xp.concatenate(weights), np.concatenate(ids), replica

    def __call__(self, parts):
        """parts: list of (block index, m [T_i, H] bf16, token_ids [T_i]) -> list of f_i."""
        e, xp = self.e, self.e.xp
        H = e.cfg.model.hidden_size
        t0 = time.perf_counter()
        m, experts, weights, token_ids, replica = self._gate(parts)
        T = m.shape[0]
        mbt = e.cfg.run.micro_batch_tokens
        nmb = e.topo.exchange.allreduce(math.ceil(T / mbt), op=_mpi().MAX)
        f = xp.empty((T, H), dtype=BF16)
        if nmb:
            P = e.topo.exchange.Get_size()
            plan = plan_dispatch(experts, xp.asarray(token_ids), e.tables, mbt, nmb, P, xp, e.backend.to_host,
                                 None if replica is None else xp.asarray(replica))
            recv_counts = e.exchange.exchange_counts(plan.counts)
            self.last_send_counts, self.last_recv_counts = plan.counts, recv_counts
            e.times.add("gating", t0)
            self._exchange(m, plan, recv_counts, experts, weights, f, nmb, mbt)
        out, a = [], 0
        for _, part, _ in parts:
            out.append(f[a:a + part.shape[0]])
            a += part.shape[0]
        return out

    def _exchange(self, m, plan, recv_counts, experts, weights, f, nmb: int, mbt: int) -> None:
        e, ex, k = self.e, self.e.exchange, self.e.cfg.model.top_k
        T = m.shape[0]
        active = e.local_experts.active_slots

        def dispatch(i):
            from .kernels import take_rows
            a, b = int(plan.starts[i]), int(plan.starts[i + 1])
            send = ex.buffer("dispatch-send", i % 2, b - a)
            take_rows(m, plan.order[a:b] // k, out=send)
            slots = np.full(e.tables.num_slots, -1, dtype=np.int64)
            own = active(recv_counts[i], e.local_experts.num_slots)
            slots[:own.size] = own
            layout = expert_slots(recv_counts[i], slots, slot_capacity(recv_counts[i][:, slots >= 0]))
            recv = ex.buffer("dispatch-recv", i % 2, layout.extent)
            return ex.post(send, peer_major(plan.counts[i]), recv, layout), layout

        def reduce(i, handle):
            rows = handle.wait()
            a, b = i * mbt, min(T, (i + 1) * mbt)
            if b > a:   # the k choices summed in a fixed order: the result is split-independent
                combine_rows(rows, plan.positions[a:b], weights[a:b], experts[a:b], e.expert_b2, out=f[a:b])

        pending, nxt = None, dispatch(0)
        for i in range(nmb):
            handle, layout = nxt
            if i + 1 < nmb:
                nxt = dispatch(i + 1)              # travels while micro-batch i computes
            t0 = time.perf_counter()
            rows = handle.wait()
            t0 = e.times.add("exchange", t0)
            out = ex.buffer("combine-send", i % 2, layout.extent)
            work = layout
            if e.topo.tp is None:
                e.local_experts.forward(rows, layout, out, ex.buffer)
            else:                                  # partners compute on the leader's rows
                work = e.tensor_parallel_experts(rows, layout, out)
            self.steps += 1
            self.busy_steps += int(work.rows > 0)
            t0 = e.times.add("experts", t0)
            back = ex.buffer("combine-recv", i % 2, int(plan.counts[i].sum()))
            posted = ex.post(out, layout, back, peer_major(plan.counts[i]))
            if pending is not None:
                reduce(*pending)
            pending = (i, posted)
            e.times.add("exchange", t0)
        t0 = time.perf_counter()
        reduce(*pending)
        e.times.add("exchange", t0)


__all__ = ["MoeBlock"]
