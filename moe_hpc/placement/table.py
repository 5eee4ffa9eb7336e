"""Expert placement: which expert ranks ("GPUs") hold each (MoE layer, expert).

A placement is a value: a table ``ranks[m][e]`` (m = MoE layer index, l - first_dense_layers)
of replica tuples, printable, testable and saved into the output's provenance.  The runner and
the planner both build it here, so they can never disagree.

Seed formulas:
- disjoint (one GPU per expert per layer): g = m * E + e, node = g // gpus_per_node; with more
  expert ranks than m*E slots the extra ranks hold replicas g + r * (M * E); with fewer, slots
  wrap modulo the rank count (several experts per rank, only when forced).
- a file (``parallel.placement = "PLACEMENT.h5"``, from ``moe-hpc place``): any table of this
  shape, read and checked by ``file.py``, whose ``make_placement`` picks among the three.
- shared (every rank hosts the same expert index in every MoE layer): with X >= E ranks,
  rank g hosts expert g mod E (ranks past E are replicas); with X < E, rank g hosts every
  expert e with e mod X == g.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ..config.run_config import ModelConfig


@dataclass(frozen=True)
class Placement:
    """ranks[m][e]: tuple of expert-rank indices holding expert e of MoE layer m.

    num_expert_ranks: X, the expert ranks the table refers to (0 .. X-1)
    first_moe_layer:  block index of MoE layer m = 0
    """
    ranks: tuple[tuple[tuple[int, ...], ...], ...]
    num_expert_ranks: int
    first_moe_layer: int
    kind: str

    @property
    def num_moe_layers(self) -> int:
        return len(self.ranks)

    @property
    def num_experts(self) -> int:
        return len(self.ranks[0]) if self.ranks else 0

    def replicas(self, layer: int, expert: int) -> tuple[int, ...]:
        """Expert ranks holding expert ``expert`` of block ``layer`` (a block index)."""
        return self.ranks[layer - self.first_moe_layer][expert]

    @cached_property
    def _hosted(self) -> tuple[tuple[int, ...], ...]:
        out: list[list[int]] = [[] for _ in range(self.num_expert_ranks)]
        for m, row in enumerate(self.ranks):
            for e, holders in enumerate(row):
                for g in holders:
                    out[g].append(m * self.num_experts + e)
        return tuple(tuple(ids) for ids in out)

    def hosted(self) -> tuple[tuple[int, ...], ...]:
        """The inverse map: for each expert rank (slot), the flat ids m * E + e it holds,
        ascending. Computed once in one pass over the table (a search per rank would be
        quadratic at 3,904 ranks); every other view of "what does rank g hold" derives from it."""
        return self._hosted

    def experts_on(self, expert_rank: int) -> list[tuple[int, int]]:
        """The (block index, expert) pairs hosted by one expert rank."""
        return [(f // self.num_experts + self.first_moe_layer, f % self.num_experts)
                for f in self._hosted[expert_rank]]

    def rank_table(self):
        """[M, E, R] int array of holders, -1 padded (R = most replicas of any expert)."""
        most = max(len(h) for row in self.ranks for h in row)
        table = np.full((self.num_moe_layers, self.num_experts, most), -1, dtype=np.int64)
        for m, row in enumerate(self.ranks):
            for e, holders in enumerate(row):
                table[m, e, :len(holders)] = holders
        return table

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "num_expert_ranks": self.num_expert_ranks,
                           "first_moe_layer": self.first_moe_layer,
                           "ranks": [[list(h) for h in row] for row in self.ranks]})


def gpu_to_node(gpu: int, gpus_per_node: int) -> int:
    """The seeds' node formula: GPUs are numbered node-major."""
    return gpu // gpus_per_node


def disjoint_placement(model: ModelConfig, num_expert_ranks: int) -> Placement:
    """One GPU per (layer, expert): slot g = m*E + e, replicated or wrapped to fit X ranks."""
    M, E, X = model.num_moe_layers, model.num_experts, num_expert_ranks
    slots = M * E
    table = []
    for m in range(M):
        row = []
        for e in range(E):
            g = m * E + e
            holders = tuple(range(g, X, slots)) if X >= slots else (g % X,)
            row.append(holders)
        table.append(tuple(row))
    return Placement(tuple(table), X, model.first_dense_layers, "disjoint")


def shared_placement(model: ModelConfig, num_expert_ranks: int) -> Placement:
    """Expert e of every MoE layer lives on the same ranks: e, e+E, e+2E, ... (or e mod X)."""
    M, E, X = model.num_moe_layers, model.num_experts, num_expert_ranks
    row = tuple(tuple(range(e, X, E)) if X >= E else (e % X,) for e in range(E))
    return Placement(tuple(row for _ in range(M)), X, model.first_dense_layers, "shared")


__all__ = ["Placement", "gpu_to_node", "disjoint_placement", "shared_placement"]
