"""Dispatch planning: which rank each (token, choice) goes to, in which micro-batch, and the
permutation that groups a step's rows by (micro-batch, destination rank, slot there).

Experts are named by flat id m*E + e over all MoE blocks, so one exchange can carry tokens of
several blocks at once (the cross-layer pipeline). Counts are per (rank, slot on that rank),
not per expert: at 3,904 ranks a per-expert count matrix would be 3,712 times larger. A
replicated expert's tokens are spread over its replicas by global token index (sequence * L +
position) modulo the replica count: data-dependent only, never split-dependent; a load
balancer may choose instead (``replica``). Array functions on the ``xp`` seam; the micro-batch
count and the step's row layouts (``DispatchLayout``) have their one home here too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..comm.agree import agree_max
from ..comm.exchange import RowLayout, displacements, peer_major, slot_capacity, slot_major
from ..device.kernels import dispatch_plan
from ..model.experts import LocalExperts


@dataclass
class RouteTables:
    """Where each flat expert lives. holders: [F, R] exchange ranks (-1 padded); replicas: [F];
    slot: [F, R] index of the expert among its holder's hosted experts; num_slots: most experts
    any rank hosts (the width of every count row)."""
    holders: object
    replicas: object
    slot: object
    num_slots: int


def route_tables(placement, slot_leaders) -> RouteTables:
    """Placement + the exchange rank of each placement slot -> RouteTables (NumPy). Replica r of
    an expert is ``placement.replicas(...)[r]``, the numbering a load balancer uses too."""
    hosted = placement.hosted()
    slot_in = [{f: j for j, f in enumerate(ids)} for ids in hosted]
    E = placement.num_experts
    rows = [placement.ranks[m][e] for m in range(placement.num_moe_layers) for e in range(E)]
    most = max((len(h) for h in rows), default=1)
    holders = np.full((len(rows), most), -1, dtype=np.int64)
    slots = np.zeros((len(rows), most), dtype=np.int64)
    for f, gs in enumerate(rows):
        holders[f, :len(gs)] = [slot_leaders[g] for g in gs]
        slots[f, :len(gs)] = [slot_in[g][f] for g in gs]
    replicas = np.array([len(h) for h in rows], dtype=np.int64)
    return RouteTables(holders, replicas, slots, max(1, max((len(h) for h in hosted), default=1)))


@dataclass
class DispatchPlan:
    """order:     [T*k] flat (token*k + choice) indices, sorted by (micro-batch, rank, slot)
    positions: [T, k] row of each (token, choice) in its micro-batch's send order
    rows:      [T*k] token row of each send row (order // k), where the arrays live (the GPU's or the host)
    counts:    [micro_batches, P, num_slots] host int64
    starts:    [micro_batches + 1] host, where each micro-batch begins in ``order``"""
    order: object
    positions: object
    counts: np.ndarray
    starts: np.ndarray
    rows: object = None


def plan_dispatch(experts, token_ids, tables: RouteTables, micro_batch_tokens: int,
                  micro_batches: int, world_size: int, xp=np, to_host=np.asarray,
                  replica=None) -> DispatchPlan:
    """experts: [T, k] flat expert ids; token_ids: [T] int64; tables on the same device.

    One counting sort for the whole step (``kernels.dispatch_plan``: three launches on the GPU),
    so the host learns every micro-batch's counts in a single small device-to-host copy, the
    layer's only one before its micro-batches start. The send rows' token rows are launched
    before that copy, so the device computes them while the host waits, not after.
    """
    P, S = world_size, tables.num_slots
    order, positions, counts = dispatch_plan(xp.asarray(experts, dtype=np.int64), token_ids, tables.holders,
                                             tables.replicas, tables.slot, micro_batch_tokens, micro_batches,
                                             P, S, replica)
    rows = (order // experts.shape[1]).astype(np.int64)
    counts = to_host(counts).reshape(micro_batches, P, S)
    starts = np.append(displacements(counts.sum(axis=(1, 2))), counts.sum())
    return DispatchPlan(order, positions, counts, starts, rows)


def micro_batch_count(comm, rows: int, micro_batch_tokens: int) -> int:
    """Collective over ``comm``: micro-batches of an exchange step (or of a balancer's routing),
    the busiest rank's, so every rank runs the same loop and the collectives match."""
    return agree_max(comm, math.ceil(rows / micro_batch_tokens))


@dataclass
class DispatchLayout:
    """One exchange step's row layouts, micro-batch by micro-batch: ``sends[i]`` peer-major (what
    this rank packs and gets back at the combine), ``receives[i]`` slot-major over the slots that
    received rows (what its experts read; only those get buffer space and GEMM work)."""
    sends: list[RowLayout]
    receives: list[RowLayout]


def dispatch_layout(send_counts, recv_counts, num_slots: int, hosted: int) -> DispatchLayout:
    """send_counts, recv_counts: [nmb, P, slots] rows this rank sends / receives per (peer, slot);
    num_slots: the width of every count row; hosted: the slots this rank's experts fill."""
    return DispatchLayout([peer_major(c) for c in send_counts],
                          [_receive_layout(c, num_slots, hosted) for c in recv_counts])


def _receive_layout(counts, num_slots: int, hosted: int) -> RowLayout:
    slots = np.full(num_slots, -1, dtype=np.int64)
    own = LocalExperts.active_slots(counts, hosted)
    slots[:own.size] = own
    return slot_major(counts, slots, slot_capacity(counts[:, slots >= 0]))


__all__ = ["RouteTables", "route_tables", "DispatchPlan", "plan_dispatch", "micro_batch_count", "DispatchLayout",
           "dispatch_layout"]
