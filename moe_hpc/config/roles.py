"""Who does what: the role formula, a pure function of the rank count (the planner uses it too).

The world is cut into ``parallel.dp`` groups of consecutive ranks, each a complete
expert-parallel deployment (data-parallel replicas).  Inside a group of G ranks, with
``parallel.dense_ranks = D > 0`` the last D ranks are dense ranks (attention, dense blocks,
gating) and ranks 0 .. G-D-1 host experts, so with dp = 1 "expert GPU g" of a placement is world
rank g and lives on node g // gpus_per_node.  With D = 0 every rank is both.  With
``parallel.dense_tp = T`` the dense ranks, in order, form groups of T that split every block's
attention by heads and the dense MLP by columns: a group owns a share of the sequences, its
first rank (the leader) routes the group's tokens to the experts and writes its output.  With
``parallel.dense_stages = P`` the dense ranks, in order, are cut into P stages, each running a
contiguous range of blocks (``stage_blocks``); one rank (or TP group) of every stage makes a
pipeline, and a pipeline owns a share of the sequences.
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
    dense_stages: int = 1            # pipeline stages the blocks are cut into

    @property
    def per_stage(self) -> int:
        return len(self.dense_ranks) // self.dense_stages

    @property
    def dense_groups(self) -> int:
        """Sequence owners: pipelines of ``dense_stages`` x ``dense_tp`` dense ranks that carry a
        share of the sequences through every block."""
        return self.per_stage // self.dense_tp

    def dense_group_of(self, rank: int) -> tuple[int, int]:
        """A dense rank -> (its pipeline, its position in its TP group); position 0 is the leader,
        the one that routes the group's tokens (and, in the last stage, writes its output)."""
        return divmod(self.dense_ranks.index(rank) % self.per_stage, self.dense_tp)

    def stage_of(self, rank: int) -> int:
        """A dense rank's pipeline stage: the dense ranks are cut into stages in order."""
        return self.dense_ranks.index(rank) // self.per_stage

    def stage_peer(self, rank: int, stage: int) -> int:
        """The dense rank in ``stage`` with the same pipeline and TP position as ``rank``."""
        return self.dense_ranks[stage * self.per_stage + self.dense_ranks.index(rank) % self.per_stage]

    @property
    def colocated(self) -> bool:
        return self.dense_ranks == self.expert_ranks

    def role_of(self, rank: int) -> str:
        dense, expert = rank in self.dense_ranks, rank in self.expert_ranks
        return "dense+expert" if dense and expert else ("dense" if dense else "expert")

    def dense_part(self, rank: int) -> str:
        """Where a dense rank sits when the dense side is split ("s1 tp0": stage 1, TP position
        0), "" otherwise: a column of both rank tables (the planner's and the dry run's)."""
        if rank not in self.dense_ranks:
            return ""
        return " ".join(([f"s{self.stage_of(rank)}"] if self.dense_stages > 1 else [])
                        + ([f"tp{self.dense_group_of(rank)[1]}"] if self.dense_tp > 1 else []))


def dense_gpus(cluster, dense_ranks: int, replicas: int = 1) -> int:
    """Dense-only GPUs of a deployment in all: the cluster's ``deployment.dense_gpus`` when it
    names them (>= 0), else the config's ``parallel.dense_ranks`` in every replica. What the
    planner, ``place`` and ``make-trace`` lay out."""
    given = cluster.deployment.dense_gpus
    return given if given >= 0 else dense_ranks * replicas


def stage_blocks(num_layers: int, stages: int) -> list[range]:
    """The blocks of each pipeline stage: contiguous, as even as they come (the later stages
    take one more when they do not divide). The runner and the planner both cut here."""
    return [range(s * num_layers // stages, (s + 1) * num_layers // stages) for s in range(stages)]


def check_layout(world_size: int, dp: int, dense_ranks: int, expert_tp: int, dense_tp: int = 1,
                 dense_stages: int = 1) -> RoleLayout:
    """Validate the parallel split of ``world_size`` ranks; -> the role layout of one group."""
    if world_size % dp:
        raise ConfigError(f"parallel.dp = {dp} does not divide the {world_size} rank(s)")
    roles = role_layout(world_size // dp, dense_ranks, dense_tp, dense_stages)
    if len(roles.expert_ranks) % expert_tp:
        raise ConfigError(f"parallel.expert_tp = {expert_tp} does not divide the "
                          f"{len(roles.expert_ranks)} expert rank(s) of each group")
    if len(roles.dense_ranks) % (dense_tp * dense_stages):
        raise ConfigError(f"parallel.dense_tp x parallel.dense_stages = {dense_tp} x {dense_stages} does not divide "
                          f"the {len(roles.dense_ranks)} dense rank(s) of each group (parallel.dense_ranks, or "
                          "every rank when co-located)")
    return roles


def role_layout(world_size: int, dense_ranks: int, dense_tp: int = 1, dense_stages: int = 1) -> RoleLayout:
    """Split ``world_size`` ranks into roles by the formula above; the dense ranks, in order,
    form tensor-parallel groups of ``dense_tp``."""
    if dense_ranks == 0:
        everyone = tuple(range(world_size))
        return RoleLayout(world_size, everyone, everyone, dense_tp, dense_stages)
    if dense_ranks >= world_size:
        raise ConfigError(f"parallel.dense_ranks = {dense_ranks} leaves no expert rank "
                          f"among {world_size} rank(s); use 0 (co-located) or fewer")
    n_expert = world_size - dense_ranks
    return RoleLayout(world_size, tuple(range(n_expert, world_size)), tuple(range(n_expert)), dense_tp, dense_stages)


__all__ = ["RoleLayout", "role_layout", "check_layout", "stage_blocks", "dense_gpus"]
