"""Ranks, nodes and roles: every communicator the run uses, made once, in one value.

Role formula (documented in docs/parallel.md): with ``parallel.dense_ranks = D > 0`` the last D
world ranks are dense ranks (attention, dense blocks, gating) and ranks 0 .. N-D-1 host experts,
so "expert GPU g" of a placement is world rank g and lives on node g // gpus_per_node.  With
D = 0 every rank is both: it runs attention for its share of sequences and hosts experts.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import Config
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


@dataclass
class Topology:
    """The communicators of one run. Library code receives this; nothing else reaches for
    ``MPI.COMM_WORLD``.

    world:    all ranks (a duplicate, so our traffic never matches a user's)
    node:     ranks sharing this node's memory (from ``Split_type(COMM_TYPE_SHARED)``)
    dense:    dense ranks only (None on expert-only ranks)
    expert:   expert ranks only (None on dense-only ranks)
    exchange: all ranks; carries the token dispatch/combine traffic only
    """
    world: object
    node: object
    dense: object | None
    expert: object | None
    exchange: object
    roles: RoleLayout
    node_of_rank: tuple[int, ...]
    gpus_per_node: int

    @property
    def rank(self) -> int:
        return self.world.Get_rank()

    @property
    def size(self) -> int:
        return self.world.Get_size()

    @property
    def is_dense(self) -> bool:
        return self.rank in self.roles.dense_ranks

    @property
    def is_expert(self) -> bool:
        return self.rank in self.roles.expert_ranks

    @property
    def local_rank(self) -> int:
        return self.node.Get_rank()

    @property
    def expert_index(self) -> int:
        """Position of this rank among the expert ranks (the placement's GPU index)."""
        return self.roles.expert_ranks.index(self.rank)

    def describe(self) -> dict:
        return {"world_size": self.size, "nodes": len(set(self.node_of_rank)),
                "gpus_per_node": self.gpus_per_node,
                "dense_ranks": list(self.roles.dense_ranks),
                "expert_ranks": list(self.roles.expert_ranks),
                "node_of_rank": list(self.node_of_rank)}

    def free(self) -> None:
        for comm in (self.exchange, self.expert, self.dense, self.node, self.world):
            if comm is not None:
                comm.Free()


def _node_ids(world, node) -> tuple[int, ...]:
    """Number the nodes 0.. by their lowest world rank, the same on every rank."""
    leader = node.allreduce(world.Get_rank(), op=_mpi().MIN)
    leaders = world.allgather(leader)
    order = {lead: i for i, lead in enumerate(sorted(set(leaders)))}
    return tuple(order[lead] for lead in leaders)


def _mpi():
    from mpi4py import MPI
    return MPI


def build_topology(comm, cfg: Config) -> Topology:
    """Make every communicator once. Collective over ``comm``."""
    MPI = _mpi()
    world = comm.Dup()
    node = world.Split_type(MPI.COMM_TYPE_SHARED, key=world.Get_rank())
    roles = role_layout(world.Get_size(), cfg.parallel.dense_ranks)
    rank = world.Get_rank()
    dense = world.Split(0 if rank in roles.dense_ranks else MPI.UNDEFINED, key=rank)
    expert = world.Split(0 if rank in roles.expert_ranks else MPI.UNDEFINED, key=rank)
    dense = None if dense == MPI.COMM_NULL else dense
    expert = None if expert == MPI.COMM_NULL else expert
    node_of_rank = _node_ids(world, node)
    gpus_per_node = cfg.parallel.gpus_per_node or max(world.allgather(node.Get_size()))
    return Topology(world=world, node=node, dense=dense, expert=expert, exchange=world.Dup(),
                    roles=roles, node_of_rank=node_of_rank, gpus_per_node=gpus_per_node)


__all__ = ["RoleLayout", "Topology", "role_layout", "build_topology"]
