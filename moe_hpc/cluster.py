"""Cluster description (TOML): nodes, GPUs, GPU memory, and the two link classes.

```toml
[cluster]
nodes = 488
gpus_per_node = 8
gpu_memory_gb = 80.0
expert_memory_fraction = 0.5   # share of GPU memory expert weights may take

[intra_node]                   # NVLink / NVSwitch: one port per GPU, per direction
bandwidth_gb_per_s = 450.0
latency_us = 1.0

[inter_node]                   # InfiniBand rails of a node into a non-blocking fat tree
rails = 8
bandwidth_gb_per_s = 50.0      # per rail, per direction
latency_us = 5.0
```

GPU ``g`` (world rank ``g``) sits on node ``g // gpus_per_node``, the runner's rank-to-node
formula.  The link model built on this is in ``linkload.py`` and ``docs/placement.md``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .config import ModelConfig, build_table, read_toml
from .errors import ConfigError


@dataclass(frozen=True)
class Machine:
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gb: float = 80.0
    expert_memory_fraction: float = 0.5


@dataclass(frozen=True)
class IntraNode:
    bandwidth_gb_per_s: float = 450.0
    latency_us: float = 1.0


@dataclass(frozen=True)
class InterNode:
    rails: int = 8
    bandwidth_gb_per_s: float = 50.0
    latency_us: float = 5.0


CLUSTER_TABLES = {"cluster": Machine, "intra_node": IntraNode, "inter_node": InterNode}


@dataclass(frozen=True)
class Cluster:
    machine: Machine = field(default_factory=Machine)
    intra: IntraNode = field(default_factory=IntraNode)
    inter: InterNode = field(default_factory=InterNode)
    source: str = "<cluster>"

    @property
    def num_gpus(self) -> int:
        return self.machine.nodes * self.machine.gpus_per_node

    @property
    def gpus_per_node(self) -> int:
        return self.machine.gpus_per_node

    @property
    def node_bytes_per_s(self) -> float:
        """One node's inter-node bandwidth per direction: all its rails together."""
        return self.inter.rails * self.inter.bandwidth_gb_per_s * 1e9

    @property
    def gpu_bytes_per_s(self) -> float:
        """One GPU's NVLink port per direction."""
        return self.intra.bandwidth_gb_per_s * 1e9

    def to_dict(self) -> dict:
        return {"cluster": vars(self.machine), "intra_node": vars(self.intra),
                "inter_node": vars(self.inter)}


def expert_bytes(model: ModelConfig) -> int:
    """bf16 bytes of one expert: w1 [H, F], b1 [F], w2 [F, H], b2 [H]."""
    H, F = model.hidden_size, model.moe_ffn_hidden_size
    return 2 * (2 * H * F + F + H)


def expert_slots(cluster: Cluster, model: ModelConfig) -> int:
    """Experts one GPU can hold within ``expert_memory_fraction`` of its memory."""
    m = cluster.machine
    return int(m.gpu_memory_gb * 1e9 * m.expert_memory_fraction // expert_bytes(model))


def _positive(where: str, key: str, value, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{where}: {key} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def validate_cluster(c: Cluster) -> None:
    """Raise ConfigError naming the first bad key."""
    w, m = c.source, c.machine
    for key in ("nodes", "gpus_per_node", "gpu_memory_gb"):
        _positive(w, f"cluster.{key}", getattr(m, key))
    if not 0 < m.expert_memory_fraction <= 1:
        raise ConfigError(f"{w}: cluster.expert_memory_fraction must be in (0, 1], "
                          f"got {m.expert_memory_fraction}")
    _positive(w, "intra_node.bandwidth_gb_per_s", c.intra.bandwidth_gb_per_s)
    _positive(w, "intra_node.latency_us", c.intra.latency_us, allow_zero=True)
    _positive(w, "inter_node.rails", c.inter.rails)
    _positive(w, "inter_node.bandwidth_gb_per_s", c.inter.bandwidth_gb_per_s)
    _positive(w, "inter_node.latency_us", c.inter.latency_us, allow_zero=True)


def build_cluster(tables: dict, where: str = "<cluster>") -> Cluster:
    """Parsed TOML tables -> a validated Cluster (unknown tables and keys are errors)."""
    unknown = set(tables) - set(CLUSTER_TABLES)
    if unknown:
        raise ConfigError(f"{where}: unknown table [{sorted(unknown)[0]}] "
                          f"(known: {', '.join(CLUSTER_TABLES)})")
    parts = {}
    for name, cls in CLUSTER_TABLES.items():
        values = tables.get(name, {})
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: [{name}] must be a table")
        parts[name] = build_table(name, values, where, cls)
    c = Cluster(parts["cluster"], parts["intra_node"], parts["inter_node"], source=where)
    validate_cluster(c)
    return c


def load_cluster(path: str | Path) -> Cluster:
    """Read and validate a cluster TOML file."""
    return build_cluster(read_toml(path, "cluster file"), where=str(path))


__all__ = ["Cluster", "Machine", "IntraNode", "InterNode", "load_cluster", "build_cluster",
           "expert_bytes", "expert_slots"]
