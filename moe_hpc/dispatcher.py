"""Token dispatch planning: which rank each (token, choice) goes to, and the permutation
that groups a micro-batch's rows by destination. Pure array functions, no MPI."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class DispatchPlan:
    """order:       [n] flat assignment indices (token*k + j) sorted by destination rank
    expert_ids:  [n] int32 expert of each sent row, in send order
    send_counts: [P] rows to each rank"""
    order: np.ndarray
    expert_ids: np.ndarray
    send_counts: np.ndarray


def replica_table(placement, layer: int, rank_of_expert_index) -> tuple[np.ndarray, np.ndarray]:
    """-> holders [E, R] world ranks (-1 padded), replicas [E] for block ``layer``."""
    E = placement.num_experts
    rows = [placement.replicas(layer, e) for e in range(E)]
    most = max(len(r) for r in rows)
    holders = np.full((E, most), -1, dtype=np.int64)
    for e, r in enumerate(rows):
        holders[e, :len(r)] = [rank_of_expert_index[g] for g in r]
    return holders, np.array([len(r) for r in rows], dtype=np.int64)


def plan_dispatch(experts: np.ndarray, token_ids: np.ndarray, holders: np.ndarray,
                  replicas: np.ndarray, world_size: int, replica: np.ndarray | None = None) -> DispatchPlan:
    """experts: [T, k] chosen experts; token_ids: [T] global token index (sequence*L + pos);
    replica: [T, k] replica of each choice, or None for the default.

    By default a replicated expert's tokens are spread over its replicas by token index, which
    depends on the data only, never on how the run is split (the balancer picks its own).
    """
    T, k = experts.shape
    flat = experts.reshape(-1)
    pick = np.repeat(token_ids, k) % replicas[flat] if replica is None else replica.reshape(-1)
    dest = holders[flat, pick]
    order = np.lexsort((flat, dest))              # by destination, then expert within it
    return DispatchPlan(order, flat[order].astype(np.int32),
                        np.bincount(dest, minlength=world_size).astype(np.int64))


__all__ = ["DispatchPlan", "plan_dispatch", "replica_table"]
