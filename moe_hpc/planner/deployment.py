"""Deployment planner: who runs what where, as one value (``Deployment``) and a rank table.

Pure functions of (run config, cluster).  The deployment calls the runner's own
``role_layout`` and ``make_placement`` (never a copy), so a plan cannot disagree with a run.
Data parallelism (``deployment.data_parallel = R``, the runner's ``parallel.dp``) is R
contiguous blocks of ranks, each an independent run of N/R ranks with its own expert set and
its share of the sequences; exchanges stay inside a block.

Routing is assumed uniform over experts (the bench's random gate is), replicated experts get
their tokens split evenly (token index modulo replicas), and the busiest GPU sets the pace.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ..config.cluster import Cluster
from ..config.errors import ConfigError
from ..config.roles import RoleLayout, dense_gpus, role_layout, stage_blocks
from ..config.run_config import Config, ModelConfig
from ..placement.file import make_placement
from ..placement.table import Placement, gpu_to_node


@dataclass(frozen=True)
class Deployment:
    """R replicas of one run: ``roles`` and ``placement`` describe replica 0's local ranks."""
    model: ModelConfig
    world_size: int
    gpus_per_node: int
    replicas: int
    roles: RoleLayout
    placement: Placement

    @property
    def group_size(self) -> int:
        return self.world_size // self.replicas

    def world_rank(self, replica: int, local: int) -> int:
        return replica * self.group_size + local

    def node(self, rank: int) -> int:
        return gpu_to_node(rank, self.gpus_per_node)

    def hosted(self, expert_rank: int) -> list[tuple[int, int]]:
        """Expert-rank index -> its (block, expert) pairs (the placement's inverse map)."""
        return self.placement.experts_on(expert_rank)

    @cached_property
    def expert_index(self) -> dict[int, int]:
        """Local rank -> its position among the expert ranks (the placement's GPU index)."""
        return {rank: i for i, rank in enumerate(self.roles.expert_ranks)}

    @property
    def routers(self) -> tuple[int, ...]:
        """One local rank per sequence owner (a pipeline): the leaders of the first stage's TP
        groups. Each block's tokens are routed by as many ranks (its stage's leaders)."""
        return self.roles.dense_ranks[:self.roles.per_stage:self.roles.dense_tp]

    def routers_of(self, layer: int) -> tuple[int, ...]:
        """The ranks that route block ``layer``'s tokens: the TP leaders of the stage holding it
        (the same count as ``routers``, on that stage's GPUs: what the link model sends from)."""
        roles, per = self.roles, self.roles.per_stage
        stage = next(s for s, blocks in enumerate(stage_blocks(self.model.num_layers, roles.dense_stages))
                     if layer in blocks)
        return roles.dense_ranks[stage * per:(stage + 1) * per:roles.dense_tp]

    @cached_property
    def dense_set(self) -> frozenset[int]:
        return frozenset(self.roles.dense_ranks)

    @cached_property
    def routing(self) -> tuple[np.ndarray, np.ndarray]:
        """(share, count), both [M, X]: the fraction of one dense rank's routed rows that expert
        rank g receives in MoE layer m (1 / (E * replicas) per (expert, replica) it holds), and
        how many experts of layer m it holds."""
        shape = (self.placement.num_moe_layers, self.placement.num_expert_ranks)
        if not shape[0]:
            return np.zeros(shape), np.zeros(shape, dtype=np.int64)
        table = self.placement.rank_table()                        # [M, E, R], -1 padded
        held = table >= 0
        reps = held.sum(axis=2, keepdims=True)
        share, count = np.zeros(shape), np.zeros(shape, dtype=np.int64)
        m_idx = np.broadcast_to(np.arange(table.shape[0])[:, None, None], table.shape)[held]
        weight = np.broadcast_to(1.0 / (self.model.num_experts * reps), table.shape)[held]
        np.add.at(share, (m_idx, table[held]), weight)
        np.add.at(count, (m_idx, table[held]), 1)
        return share, count


def replicas_of(cfg: Config, cluster: Cluster) -> int:
    """Data-parallel replicas of the plan: the cluster's ``deployment.data_parallel`` when it
    says more than 1, else the config's ``parallel.dp`` (what a run of this config does); two
    different counts above 1 are an error naming both."""
    dep, dp = cluster.deployment.data_parallel, cfg.parallel.dp
    if dep > 1 and dp > 1 and dep != dp:
        raise ConfigError(f"{cluster.source}: deployment.data_parallel = {dep} but the config's parallel.dp = {dp}; "
                          "set one of them")
    return dep if dep > 1 else dp


def make_layout(cfg: Config, cluster: Cluster, placement_kind: str | None = None) -> Deployment:
    """Config + cluster -> Deployment, through the runner's role_layout and make_placement."""
    where = cluster.source
    replicas = replicas_of(cfg, cluster)
    dense = dense_gpus(cluster, cfg.parallel.dense_ranks, replicas)
    if dense % replicas:
        raise ConfigError(f"{where}: deployment.dense_gpus ({dense}) must be a multiple of the "
                          f"{replicas} data-parallel replica(s)")
    if cluster.num_gpus % replicas:
        raise ConfigError(f"{where}: parallel.dp = {replicas} does not divide the cluster's {cluster.num_gpus} GPUs")
    group = cluster.num_gpus // replicas
    if dense // replicas >= group:
        raise ConfigError(f"{where}: deployment.dense_gpus ({dense}) leaves no expert GPU among the "
                          f"{group} GPUs of each of the {replicas} replica(s)")
    p = cfg.parallel
    roles = role_layout(group, dense // replicas, p.dense_tp, p.dense_stages)
    if len(roles.dense_ranks) % (p.dense_tp * p.dense_stages):
        raise ConfigError(f"{where}: parallel.dense_tp x parallel.dense_stages = {p.dense_tp} x {p.dense_stages} "
                          f"does not divide the {len(roles.dense_ranks)} dense GPU(s) of each replica")
    placement = make_placement(cfg.model, len(roles.expert_ranks), placement_kind or cfg.parallel.placement)
    return Deployment(cfg.model, cluster.num_gpus, cluster.gpus_per_node, replicas, roles, placement)


# ---------------------------------------------------------------------------- rank table

@dataclass(frozen=True)
class RankRow:
    """One world rank: where it sits and what it runs. expert_rank -1: hosts no experts."""
    rank: int
    node: int
    local_gpu: int
    replica: int
    role: str
    expert_rank: int
    experts: tuple[tuple[int, int], ...]    # (block, expert) pairs
    dense_part: str = ""                    # stage and TP position of a split dense side ("s1 tp0")


def rank_rows(layout: Deployment) -> list[RankRow]:
    """Every world rank, replica-major: [world_size] rows."""
    rows = []
    for rank in range(layout.world_size):
        replica, local = divmod(rank, layout.group_size)
        g = layout.expert_index.get(local, -1)
        rows.append(RankRow(rank, layout.node(rank), rank % layout.gpus_per_node, replica, layout.roles.role_of(local),
                            g, tuple(layout.hosted(g)) if g >= 0 else (), layout.roles.dense_part(local)))
    return rows


# ---------------------------------------------------------------------------- workload


# ---------------------------------------------------------------------------- FLOPs


# ---------------------------------------------------------------------------- memory


__all__ = ["Deployment", "make_layout", "RankRow", "rank_rows"]
