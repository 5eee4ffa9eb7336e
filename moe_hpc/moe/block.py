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

The block is composed from explicit parts (Megatron's split): the ``Router`` (gate.py) routes,
``plan_dispatch`` (dispatch.py) orders rows by destination, the ``Exchange`` (comm/) moves them,
``LocalExperts`` (model/) computes, and ``combine`` sums each token's k outputs.
"""
from __future__ import annotations

import math
import time

import numpy as np

from ..comm.exchange import expert_slots, peer_major, slot_capacity
from ..device.dtypes import BF16
from ..device.kernels import combine as combine_rows
from ..device.kernels import take_rows
from .dispatch import plan_dispatch
from .expert_tp import tensor_parallel_experts


def _mpi():
    from mpi4py import MPI
    return MPI


class MoeBlock:
    """Runs exchange steps. Its parts are handed in, never reached for:

    router:   gate.Router (routing and its counters)
    exchange: comm.exchange.Exchange over ``comm`` (the group's exchange communicator)
    tables:   dispatch.RouteTables on the device (where each flat expert lives)
    experts:  model.experts.LocalExperts of this rank (empty on dense-only ranks)
    tp:       this expert rank's tensor-parallel communicator, or None
    tp_group: ``comm.groups`` collectives over ``tp`` (device ones on GPUs)
    times:    the engine's PhaseTimes (gating, exchange, experts)
    expert_b2: [M*E, H] every expert's output bias, added at the combine (dense ranks; set at load)
    """

    def __init__(self, model, micro_batch_tokens: int, router, exchange, comm, tables, experts,
                 backend, times, tp=None, tp_group=None):
        self.model, self.micro_batch_tokens = model, micro_batch_tokens
        self.router, self.exchange, self.comm, self.tables = router, exchange, comm, tables
        self.experts, self.backend, self.xp, self.times = experts, backend, backend.xp, times
        self.tp, self.tp_group = tp, tp_group
        self.expert_b2 = None
        self.last_send_counts = self.last_recv_counts = None      # for bench and traces
        self.steps = self.busy_steps = 0                           # expert-slot occupancy

    def layer(self, layer: int, m, token_ids: np.ndarray):
        """One block's tokens: m [T, H] bf16, token_ids [T] -> f [T, H] bf16."""
        return self([(layer, m, token_ids)])[0]

    def __call__(self, parts):
        """parts: list of (block index, m [T_i, H] bf16, token_ids [T_i]) -> list of f_i."""
        xp = self.xp
        t0 = time.perf_counter()
        m, experts, weights, token_ids, replica = self.router(parts)
        T = m.shape[0]
        mbt = self.micro_batch_tokens
        nmb = self.comm.allreduce(math.ceil(T / mbt), op=_mpi().MAX)
        f = xp.empty((T, self.model.hidden_size), dtype=BF16)
        if nmb:
            plan = plan_dispatch(experts, token_ids, self.tables, mbt, nmb, self.comm.Get_size(), xp,
                                 self.backend.to_host, None if replica is None else xp.asarray(replica))
            recv_counts = self.exchange.exchange_counts(plan.counts)
            self.last_send_counts, self.last_recv_counts = plan.counts, recv_counts
            self.times.add("gating", t0)
            self._exchange(m, plan, recv_counts, experts, weights, f, nmb, mbt)
        out, a = [], 0
        for _, part, _ in parts:
            out.append(f[a:a + part.shape[0]])
            a += part.shape[0]
        return out

    def _slot_layout(self, counts):
        """counts: [P, slots] rows this rank receives -> their slot-major layout over the slots
        that received any (only those get buffer space and GEMM work)."""
        slots = np.full(self.tables.num_slots, -1, dtype=np.int64)
        own = self.experts.active_slots(counts, self.experts.num_slots)
        slots[:own.size] = own
        return expert_slots(counts, slots, slot_capacity(counts[:, slots >= 0]))

    def _exchange(self, m, plan, recv_counts, experts, weights, f, nmb: int, mbt: int) -> None:
        ex, k, times = self.exchange, self.model.top_k, self.times
        T = m.shape[0]
        peers = [peer_major(plan.counts[i]) for i in range(nmb)]          # what this rank sends
        slotted = [self._slot_layout(recv_counts[i]) for i in range(nmb)]  # what its experts read
        routes = ex.prepare(list(zip(peers, slotted)))
        rows_of = (plan.order // k).astype(np.int64)                         # token row of each send row

        def dispatch(i):
            a, b = int(plan.starts[i]), int(plan.starts[i + 1])
            send = ex.buffer("dispatch-send", i % 2, b - a)
            take_rows(m, rows_of[a:b], out=send)
            recv = ex.buffer("dispatch-recv", i % 2, slotted[i].extent)
            return ex.post(send, peers[i], recv, slotted[i], routes[i]), slotted[i]

        def reduce(i, handle):
            rows = handle.wait()
            a, b = i * mbt, min(T, (i + 1) * mbt)
            if b > a:   # the k choices summed in a fixed order: the result is split-independent
                combine_rows(rows, plan.positions[a:b], weights[a:b], experts[a:b], self.expert_b2, out=f[a:b])

        t0 = time.perf_counter()
        pending, nxt = None, dispatch(0)
        for i in range(nmb):
            handle, layout = nxt
            if i + 1 < nmb:
                nxt = dispatch(i + 1)              # travels while micro-batch i computes
            rows = handle.wait()
            t0 = times.add("exchange", t0)
            out = ex.buffer("combine-send", i % 2, layout.extent)
            work = layout
            if self.tp is None:
                self.experts.forward(rows, layout, out, ex.buffer)
            else:                                  # partners compute on the leader's rows
                work = tensor_parallel_experts(self.tp, self.tp_group, self.backend, self.experts, rows, layout, out,
                                               ex.buffer)
            self.steps += 1
            self.busy_steps += int(work.rows > 0)
            t0 = times.add("experts", t0)
            back = ex.buffer("combine-recv", i % 2, peers[i].rows)
            posted = ex.post(out, layout, back, peers[i], routes[i])
            if pending is not None:
                reduce(*pending)
            pending = (i, posted)
            t0 = times.add("exchange", t0)
        reduce(*pending)
        times.add("exchange", t0)


__all__ = ["MoeBlock"]
