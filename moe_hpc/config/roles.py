"""Who does what: the role formula, a pure function of the rank count (the planner uses it too).

The world is cut into ``parallel.dp`` groups of consecutive ranks, each a complete
expert-parallel deployment (data-parallel replicas).  Inside a group of G ranks, with
``parallel.dense_ranks = D > 0`` the last D ranks are dense ranks (attention, dense blocks,
gating) and ranks 0 .. G-D-1 host experts, so with dp = 1 "expert GPU g" of a placement is world
rank g and lives on node g // gpus_per_node.  With D = 0 every rank is both.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class RoleLayout:
    """Pure description of who does what, computable without MPI (the planner uses it too)."""
    world_size: int
    dense_ranks: tuple[int, ...]     # world ranks that own sequences
    expert_ranks: tuple[int, ...]    # world ranks that host experts, in expert-rank order

    @property
    def colocated(self) -> bool:
        return self.dense_ranks == self.expert_ranks

    def role_of(self, rank: int) -> str:
        dense, expert = rank in self.dense_ranks, rank in self.expert_ranks
        return "dense+expert" if dense and expert else ("dense" if dense else "expert")


def check_layout(world_size: int, dp: int, dense_ranks: int, expert_tp: int) -> RoleLayout:
    """Validate the parallel split of ``world_size`` ranks; -> the role layout of one group."""
    if world_size % dp:
        raise ConfigError(f"parallel.dp = {dp} does not divide the {world_size} rank(s)")
    roles = role_layout(world_size // dp, dense_ranks)
    if len(roles.expert_ranks) % expert_tp:
        raise ConfigError(f"parallel.expert_tp = {expert_tp} does not divide the "
                          f"{len(roles.expert_ranks)} expert rank(s) of each group")
    return roles


def role_layout(world_size: int, dense_ranks: int) -> RoleLayout:
    """Split ``world_size`` ranks into roles by the formula above."""
    if dense_ranks == 0:
        everyone = tuple(range(world_size))
        return RoleLayout(world_size, everyone, everyone)
    if dense_ranks >= world_size:
        raise ConfigError(f"parallel.dense_ranks = {dense_ranks} leaves no expert rank "
                          f"among {world_size} rank(s); use 0 (co-located) or fewer")
    n_expert = world_size - dense_ranks
    return RoleLayout(world_size, tuple(range(n_expert, world_size)), tuple(range(n_expert)))


__all__ = ["RoleLayout", "role_layout", "check_layout"]
