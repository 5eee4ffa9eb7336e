"""The link model: which links a placement's tokens cross, and how loaded each link is.

Links (all directed, one per direction of a full-duplex wire):
- ``gpu_up[g]`` / ``gpu_down[g]``: GPU g's NVLink port into / out of its node's NVSwitch;
- ``node_up[n]`` / ``node_down[n]``: node n's rails into / out of the fat tree, together.

A dispatched row from source GPU s to destination GPU d crosses nothing when s == d; gpu_up[s]
and gpu_down[d] when both sit on one node; node_up[node(s)] and node_down[node(d)] otherwise
(the fat tree is non-blocking, so nothing above the node links is a bottleneck).  A token that
picks a replicated expert goes to each of its n replicas with share 1/n (the runner's default
choice, token index mod n).  The combine sends the same rows back over the reverse links, so
its busiest link carries exactly what the dispatch's does; the model counts the dispatch.

The MoE layers exchange one after another, so a layer's exchange lasts as long as its busiest
link needs: ``max link load = sum over layers of max over links of bytes(link) / bandwidth``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config.cluster import Cluster
from .table import Placement
from .traces import Trace


@dataclass(frozen=True)
class LayerLinks:
    """Tokens over each link in one layer's dispatch, and tokens each GPU receives.
    gpu_up, gpu_down, gpu_load: [num_gpus]; node_up, node_down: [nodes]."""
    gpu_up: np.ndarray
    gpu_down: np.ndarray
    node_up: np.ndarray
    node_down: np.ndarray
    gpu_load: np.ndarray


@dataclass(frozen=True)
class Metrics:
    """What the place report compares (see docs/placement.md)."""
    max_link_ms: float         # sum over layers of the busiest link's time
    max_link_tokens: float     # tokens per layer over that link (mean over layers)
    gpu_max_over_mean: float   # tokens received per expert GPU over the whole trace
    inter_node_gb: float       # dispatch + combine bytes crossing node links

    def as_dict(self) -> dict:
        return dict(vars(self))


def row_bytes(hidden_size: int) -> int:
    """One dispatched row: H bf16 values (the slot a row belongs to travels in the counts,
    not with the row)."""
    return 2 * hidden_size


def layer_links(holders: np.ndarray, counts: np.ndarray, sources: np.ndarray,
                gpus_per_node: int, nodes: int) -> LayerLinks:
    """holders: [E, R] GPUs of each expert (-1 padded); counts: [S, E] tokens from each source
    to each expert; sources: [S] source GPUs -> LayerLinks."""
    valid = holders >= 0
    expert, _ = np.nonzero(valid)
    dest = holders[valid]                                        # [P] physical experts
    share = counts[:, expert] / valid.sum(axis=1)[expert]        # [S, P] tokens per replica
    src_node, dest_node = sources // gpus_per_node, dest // gpus_per_node
    same_node = src_node[:, None] == dest_node[None, :]
    off = np.where(same_node, 0.0, share)
    intra = np.where(same_node & (sources[:, None] != dest[None, :]), share, 0.0)
    G = nodes * gpus_per_node
    return LayerLinks(np.bincount(sources, intra.sum(axis=1), G), np.bincount(dest, intra.sum(axis=0), G),
                      np.bincount(src_node, off.sum(axis=1), nodes),
                      np.bincount(dest_node, off.sum(axis=0), nodes),
                      np.bincount(dest, share.sum(axis=0), G))


def layer_seconds(links: LayerLinks, cluster: Cluster, nbytes: int) -> tuple[float, float]:
    """-> (seconds the busiest link needs, tokens over that link)."""
    node_tokens = max(links.node_up.max(), links.node_down.max())
    gpu_tokens = max(links.gpu_up.max(), links.gpu_down.max())
    node_s = node_tokens * nbytes / cluster.node_bytes_per_s
    gpu_s = gpu_tokens * nbytes / cluster.gpu_bytes_per_s
    return (node_s, float(node_tokens)) if node_s >= gpu_s else (gpu_s, float(gpu_tokens))


def all_layer_links(placement: Placement, trace: Trace, cluster: Cluster) -> list[LayerLinks]:
    table = placement.rank_table()
    return [layer_links(table[m], trace.source_expert[m].astype(np.float64), trace.source_ranks,
                        cluster.gpus_per_node, cluster.nodes)
            for m in range(placement.num_moe_layers)]


def placement_metrics(placement: Placement, trace: Trace, cluster: Cluster) -> Metrics:
    """Evaluate ``placement`` on ``trace`` over ``cluster``'s links."""
    nbytes = row_bytes(trace.model.hidden_size)
    links = all_layer_links(placement, trace, cluster)
    busiest = [layer_seconds(x, cluster, nbytes) for x in links]
    load = sum(x.gpu_load for x in links)[: placement.num_expert_ranks]
    inter = sum(float(x.node_up.sum()) for x in links)
    return Metrics(max_link_ms=1e3 * sum(s for s, _ in busiest),
                   max_link_tokens=float(np.mean([t for _, t in busiest])),
                   gpu_max_over_mean=float(load.max() / load.mean()) if load.mean() else 0.0,
                   inter_node_gb=2 * inter * nbytes / 1e9)


def node_volumes(trace: Trace, gpus_per_node: int, nodes: int) -> np.ndarray:
    """-> [M, E, nodes]: tokens each node's sources send to each expert."""
    onehot = np.zeros((trace.source_ranks.shape[0], nodes))
    onehot[np.arange(onehot.shape[0]), trace.source_ranks // gpus_per_node] = 1.0
    return np.einsum("mse,sn->men", trace.source_expert.astype(np.float64), onehot)


__all__ = ["LayerLinks", "Metrics", "layer_links", "layer_seconds", "placement_metrics",
           "node_volumes", "row_bytes", "all_layer_links"]
