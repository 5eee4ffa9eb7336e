"""Who does what: the role formula, a pure function of the rank count (the planner uses it too).

The world is cut into ``parallel.dp`` groups of consecutive ranks, each a complete
expert-parallel deployment (data-parallel replicas).  Inside a group of G ranks, with
``parallel.dense_ranks = D > 0`` the last D ranks are dense ranks (attention, dense blocks,
gating) and ranks 0 .. G-D-1 host experts, so with dp = 1 "expert GPU g" of a placement is world
rank g and lives on node g // gpus_per_node.  With D = 0 every rank is both.  With
``parallel.dense_tp = T`` the dense ranks, in order, form groups of T that split every block's
attention by heads and the dense MLP by columns: a group owns a share of the sequences, its
first rank (the leader) routes the group's tokens to the experts and writes its output.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class RoleLayout:
    """Pure description of who does what, computable without MPI (the planner uses it too)."""
    world_size: int
    dense_ranks: tuple[int, ...]     # world ranks that run attention and the dense blocks
    expert_ranks: tuple[int, ...]    # world ranks that host experts, in expert-rank order
    dense_tp: int = 1                # consecutive dense ranks per tensor-parallel group

    @property
    def dense_groups(self) -> int:
        """Sequence owners: groups of ``dense_tp`` dense ranks that share a chunk's sequences."""
        return len(self.dense_ranks) // self.dense_tp

    def dense_group_of(self, rank: int) -> tuple[int, int]:
        """A dense rank -> (its group, its position in the group); position 0 is the leader,
        the one that routes the group's tokens and writes its output."""
        return divmod(self.dense_ranks.index(rank), self.dense_tp)

    @property
    def colocated(self) -> bool:
        return self.dense_ranks == self.expert_ranks

    def role_of(self, rank: int) -> str:
        dense, expert = rank in self.dense_ranks, rank in self.expert_ranks
        return "dense+expert" if dense and expert else ("dense" if dense else "expert")


def check_layout(world_size: int, dp: int, dense_ranks: int, expert_tp: int, dense_tp: int = 1) -> RoleLayout:
    """Validate the parallel split of ``world_size`` ranks; -> the role layout of one group."""
    if world_size % dp:
        raise ConfigError(f"parallel.dp = {dp} does not divide the {world_size} rank(s)")
    roles = role_layout(world_size // dp, dense_ranks, dense_tp)
    if len(roles.expert_ranks) % expert_tp:
        raise ConfigError(f"parallel.expert_tp = {expert_tp} does not divide the "
                          f"{len(roles.expert_ranks)} expert rank(s) of each group")
    if len(roles.dense_ranks) % dense_tp:
        raise ConfigError(f"parallel.dense_tp = {dense_tp} does not divide the {len(roles.dense_ranks)} dense "
                          f"rank(s) of each group (parallel.dense_ranks, or every rank when co-located)")
    return roles


def role_layout(world_size: int, dense_ranks: int, dense_tp: int = 1) -> RoleLayout:
    """Split ``world_size`` ranks into roles by the formula above; the dense ranks, in order,
    form tensor-parallel groups of ``dense_tp``."""
    if dense_ranks == 0:
        everyone = tuple(range(world_size))
        return RoleLayout(world_size, everyone, everyone, dense_tp)
    if dense_ranks >= world_size:
        raise ConfigError(f"parallel.dense_ranks = {dense_ranks} leaves no expert rank "
                          f"among {world_size} rank(s); use 0 (co-located) or fewer")
    n_expert = world_size - dense_ranks
    return RoleLayout(world_size, tuple(range(n_expert, world_size)), tuple(range(n_expert)), dense_tp)


__all__ = ["RoleLayout", "role_layout", "check_layout"]
