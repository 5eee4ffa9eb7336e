"""The EPLB-style greedy baseline: placement by token load alone, layer by layer.

In the style of deepseek-ai/EPLB's ``eplb.py``: one algorithm per pure function, arrays in and
arrays (or a Placement) out; ``greedy_placement`` comes last (``search.plan_placements`` runs it
beside the formula and the optimiser).

The greedy baseline is EPLB's hierarchical policy applied layer by layer inside the formula's
layout (each layer keeps the GPUs, and the number of copies per GPU, that the formula gives
it): pack groups of co-activated experts to nodes, replicate the heaviest experts, pack the
copies to GPUs; all by token load alone.  The optimiser (``optimise.py``) may use the same
per-GPU memory freely across layers and knows the links.
"""
from __future__ import annotations

import heapq
from collections import Counter

import numpy as np

from ..config.cluster import GIB, Cluster
from ..config.errors import ConfigError
from ..config.run_config import ModelConfig
from .table import Placement
from .traces import Trace

GROUPS_PER_NODE = 4         # the greedy's packing granularity: co-activation groups per node
SEARCH_STEPS = 2000         # local search attempts: most of the gain at 64 and 512 GPUs (converged at 3,904)


def expert_bytes(model: ModelConfig) -> int:
    """bf16 bytes of one expert: w1 [H, F], b1 [F], w2 [F, H], b2 [H]."""
    H, F = model.hidden_size, model.moe_ffn_hidden_size
    return 2 * (2 * H * F + F + H)


def expert_slots(cluster: Cluster, model: ModelConfig) -> int:
    """Experts one GPU can hold within ``gpu.expert_memory_fraction`` of its memory."""
    gpu = cluster.gpu
    return int(gpu.memory_gib * GIB * gpu.expert_memory_fraction // expert_bytes(model))


def slot_budget(formula: Placement, cluster: Cluster, model: ModelConfig) -> int:
    """Expert copies one GPU may hold: as many as the formula's busiest GPU (the same memory,
    so one expert per GPU whenever the formula has one), checked against the GPU's memory."""
    per_gpu = Counter(g for row in formula.ranks for holders in row for g in holders)
    slots = max(per_gpu.values())
    fits = expert_slots(cluster, model)
    if fits < slots:
        raise ConfigError(f"{cluster.source}: gpu.memory_gib = {cluster.gpu.memory_gib} "
                          f"holds {fits} experts of {expert_bytes(model) / 1e6:.1f} MB per GPU, "
                          f"the layout needs {slots}")
    return slots


def replicate_experts(weight: np.ndarray, num_copies: int, most: int) -> np.ndarray:
    """Give ``num_copies`` copies to ``n`` experts, each extra copy to the expert with the most
    tokens per copy (at most ``most`` copies each).

    Parameters:
        weight: [n], tokens of each expert
    Returns:
        count: [n] int, copies of each expert (>= 1, summing to min(num_copies, n * most))
    """
    count = np.ones(weight.shape[0], np.int64)
    heap = [(-float(w), i) for i, w in enumerate(weight) if most > 1]
    heapq.heapify(heap)
    for _ in range(num_copies - weight.shape[0]):
        if not heap:
            break
        _, i = heapq.heappop(heap)
        count[i] += 1
        if count[i] < most:
            heapq.heappush(heap, (-float(weight[i]) / count[i], i))
    return count


def balanced_packing(weight: np.ndarray, capacity: np.ndarray, keys: np.ndarray | None = None,
                     prior: np.ndarray | None = None) -> np.ndarray:
    """Pack items into packs of given capacity, heaviest first onto the least loaded pack with
    room (never two items of one key in a pack while another pack has room).

    Parameters:
        weight: [n], the weight of each item; capacity: [packs], items each pack takes
        keys: [n] or None, e.g. the expert of each copy
        prior: [packs] or None, load from earlier layers: breaks ties, so that the same pack
            does not take every layer's heaviest item
    Returns:
        pack_index: [n], the pack of each item
    """
    load = np.zeros(capacity.shape[0])
    room = capacity.astype(np.int64).copy()
    key = np.zeros(weight.shape[0], np.int64) if keys is None else np.unique(keys, return_inverse=True)[1]
    held = np.zeros((int(key.max(initial=0)) + 1, room.shape[0]), bool)   # [keys, packs]
    prior = np.zeros(room.shape[0]) if prior is None else prior
    pack = np.full(weight.shape[0], -1, np.int64)
    for i in np.argsort(-weight, kind="stable"):
        ok = room > 0
        if keys is not None and (ok & ~held[key[i]]).any():
            ok &= ~held[key[i]]
        c = np.flatnonzero(ok)
        j = int(c[np.lexsort((prior[c], load[c]))[0]])
        pack[i], load[j], room[j] = j, load[j] + weight[i], room[j] - 1
        held[key[i], j] = True
    return pack


def coactivation_groups(coact: np.ndarray, weight: np.ndarray, group_size: int) -> np.ndarray:
    """Group experts that are chosen together: seed each group with the heaviest expert left,
    then add the expert most often co-chosen with the group so far.

    Parameters:
        coact: [E, E] tokens choosing both; weight: [E] tokens per expert
    Returns:
        group: [E], the group of each expert (groups of ``group_size``, the last may be smaller)
    """
    E = weight.shape[0]
    group = np.full(E, -1, np.int64)
    g = 0
    while (group < 0).any():
        free = np.flatnonzero(group < 0)
        members = [int(free[np.argmax(weight[free])])]
        group[members[0]] = g
        while len(members) < group_size and (group < 0).any():
            free = np.flatnonzero(group < 0)
            tie = coact[np.ix_(members, free)].sum(axis=0) * (weight.sum() + 1) + weight[free]
            members.append(int(free[np.argmax(tie)]))
            group[members[-1]] = g
        g += 1
    return group


def greedy_layer(weight: np.ndarray, coact: np.ndarray, frame: list[int], gpus_per_node: int,
                 prior: np.ndarray) -> list[tuple]:
    """EPLB's hierarchical policy for one layer inside its formula layout.

    Parameters:
        weight: [E] tokens per expert; coact: [E, E]
        frame: the layer's copy slots, one GPU id per slot (a GPU may appear several times)
        prior: [num_gpus] tokens given to each GPU by earlier layers (updated here)
    Returns:
        holders: per expert, the tuple of GPUs holding a copy
    """
    E = weight.shape[0]
    gpu_slots = Counter(frame)
    gpus = np.array(sorted(gpu_slots))
    nodes = sorted({g // gpus_per_node for g in gpus})
    node_gpus = {n: gpus[gpus // gpus_per_node == n] for n in nodes}
    node_slots = {n: sum(gpu_slots[g] for g in node_gpus[n]) for n in nodes}
    per_node = E // len(nodes)
    hierarchical = (E % len(nodes) == 0 and len(set(node_slots.values())) == 1
                    and all(per_node >= len(node_gpus[n]) for n in nodes))
    if not hierarchical:          # EPLB's fallback: one pseudo-node spanning every GPU
        nodes, node_gpus, node_slots, per_node = [0], {0: gpus}, {0: len(frame)}, E
    # step 1: groups of co-activated experts to nodes, GROUPS_PER_NODE to a node where possible
    size = per_node // GROUPS_PER_NODE if per_node % GROUPS_PER_NODE == 0 else 1
    group = coactivation_groups(coact, weight, size)
    group_load = np.bincount(group, weights=weight)
    node_prior = np.array([prior[node_gpus[n]].sum() for n in nodes])
    group_node = balanced_packing(group_load, np.full(len(nodes), per_node // size), prior=node_prior)
    holders: list[list[int]] = [[] for _ in range(E)]
    for i, n in enumerate(nodes):
        experts = np.flatnonzero(group_node[group] == i)
        # step 2: replicate the heaviest within the node; step 3: pack copies to its GPUs
        count = replicate_experts(weight[experts], node_slots[n], len(node_gpus[n]))
        copy_expert = np.repeat(experts, count)
        copy_weight = weight[copy_expert] / np.repeat(count, count)
        capacity = np.array([gpu_slots[g] for g in node_gpus[n]])
        packed = balanced_packing(copy_weight, capacity, copy_expert, prior[node_gpus[n]])
        for e, w, j in zip(copy_expert, copy_weight, packed):
            holders[e].append(int(node_gpus[n][j]))
            prior[node_gpus[n][j]] += w
    return [tuple(sorted(h)) for h in holders]


def greedy_placement(formula: Placement, trace: Trace, gpus_per_node: int) -> Placement:
    """The load-only greedy baseline, every layer rebalanced inside the formula's layout."""
    weight = trace.expert_tokens.astype(np.float64)
    prior = np.zeros(formula.num_expert_ranks)
    ranks = tuple(tuple(greedy_layer(weight[m], trace.coactivation[m].astype(np.float64),
                                     [g for h in row for g in h], gpus_per_node, prior))
                  for m, row in enumerate(formula.ranks))
    return Placement(ranks, formula.num_expert_ranks, formula.first_moe_layer, "greedy")


__all__ = ["SEARCH_STEPS", "expert_bytes", "expert_slots", "slot_budget", "replicate_experts", "balanced_packing", "coactivation_groups",
           "greedy_layer", "greedy_placement"]
