"""The MoE layer: gate, dispatch, experts, combine, double-buffered, and the finished output.

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

On one rank without expert TP every row stays here, so ``_local_step`` skips the transport both
ways: one fused copy puts each micro-batch's rows straight into their expert slots, and the
weighted sum reads the experts' output buffer where the rows lie.

Every rank runs the same loop with the same micro-batch count (``dispatch.micro_batch_count``),
sending nothing where it has nothing, so the collectives match on all ranks.

The layer owns what it computes with (Megatron's ``MoELayer``): its ``Router`` (router.py: gate
weights, balancer, trace), the ``DispatchLayout`` of each step (dispatch.py), the ``Exchange``
(comm/) that moves rows, ``LocalExperts`` (model/), the experts' output bias added at the
combine, the shared expert, and a dense-TP group's broadcast of the routed output.  Every step
runs through ``hook(label, fn, *args)``, so a tool may time it without replacing anything.
"""
from __future__ import annotations

import time

import numpy as np

from ..device.dtypes import BF16, F32
from ..device.expert_batches import pack_slots
from ..device.kernels import combine as combine_rows
from ..device.kernels import gather_scatter_rows, padded_expert_mlp, put_rows, static_dispatch, take_rows
from ..model.layers import shared_expert
from ..comm.exchange import displacements
from .dispatch import dispatch_layout, micro_batch_count, plan_dispatch
from .expert_tp import tensor_parallel_experts
from .router import Router, run_step


class MoeLayer:
    """Every MoE block of this rank. Its parts are handed in, never reached for:

    gates:     block index -> weights.GateWeights of this rank's blocks (gate, gate_bias, shared
               expert; empty on expert-only ranks)
    expert_b2: [M*E, H] every expert's output bias, added at the combine (dense ranks), or None
    exchange:  comm.exchange.Exchange over the group's exchange communicator
    world:     every rank (the balancer's collectives); balancer, trace: see ``Router``
    tables:    dispatch.RouteTables on the device (where each flat expert lives)
    experts:   model.experts.LocalExperts of this rank (empty on dense-only ranks)
    times:     the engine's PhaseTimes (gating, exchange, experts; the shared expert as dense_mlp)
    tp, tp_group: this expert rank's tensor-parallel communicator and its collectives, or None
    dense_group: the dense-TP group's collectives (its leader routes for all), or None
    hook:      timing hook, ``run_step`` unless a tool times the steps
    local_shortcut: on one exchange rank without expert TP, skip the transport (``_local_step``);
               False forces the general path (the tests compare the two)
    """

    def __init__(self, model, micro_batch_tokens: int, gates, expert_b2, exchange, world, tables, experts, backend,
                 times, *, balancer=None, trace=None, tp=None, tp_group=None, dense_group=None, dense_leader=True,
                 hook=run_step, local_shortcut=True):
        self.model, self.micro_batch_tokens, self.gates, self.expert_b2 = model, micro_batch_tokens, gates, expert_b2
        self.router = Router(model, micro_batch_tokens, gates, backend, world, balancer, trace, hook)
        self.exchange, self.comm, self.tables = exchange, exchange.comm, tables
        self.experts, self.backend, self.xp, self.times = experts, backend, backend.xp, times
        self.tp, self.tp_group, self.dense_group, self.dense_leader = tp, tp_group, dense_group, dense_leader
        self.hook = hook
        self.local = local_shortcut and exchange.comm.Get_size() == 1 and tp is None
        self.last_layout = None                                    # the last step's DispatchLayout (bench)
        self.steps = self.busy_steps = 0                           # expert-slot occupancy

    def __call__(self, parts):
        """parts: list of (block index, m [T_i, H] bf16 normed MLP input, token_ids [T_i]) ->
        list of the blocks' MoE outputs [T_i, H] bf16 (routed experts + shared expert)."""
        if self.dense_group is not None and not self.dense_leader:
            routed = self._broadcast(parts, self._routed([(layer, self.empty_rows(), self._no_ids())
                                                          for layer, _, _ in parts]))
        elif self.dense_group is not None:
            routed = self._broadcast(parts, self._routed(parts))
        else:
            routed = self._routed(parts)
        return [self._with_shared(layer, h, f) for (layer, h, _), f in zip(parts, routed)]

    def serve(self, layers) -> None:
        """An expert-only rank's part of one exchange step over ``layers``: no tokens of its own."""
        self._routed([(layer, self.empty_rows(), self._no_ids()) for layer in layers])

    @property
    def fixed_shape_ok(self) -> bool:
        """Whether ``fixed_shape_step`` can run here: one rank hosting every expert of every
        block in flat id order, no expert TP, no dense-TP group, no run-time balancer or trace
        (those route through the host)."""
        m = self.model
        return (self.comm.Get_size() == 1 and self.tp is None and self.dense_group is None
                and self.router.balancer is None and self.router.trace is None
                and (m.gate_score, m.expert_groups, m.routed_scaling_factor) == ("softmax", 1, 1.0)
                and self.experts.ids == list(range(m.num_moe_layers * m.num_experts)))

    def fixed_shape_step(self, layer: int, h):
        """Block ``layer``'s MoE output for a small step's tokens h [T, H] bf16 (a decode step on
        one rank) with no host round trip, so a CUDA graph can capture it: every expert of the
        block runs over T rows (its choices first, the rest padding), the shapes fixed by T alone.
        That is E / top_k times the exact path's rows and every expert's weights read, where
        the exact path reads min(E, T top_k) experts: a decode step of T <= 128 tokens stays
        bound by reading the weights. SPEC's softmax gate only (one kernel): the other
        rules sort on the device through calls a capture may not hold."""
        m, xp = self.model, self.xp
        T, E = h.shape[0], m.num_experts
        flat, weights, _ = self.router._route_part(layer, h, None)
        s0 = (layer - m.first_dense_layers) * E                  # the block's first slot
        dst, src = static_dispatch(flat - s0, T, E)
        # padding rows are computed and never read: no memset on the GPU (NumPy gets zeros, so
        # garbage never warns there)
        rows = (xp.zeros if xp is np else xp.empty)((E * T, m.hidden_size), BF16)
        put_rows(rows, dst.reshape(-1), take_rows(h, src))
        w1, b1, w2 = self.experts.stacked
        out = padded_expert_mlp(rows, w1[s0:s0 + E], None if b1 is None else b1[s0:s0 + E], w2[s0:s0 + E],
                                self.experts.activation)
        f = combine_rows(out, dst, weights, flat, self.expert_b2)
        return self._with_shared(layer, h, f)

    def micro_batches(self, rows: int) -> int:
        """Collective over the exchange: the step's micro-batch count for ``rows`` tokens here."""
        return micro_batch_count(self.comm, rows, self.micro_batch_tokens)

    @property
    def idle_fraction(self) -> float:
        """Share of exchange micro-batches in which this rank's expert slots got no token."""
        return 1.0 - self.busy_steps / self.steps if self.steps else 0.0

    def empty_rows(self):
        """[0, H] bf16: a part with no tokens (another stage's block, an expert-only rank)."""
        return self.xp.empty((0, self.model.hidden_size), BF16)

    def _no_ids(self):
        return self.xp.zeros(0, np.int64)

    def _routed(self, parts):
        """The routed experts' weighted sum per part (expert output bias included)."""
        t0 = time.perf_counter()
        m, experts, weights, token_ids, replica = self.router(parts)
        T = m.shape[0]
        nmb = self.micro_batches(T)
        f = self.xp.empty((T, self.model.hidden_size), dtype=BF16)
        if nmb:
            plan = self.hook("plan", plan_dispatch, experts, token_ids, self.tables, self.micro_batch_tokens, nmb,
                             self.comm.Get_size(), self.xp, self.backend.to_host,
                             None if replica is None else self.xp.asarray(replica))
            recv_counts = self.hook("counts", self.exchange.exchange_counts, plan.counts)
            layout = dispatch_layout(plan.counts, recv_counts, self.tables.num_slots, self.experts.num_slots)
            self.last_layout = layout
            self.times.add("gating", t0)
            (self._local_step if self.local else self._exchange)(m, plan, layout, experts, weights, f, nmb)
        out, a = [], 0
        for _, part, _ in parts:
            out.append(f[a:a + part.shape[0]])
            a += part.shape[0]
        return out

    def _broadcast(self, parts, routed):
        """Dense TP: the leader's routed output of each part, on every member of its group."""
        result = []
        for (_, h, _), f in zip(parts, routed):
            buf = f if self.dense_leader else self.xp.empty((h.shape[0], self.model.hidden_size), BF16)
            self.dense_group.broadcast(buf, root=0)
            result.append(buf)
        return result

    def _with_shared(self, layer: int, h, f):
        """f [T, H] bf16 (the routed experts' sum) plus the block's shared expert of h, if any."""
        if not h.shape[0] or self.gates[layer].shared_w1 is None:
            return f
        t0 = time.perf_counter()
        out = (f.astype(F32) + shared_expert(h, self.gates[layer], self.model, self.xp).astype(F32)).astype(BF16)
        self.times.add("dense_mlp", t0)
        return out

    def _compute(self, rows, layout, out):
        """This rank's experts over one micro-batch's received rows -> the layout they ran."""
        if self.tp is None:
            self.experts.forward(rows, layout, out, self.exchange.buffer)
            return layout
        # partners compute on the leader's rows
        return tensor_parallel_experts(self.tp, self.tp_group, self.backend, self.experts, rows, layout, out,
                                       self.exchange.buffer)

    def _exchange(self, m, plan, layout, experts, weights, f, nmb: int) -> None:
        ex, times, hook, mbt = self.exchange, self.times, self.hook, self.micro_batch_tokens
        T = m.shape[0]
        sends, receives = layout.sends, layout.receives
        routes = hook("prepare", ex.prepare, list(zip(sends, receives)))
        rows_of = plan.rows                                                  # token row of each send row

        def dispatch(i):
            a, b = int(plan.starts[i]), int(plan.starts[i + 1])
            send = ex.buffer("dispatch-send", i % 2, b - a)
            hook("pack", take_rows, m, rows_of[a:b], out=send)
            recv = ex.buffer("dispatch-recv", i % 2, receives[i].extent)
            return hook("transfer", ex.post, send, sends[i], recv, receives[i], routes[i]), receives[i]

        def reduce(i, handle):
            rows = handle.wait()
            a, b = i * mbt, min(T, (i + 1) * mbt)
            if b > a:   # the k choices summed in a fixed order: the result is split-independent
                hook("combine", combine_rows, rows, plan.positions[a:b], weights[a:b], experts[a:b], self.expert_b2,
                     out=f[a:b])

        t0 = time.perf_counter()
        pending, nxt = None, dispatch(0)
        for i in range(nmb):
            handle, recv_layout = nxt
            if i + 1 < nmb:
                nxt = dispatch(i + 1)              # travels while micro-batch i computes
            rows = handle.wait()
            t0 = times.add("exchange", t0)
            out = ex.buffer("combine-send", i % 2, recv_layout.extent)
            work = hook("experts", self._compute, rows, recv_layout, out)
            self.steps += 1
            self.busy_steps += int(work.rows > 0)
            t0 = times.add("experts", t0)
            back = ex.buffer("combine-recv", i % 2, sends[i].rows)
            posted = hook("transfer", ex.post, out, recv_layout, back, sends[i], routes[i])
            if pending is not None:
                reduce(*pending)
            pending = (i, posted)
            t0 = times.add("exchange", t0)
        reduce(*pending)
        times.add("exchange", t0)

    def _local_step(self, m, plan, layout, experts, weights, f, nmb: int) -> None:
        """``_exchange`` on one rank without expert TP, with no transport either way. The rows
        a transport would deliver are placed straight into the experts' buffer, packed with no
        slot padded to the busiest (``expert_batches.pack_slots``): each (token, choice) goes to
        the row ``pair_rows`` (``_pair_rows``) by one fused copy per micro-batch, the experts
        run over the packed rows, and the weighted sum reads their output at the same rows.
        Each row is computed by the same expert from the same input as through a transport (on
        the CPU to the bit; on the GPU the GEMMs group rows differently). The "exchange" phase
        holds the index work, the fused copies and the weighted sums. One stream orders every
        reuse, so one buffer per direction suffices."""
        ex, times, hook, mbt, k = self.exchange, self.times, self.hook, self.micro_batch_tokens, self.model.top_k
        t0 = time.perf_counter()
        packs = [pack_slots(r.counts[0]) for r in layout.receives]
        pair_rows = hook("prepare", self._pair_rows, plan, layout.receives, packs, experts)
        for i, packed in enumerate(packs):
            tokens = slice(i * mbt, min(m.shape[0], (i + 1) * mbt))
            here = pair_rows[tokens]
            rows = ex.buffer("dispatch-recv", 0, packed.extent)
            token_of_pair = self.xp.arange(tokens.start * k, tokens.stop * k, dtype=np.int64) // k
            hook("pack", gather_scatter_rows, m, token_of_pair, rows, here.reshape(-1))
            t0 = times.add("exchange", t0)
            out = ex.buffer("combine-send", 0, packed.extent)
            hook("experts", self.experts.forward_packed, rows, packed, out, ex.buffer)
            self.steps += 1
            self.busy_steps += int(packed.extent > 0)
            t0 = times.add("experts", t0)
            hook("combine", combine_rows, out, here, weights[tokens], experts[tokens], self.expert_b2, out=f[tokens])
            t0 = times.add("exchange", t0)

    def _pair_rows(self, plan, receives, packs, experts):
        """[T, k] packed row of every (token, choice) in its micro-batch's buffer, worked out on
        the device: a slot's rows keep their send order (on one rank, by slot), so a pair's
        place j in its slot is its send position less the slot's send offset, and its row is
        below[slot] + j for j < m, past[slot] + j beyond (``PackedSlots.row_bases``): tables of
        [micro-batches, slots] from the host, a few hundred bytes."""
        xp, S = self.xp, receives[0].counts.shape[1]
        bases = [p.row_bases(S) for p in packs]
        sent = np.stack([displacements(r.counts[0]) for r in receives])
        below, past = (np.stack([b[i] for b in bases]) for i in (0, 1))
        tables = xp.asarray(np.stack([sent, below, past, np.repeat([[p.m] for p in packs], S, axis=1)]))
        micro_batch = (xp.arange(experts.shape[0], dtype=np.int64) // self.micro_batch_tokens)[:, None]
        slot = self.tables.slot[:, 0][experts.astype(np.int64)]
        sent, below, past, m = (t[micro_batch, slot] for t in tables)
        j = plan.positions - sent
        return xp.where(j < m, below, past) + j


__all__ = ["MoeLayer"]
