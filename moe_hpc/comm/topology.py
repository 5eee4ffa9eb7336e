"""Ranks, nodes and communicators: every communicator the run uses, made once, in one value.

Who does what (the role formula) is ``config/roles.py``, a pure function the planner shares;
this module turns it into MPI communicators.  With ``parallel.expert_tp = t`` consecutive expert
ranks form tensor-parallel groups of t that share one placement slot: rank j*t (the slot's
leader) receives the slot's tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config.roles import RoleLayout, check_layout
from ..config.run_config import Config
from ..device.threads import usable_cores
from .agree import agree_min


@dataclass
class Topology:
    """The communicators of one run. Library code receives this; nothing else reaches for
    ``MPI.COMM_WORLD``.

    world:    all ranks (a duplicate, so our traffic never matches a user's)
    node:     ranks sharing this node's memory (from ``Split_type(COMM_TYPE_SHARED)``)
    group:    this rank's data-parallel group (all ranks when dp = 1)
    dense:    the group's dense ranks (None on expert-only ranks)
    expert:   the group's expert ranks (None on dense-only ranks)
    tp:       this expert rank's tensor-parallel group (None when expert_tp = 1 or not expert)
    dense_tp: this dense rank's tensor-parallel group (None when dense_tp = 1 or not dense)
    exchange: the group again; carries the token dispatch/combine traffic only
    roles:    role layout in group ranks
    """
    world: object
    node: object
    group: object
    dense: object | None
    expert: object | None
    tp: object | None
    exchange: object
    roles: RoleLayout
    node_of_rank: tuple[int, ...]
    gpus_per_node: int
    dp: int = 1
    expert_tp: int = 1
    dense_tp_comm: object | None = None

    @property
    def rank(self) -> int:
        return self.world.Get_rank()

    @property
    def size(self) -> int:
        return self.world.Get_size()

    @property
    def group_rank(self) -> int:
        return self.group.Get_rank()

    @property
    def dp_index(self) -> int:
        return self.rank // self.group.Get_size()

    @property
    def is_dense(self) -> bool:
        return self.group_rank in self.roles.dense_ranks

    @property
    def is_expert(self) -> bool:
        return self.group_rank in self.roles.expert_ranks

    @property
    def local_rank(self) -> int:
        return self.node.Get_rank()

    @property
    def expert_index(self) -> int:
        """Position of this rank among its group's expert ranks."""
        return self.roles.expert_ranks.index(self.group_rank)

    @property
    def expert_slot(self) -> int:
        """The placement index ("expert GPU") this rank serves; TP partners share it."""
        return self.expert_index // self.expert_tp

    @property
    def tp_rank(self) -> int:
        return self.expert_index % self.expert_tp

    @property
    def num_expert_slots(self) -> int:
        return len(self.roles.expert_ranks) // self.expert_tp

    @property
    def slot_leaders(self) -> tuple[int, ...]:
        """Exchange rank that receives the tokens of each placement slot."""
        return self.roles.expert_ranks[::self.expert_tp]

    @property
    def dense_index(self) -> int:
        """This dense rank's sequence owner among all of the run's (its dense TP group's index,
        over every data-parallel group)."""
        return self.dp_index * self.roles.dense_groups + self.roles.dense_group_of(self.group_rank)[0]

    @property
    def is_dense_leader(self) -> bool:
        """A dense rank that routes its group's tokens and writes its output (every dense rank
        when dense_tp = 1)."""
        return self.is_dense and self.roles.dense_group_of(self.group_rank)[1] == 0

    @property
    def dense_world_ranks(self) -> tuple[int, ...]:
        """World ranks of every dense rank of every group, in sequence-ownership order."""
        G = self.group.Get_size()
        return tuple(g * G + d for g in range(self.dp) for d in self.roles.dense_ranks)

    @property
    def stage(self) -> int:
        """This dense rank's pipeline stage (0 when dense_stages = 1)."""
        return self.roles.stage_of(self.group_rank)

    def stage_peer(self, stage: int) -> int:
        """Group rank of this dense rank's counterpart in another stage (same pipeline, same TP
        position): where its activations come from and go to."""
        return self.roles.stage_peer(self.group_rank, stage)

    @property
    def writes_output(self) -> bool:
        """The dense ranks that write: the leaders of the last stage's TP groups."""
        return self.is_dense_leader and self.stage == self.roles.dense_stages - 1

    @property
    def num_dense(self) -> int:
        """Sequence owners in the run: dense TP groups over all data-parallel groups."""
        return self.dp * self.roles.dense_groups

    def describe(self) -> dict:
        return {"world_size": self.size, "nodes": len(set(self.node_of_rank)),
                "gpus_per_node": self.gpus_per_node, "dp": self.dp, "expert_tp": self.expert_tp,
                "dense_tp": self.roles.dense_tp, "dense_stages": self.roles.dense_stages,
                "group_dense_ranks": list(self.roles.dense_ranks),
                "group_expert_ranks": list(self.roles.expert_ranks),
                "node_of_rank": list(self.node_of_rank)}

    def free(self) -> None:
        for comm in (self.exchange, self.dense_tp_comm, self.tp, self.expert, self.dense, self.group, self.node,
                     self.world):
            if comm is not None:
                comm.Free()


def _node_ids(world, node) -> tuple[int, ...]:
    """Number the nodes 0.. by their lowest world rank, the same on every rank."""
    leader = agree_min(node, world.Get_rank())
    leaders = world.allgather(leader)
    order = {lead: i for i, lead in enumerate(sorted(set(leaders)))}
    return tuple(order[lead] for lead in leaders)


def _mpi():
    from mpi4py import MPI
    return MPI


def build_topology(comm, cfg: Config) -> Topology:
    """Make every communicator once. Collective over ``comm``."""
    MPI = _mpi()
    p = cfg.parallel
    world = comm.Dup()
    node = world.Split_type(MPI.COMM_TYPE_SHARED, key=world.Get_rank())
    roles = check_layout(world.Get_size(), p.dp, p.dense_ranks, p.expert_tp, p.dense_tp, p.dense_stages)
    rank = world.Get_rank()
    group_size = world.Get_size() // p.dp
    group = world.Split(rank // group_size, key=rank)
    g = group.Get_rank()
    split = lambda member, color=0: _none_if_null(group.Split(color if member else MPI.UNDEFINED, key=g))
    dense = split(g in roles.dense_ranks)
    expert = split(g in roles.expert_ranks)
    tp = None
    if p.expert_tp > 1:
        index = roles.expert_ranks.index(g) if g in roles.expert_ranks else -1
        tp = split(index >= 0, index // p.expert_tp)
    dense_tp = None
    if p.dense_tp > 1:
        is_dense = g in roles.dense_ranks
        dense_tp = split(is_dense, roles.stage_of(g) * roles.dense_groups + roles.dense_group_of(g)[0] if is_dense else 0)
    node_of_rank = _node_ids(world, node)
    gpus_per_node = p.gpus_per_node or max(world.allgather(node.Get_size()))
    return Topology(world=world, node=node, group=group, dense=dense, expert=expert, tp=tp,
                    exchange=group.Dup(), roles=roles, node_of_rank=node_of_rank,
                    gpus_per_node=gpus_per_node, dp=p.dp, expert_tp=p.expert_tp, dense_tp_comm=dense_tp)


def ranks_sharing_cores(node) -> tuple[int, int]:
    """-> (cores the ranks of this node may run on together, ranks sharing them). The union of
    the ranks' affinity masks, so ranks bound to one core each get one core each, and unbound
    ranks split the node. Collective over ``node`` (the shared-memory communicator)."""
    cores = set().union(*node.allgather(usable_cores()))
    return len(cores), node.Get_size()


def _none_if_null(comm):
    return None if comm == _mpi().COMM_NULL else comm


__all__ = ["Topology", "build_topology", "ranks_sharing_cores"]
