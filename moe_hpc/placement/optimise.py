"""Topology-aware expert placement: minimise, summed over MoE layers, the tokens over each
layer's busiest node link; then spread every node's copies over its GPUs.

1. ``copy_counts``: every expert GPU holds up to ``slots`` copies (the formula's memory); the
   spare slots go to extra copies of the experts with the most tokens per copy, all layers
   competing (a hot expert of a skewed layer earns more copies than one of a flat layer);
2. ``construct``: heaviest copy first, onto the node where its layer's busiest node link ends
   lowest (ties: the least growth of that node's own peak, then the node with most room);
3. ``local_search``: for each layer's busiest node link, move a copy off it (or onto it, for an
   uplink: its sources' tokens then stay inside the node) or swap it with a copy of any layer,
   whenever the objective falls, or stays and the sum of squared node peaks falls (which
   walks plateaus and cannot cycle);
4. ``assign_gpus``: inside each node, heaviest copy first onto the GPU whose NVLink ports end
   lowest, then the least loaded GPU; one copy per GPU when ``slots`` is 1.

Node links all have one bandwidth, so steps 2-3 count tokens; the exact link model
(``links.py``) judges the result against the greedy baseline, and the better is returned.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..config.cluster import Cluster
from .greedy import replicate_experts
from .links import node_volumes, placement_metrics
from .table import Placement
from .traces import Trace

SEARCH_CANDIDATES = 4       # copies tried per layer bottleneck and round
SWAP_POOL_ALL = 8192        # up to this many copies, every copy is a swap partner
SWAP_POOL_NODES = 8         # beyond it, only copies on this many best target nodes


@dataclass(frozen=True)
class Copies:
    """P expert copies. layer, expert: [P]; vol: [P, N] tokens each node's sources send to the
    copy; total: [P]; key: [P] layer * E + expert."""
    layer: np.ndarray
    expert: np.ndarray
    vol: np.ndarray
    total: np.ndarray
    key: np.ndarray


@dataclass
class NodeState:
    """node: [P] node of each copy (-1: not placed); up, down, peak: [M, N] tokens over each
    node link of each layer; top_idx, top_val: [M, 3] the three highest peaks per layer;
    free: [N] slots left; hosted: [M * E, N] copies of each expert on each node."""
    node: np.ndarray
    up: np.ndarray
    down: np.ndarray
    peak: np.ndarray
    top_idx: np.ndarray
    top_val: np.ndarray
    free: np.ndarray
    hosted: np.ndarray

    @property
    def objective(self) -> float:
        return float(self.top_val[:, 0].sum())


def node_capacity(num_expert_ranks: int, gpus_per_node: int, nodes: int, slots: int) -> np.ndarray:
    """-> [nodes] copies each node can hold: its expert GPUs times ``slots``."""
    return np.bincount(np.arange(num_expert_ranks) // gpus_per_node, minlength=nodes) * slots


def copy_counts(weight: np.ndarray, total_slots: int, most: int) -> np.ndarray:
    """weight: [M, E] tokens -> [M, E] copies of each expert, filling ``total_slots``."""
    return replicate_experts(weight.reshape(-1), total_slots, most).reshape(weight.shape)


def make_copies(count: np.ndarray, volumes: np.ndarray) -> Copies:
    """count: [M, E] copies; volumes: [M, E, N] -> Copies, each taking 1/count of the tokens."""
    E = count.shape[1]
    key = np.repeat(np.arange(count.size), count.reshape(-1))
    layer, expert = key // E, key % E
    vol = volumes[layer, expert] / count[layer, expert][:, None]
    return Copies(layer, expert, vol, vol.sum(axis=1), key)


def refresh(state: NodeState, m: int) -> None:
    """Recompute layer m's peaks and its three highest."""
    state.peak[m] = np.maximum(state.up[m], state.down[m])
    order = np.argsort(-state.peak[m], kind="stable")[:3]
    state.top_idx[m] = -1
    state.top_val[m] = 0.0
    state.top_idx[m, :order.size] = order
    state.top_val[m, :order.size] = state.peak[m, order]


def empty_state(copies: Copies, source_out: np.ndarray, capacity: np.ndarray, num_keys: int) -> NodeState:
    """source_out: [M, N] tokens each node's sources send; nothing placed, so all of it leaves."""
    M, N = source_out.shape
    state = NodeState(np.full(copies.layer.shape[0], -1), source_out.astype(np.float64).copy(),
                      np.zeros((M, N)), np.zeros((M, N)), np.zeros((M, 3), np.int64),
                      np.zeros((M, 3)), capacity.astype(np.int64).copy(), np.zeros((num_keys, N), np.int64))
    for m in range(M):
        refresh(state, m)
    return state


def put(copies: Copies, state: NodeState, p: int, n: int, sign: int = 1) -> None:
    """Place copy p on node n (sign = -1: take it off). Only node n's links of its layer change."""
    m, v = copies.layer[p], copies.vol[p, n]
    state.up[m, n] -= sign * v
    state.down[m, n] += sign * (copies.total[p] - v)
    state.free[n] -= sign
    state.hosted[copies.key[p], n] += sign
    state.node[p] = n if sign > 0 else -1


def construct(copies: Copies, state: NodeState) -> NodeState:
    """Greedy: heaviest copy first, onto the node where its layer's busiest link ends lowest."""
    nodes = np.arange(state.free.shape[0])
    for p in np.argsort(-copies.total, kind="stable"):
        m, v, t = copies.layer[p], copies.vol[p], copies.total[p]
        new_peak = np.maximum(state.up[m] - v, state.down[m] + t - v)
        rest = np.where(nodes == state.top_idx[m, 0], state.top_val[m, 1], state.top_val[m, 0])
        ok = state.free > 0
        if (ok & (state.hosted[copies.key[p]] == 0)).any():     # copies of one expert apart
            ok &= state.hosted[copies.key[p]] == 0
        c = np.flatnonzero(ok)
        grow = new_peak[c] ** 2 - state.peak[m, c] ** 2
        best = c[np.lexsort((-state.free[c], grow, np.maximum(rest[c], new_peak[c])))[0]]
        put(copies, state, p, int(best))
        refresh(state, m)
    return state


def _rest(state: NodeState, layers: np.ndarray, a: int, b: np.ndarray) -> np.ndarray:
    """Highest peak of each given layer outside nodes a and b (vectors over candidates)."""
    idx, val = state.top_idx[layers], state.top_val[layers]
    keep = (idx != a) & (idx != b[:, None])
    return np.where(keep, val, 0.0).max(axis=1)


def _after(up, down, old_peak):
    """-> (new peak, growth of its square) of a node whose links become up, down."""
    peak = np.maximum(up, down)
    return peak, peak ** 2 - old_peak ** 2


def relocations(copies: Copies, state: NodeState, p: int):
    """Every move of copy p to a node with room, and every swap with a copy elsewhere.

    Returns (dF [C], dQ [C], target node [C], partner copy [C] or -1): the change of the
    objective and of the sum of squared peaks."""
    m, a, v, t = copies.layer[p], int(state.node[p]), copies.vol[p], copies.total[p]
    N, cur, key = state.free.shape[0], state.top_val[:, 0], copies.key[p]
    ua, da = state.up[m, a] + v[a], state.down[m, a] - (t - v[a])          # p taken off a
    pa, qa = _after(ua, da, state.peak[m, a])
    nodes = np.arange(N)
    pb, qb = _after(state.up[m] - v, state.down[m] + t - v, state.peak[m])  # p put on each b
    mv_F = np.maximum(np.maximum(_rest(state, np.full(N, m), a, nodes), pa), pb) - cur[m]
    mv_Q = qa + qb
    move_ok = (state.free > 0) & (state.hosted[key] == 0) & (nodes != a)
    pool = np.flatnonzero((state.node >= 0) & (state.node != a))
    if pool.size > SWAP_POOL_ALL:
        best_nodes = np.argsort(np.where(nodes == a, np.inf, mv_F), kind="stable")[:SWAP_POOL_NODES]
        pool = pool[np.isin(state.node[pool], best_nodes)]
    b, mq, tq = state.node[pool], copies.layer[pool], copies.total[pool]
    vqa, vqb = copies.vol[pool, a], copies.vol[pool, b]
    # q of another layer: layer m sees p's move, layer mq sees q go from b to a
    pqb, gqb = _after(state.up[mq, b] + vqb, state.down[mq, b] - (tq - vqb), state.peak[mq, b])
    pqa, gqa = _after(state.up[mq, a] - vqa, state.down[mq, a] + tq - vqa, state.peak[mq, a])
    other_F = mv_F[b] + np.maximum(np.maximum(_rest(state, mq, a, b), pqa), pqb) - cur[mq]
    other_Q = mv_Q[b] + gqa + gqb
    # q of the same layer: both moves land on the same two nodes of layer m
    psa, gsa = _after(ua - vqa, da + tq - vqa, state.peak[m, a])
    psb, gsb = _after(state.up[m, b] - v[b] + vqb, state.down[m, b] + (t - v[b]) - (tq - vqb),
                      state.peak[m, b])
    same_F = np.maximum(np.maximum(_rest(state, np.full(pool.size, m), a, b), psa), psb) - cur[m]
    same = mq == m
    sw_F, sw_Q = np.where(same, same_F, other_F), np.where(same, gsa + gsb, other_Q)
    swap_ok = (state.hosted[key, b] == 0) & (state.hosted[copies.key[pool], a] == 0) & (copies.key[pool] != key)
    return (np.concatenate([mv_F[move_ok], sw_F[swap_ok]]), np.concatenate([mv_Q[move_ok], sw_Q[swap_ok]]),
            np.concatenate([nodes[move_ok], b[swap_ok]]),
            np.concatenate([np.full(int(move_ok.sum()), -1), pool[swap_ok]]))


def try_improve(copies: Copies, state: NodeState, p: int, tol: float, tol_q: float) -> bool:
    """Apply copy p's best relocation if it lowers (objective, sum of squared peaks) by more
    than rounding (``tol`` tokens, ``tol_q`` squared tokens)."""
    dF, dQ, target, partner = relocations(copies, state, p)
    if dF.size == 0:
        return False
    i = np.lexsort((dQ, dF))[0]
    if not (dF[i] < -tol or (dF[i] <= tol and dQ[i] < -tol_q)):
        return False
    a, b, q = int(state.node[p]), int(target[i]), int(partner[i])
    put(copies, state, p, a, -1)
    if q >= 0:
        put(copies, state, q, b, -1)
        put(copies, state, q, a)
        refresh(state, copies.layer[q])
    put(copies, state, p, b)
    refresh(state, copies.layer[p])
    return True


def bottleneck_candidates(copies: Copies, state: NodeState, layer_copies: np.ndarray, m: int) -> np.ndarray:
    """Copies whose relocation can lower layer m's busiest node link, most promising first."""
    n = state.top_idx[m, 0]
    here = state.node[layer_copies] == n
    if state.down[m, n] >= state.up[m, n]:      # downlink: take heavy arrivals off n
        c = layer_copies[here]
        gain = copies.total[c] - copies.vol[c, n]
    else:                                       # uplink: bring what n's sources use onto n
        c = layer_copies[~here]
        gain = copies.vol[c, n]
    return c[np.argsort(-gain, kind="stable")[:SEARCH_CANDIDATES]]


def local_search(copies: Copies, state: NodeState, steps: int, deadline: float = np.inf) -> NodeState:
    """Relocate copies off each layer's bottleneck until nothing improves, ``steps`` copies
    were tried (the budget that keeps the result reproducible), or the deadline passes (a
    safety net; a result cut by it depends on the machine's speed)."""
    by_layer = [np.flatnonzero(copies.layer == m) for m in range(state.up.shape[0])]
    scale = max(1.0, float(state.top_val.max(initial=0.0)))     # the largest peak, in tokens
    tol, tol_q = 1e-9 * scale, 1e-9 * scale * scale
    improved = True
    while improved and steps > 0 and time.perf_counter() < deadline:
        improved = False
        for m in np.argsort(-state.top_val[:, 0], kind="stable"):
            for p in bottleneck_candidates(copies, state, by_layer[m], m):
                steps -= 1
                if try_improve(copies, state, int(p), tol, tol_q):
                    improved = True
                    break
            if steps <= 0 or time.perf_counter() >= deadline:
                break
    return state


def _top2_excluding(values: np.ndarray) -> np.ndarray:
    """values: [G] -> [G], the largest value at any other index (0 when there is none)."""
    two = np.partition(values, -2)[-2:] if values.shape[0] > 1 else np.array([0.0, values[0]])
    return np.where(values == two[1], two[0], two[1])   # a tied top keeps the top: two[0] == two[1]


def assign_gpus(copies: Copies, node_of: np.ndarray, trace: Trace, count: np.ndarray,
                num_expert_ranks: int, gpus_per_node: int, slots: int) -> list[list[list[int]]]:
    """Inside each node, heaviest copy first onto the GPU whose NVLink ports end lowest.

    Returns holders[m][e]: the GPUs holding copies of expert e of layer m."""
    M, E = count.shape
    G = gpus_per_node
    src = trace.source_ranks
    holders = [[[] for _ in range(E)] for _ in range(M)]
    for n in np.unique(node_of):
        mine = np.flatnonzero(node_of == n)
        mine = mine[np.argsort(-copies.total[mine], kind="stable")]
        local = np.flatnonzero(src // G == n)               # this node's source GPUs
        per_src = np.zeros((mine.size, G))                  # [copies, G] tokens from local GPU k
        if local.size:
            tok = trace.source_expert[copies.layer[mine][:, None], local[None, :], copies.expert[mine][:, None]]
            per_src[:, src[local] % G] = tok / count[copies.layer[mine], copies.expert[mine]][:, None]
        gpus = n * G + np.arange(G)
        room = np.where(gpus < num_expert_ranks, slots, 0)
        up, down, load = np.zeros((M, G)), np.zeros((M, G)), np.zeros(G)
        held = np.zeros((M * E, G), bool)
        for i, p in enumerate(mine):
            m, c = copies.layer[p], per_src[i]
            port = np.maximum.reduce([np.maximum(_top2_excluding(up[m] + c), up[m]),
                                      down[m] + c.sum() - c, _top2_excluding(down[m])])
            ok = room > 0
            if (ok & ~held[copies.key[p]]).any():
                ok &= ~held[copies.key[p]]
            q = np.flatnonzero(ok)
            q = int(q[np.lexsort((load[q], port[q]))[0]])
            up[m] += c
            up[m, q] -= c[q]
            down[m, q] += c.sum() - c[q]
            load[q] += copies.total[p]
            room[q] -= 1
            held[copies.key[p], q] = True
            holders[m][copies.expert[p]].append(int(gpus[q]))
    return holders


def counts_of(placement: Placement) -> np.ndarray:
    """-> [M, E] copies of each expert in ``placement``."""
    return np.array([[len(h) for h in row] for row in placement.ranks], np.int64)


def state_of(placement: Placement, copies: Copies, source_out, capacity, gpus_per_node: int) -> NodeState:
    """The node state of an existing placement whose copy counts ``copies`` were made from."""
    E = placement.num_experts
    state = empty_state(copies, source_out, capacity, placement.num_moe_layers * E)
    nodes = [g // gpus_per_node for row in placement.ranks for holders in row for g in holders]
    for p, n in enumerate(nodes):
        put(copies, state, p, n)
    for m in range(placement.num_moe_layers):
        refresh(state, m)
    return state


def optimise_placement(greedy: Placement, trace: Trace, cluster: Cluster, slots: int,
                       steps: int, seconds: float = np.inf) -> Placement:
    """Entry point: the topology-aware placement over the same expert GPUs as ``greedy``,
    never worse than it on the link model (it is returned when the search cannot beat it).
    ``steps``: relocation attempts of the local search; ``seconds``: its safety-net limit."""
    deadline = time.perf_counter() + seconds
    X, G, N = greedy.num_expert_ranks, cluster.gpus_per_node, cluster.nodes
    volumes = node_volumes(trace, G, N)                    # [M, E, N]
    source_out = volumes.sum(axis=1)                       # [M, N]
    capacity = node_capacity(X, G, N, slots)
    num_keys = volumes.shape[0] * volumes.shape[1]
    count = copy_counts(trace.expert_tokens.astype(np.float64), int(capacity.sum()), X)
    copies = make_copies(count, volumes)
    state = construct(copies, empty_state(copies, source_out, capacity, num_keys))
    g_count = counts_of(greedy)
    g_copies = make_copies(g_count, volumes)
    g_state = state_of(greedy, g_copies, source_out, capacity, G)
    if g_state.objective < state.objective:                # search from the better start
        copies, state, count = g_copies, g_state, g_count
    state = local_search(copies, state, steps, deadline)
    holders = assign_gpus(copies, state.node, trace, count, X, G, slots)
    ranks = tuple(tuple(tuple(sorted(h)) for h in row) for row in holders)
    optimised = Placement(ranks, X, greedy.first_moe_layer, "optimised")
    ours, theirs = (placement_metrics(p, trace, cluster).max_link_ms for p in (optimised, greedy))
    if ours > theirs:
        return Placement(greedy.ranks, X, greedy.first_moe_layer, "optimised")
    return optimised


__all__ = ["Copies", "NodeState", "copy_counts", "make_copies", "construct", "local_search",
           "assign_gpus", "optimise_placement"]
