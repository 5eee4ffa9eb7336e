"""Dispatch planning: which rank each (token, choice) goes to, in which micro-batch, and the
permutation that groups a block's rows by (micro-batch, destination rank, expert).

Array functions on the ``xp`` seam (the plan is made where the routing is), no MPI.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .exchange import displacements


@dataclass
class DispatchPlan:
    """order:     [T*k] flat (token*k + choice) indices, sorted by (micro-batch, rank, expert)
    positions: [T, k] row of each (token, choice) in its micro-batch's send order
    counts:    [micro_batches, P, E] host int64, rows per (micro-batch, rank, expert)
    starts:    [micro_batches + 1] host, where each micro-batch begins in ``order``"""
    order: object
    positions: object
    counts: np.ndarray
    starts: np.ndarray


def replica_table(placement, layer: int, rank_of_expert_index) -> tuple[np.ndarray, np.ndarray]:
    """-> holders [E, R] world ranks (-1 padded), replicas [E] for block ``layer``."""
    E = placement.num_experts
    rows = [placement.replicas(layer, e) for e in range(E)]
    most = max(len(r) for r in rows)
    holders = np.full((E, most), -1, dtype=np.int64)
    for e, r in enumerate(rows):
        holders[e, :len(r)] = [rank_of_expert_index[g] for g in r]
    return holders, np.array([len(r) for r in rows], dtype=np.int64)


def destinations(experts, token_ids, holders, replicas, xp=np, replica=None):
    """[T, k] experts -> [T*k] destination ranks. By default a replicated expert's tokens are
    spread over its replicas by global token index (sequence*L + position): data-dependent only,
    never split-dependent. ``replica`` [T, k] overrides the choice (the load balancer's)."""
    flat = experts.reshape(-1).astype(np.int64)
    if replica is None:
        pick = xp.repeat(token_ids, experts.shape[1]) % replicas[flat]
    else:
        pick = xp.asarray(replica).reshape(-1)
    return holders[flat, pick]


def plan_dispatch(experts, token_ids, holders, replicas, micro_batch_tokens: int,
                  micro_batches: int, world_size: int, num_experts: int, xp=np, to_host=np.asarray,
                  replica=None) -> DispatchPlan:
    """experts: [T, k] int; token_ids: [T] int64; holders, replicas: from ``replica_table``;
    replica: [T, k] chosen replica of each choice, or None for the default spread.

    One sort and one count for the whole block, so the host learns every micro-batch's counts
    in a single device-to-host copy.
    """
    T, k = experts.shape
    P, E = world_size, num_experts
    flat = experts.reshape(-1).astype(np.int64)
    micro_batch = xp.repeat(xp.arange(T, dtype=np.int64) // micro_batch_tokens, k)
    keys = (micro_batch * P + destinations(experts, token_ids, holders, replicas, xp, replica)) * E + flat
    order = xp.argsort(keys, kind="stable") if xp is np else xp.argsort(keys)   # CuPy's sort is a stable radix sort
    counts = to_host(xp.bincount(keys, minlength=micro_batches * P * E)).reshape(micro_batches, P, E)
    starts = np.append(displacements(counts.sum(axis=(1, 2))), counts.sum())
    rank_in_order = xp.empty_like(order)
    rank_in_order[order] = xp.arange(order.size, dtype=order.dtype)
    positions = (rank_in_order - xp.asarray(starts)[micro_batch]).reshape(T, k)
    return DispatchPlan(order, positions, counts, starts)


__all__ = ["DispatchPlan", "plan_dispatch", "replica_table", "destinations"]
