"""The planner's cluster description: a TOML file with the machine and how the job is laid on it.

Four tables (keys, defaults and units in docs/plan.md):

    [cluster]     name, nodes, gpus_per_node                      (nodes and gpus_per_node required)
    [gpu]         memory_gib, peak_tflops, mfu, memory_tb_s, memory_util, reserved_gib,
                  attention_mfu, copy_util, launch_us, sync_us
    [network]     intra_node_gb_s, intra_node_latency_us, inter_node_gb_s, inter_node_latency_us,
                  transport_buffer_gib
    [deployment]  dense_gpus, data_parallel, seq_len

The [gpu] defaults are the seeds' (400 TFLOP/s at 60% MFU, 64 GiB, 1.8 TB/s at 80%); the overhead
defaults (launch_us, sync_us, copy_util) are what the planner fits from the H200 bench
(docs/plan.md).  Errors name the file and the key, like the run config's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .config import _coerce, build_table, read_toml
from .errors import ConfigError


@dataclass(frozen=True)
class GpuSpec:
    """One GPU: capacity in GiB (2^30 bytes), rates in TFLOP/s and TB/s, fractions in (0, 1]."""
    memory_gib: float = 64.0          # what the allocator can have
    peak_tflops: float = 400.0        # dense bf16 tensor-core peak
    mfu: float = 0.60                 # fraction of peak the bf16 GEMMs reach
    memory_tb_s: float = 1.8          # HBM bandwidth
    memory_util: float = 0.80         # fraction of it elementwise and gather kernels reach
    reserved_gib: float = 1.0         # CUDA context, cuBLAS workspace, allocator slack
    attention_mfu: float = 0.0        # attention core (QK^T, PV) as a fraction of peak; 0: = mfu
    copy_util: float = 0.40           # a transport's copy within one GPU, fraction of memory_tb_s
    launch_us: float = 17.0           # host cost of one GPU operation issued from Python
    sync_us: float = 300.0            # one host round trip (device-to-host copy that waits)

    @property
    def attention_fraction(self) -> float:
        return self.attention_mfu or self.mfu


@dataclass(frozen=True)
class NetworkSpec:
    """Per-GPU, per-direction bandwidths in GB/s (1e9 bytes); latencies in microseconds."""
    intra_node_gb_s: float = 300.0
    intra_node_latency_us: float = 3.0
    inter_node_gb_s: float = 50.0
    inter_node_latency_us: float = 10.0
    transport_buffer_gib: float = 1.0  # what the transport (NCCL) keeps per GPU for its peers


@dataclass(frozen=True)
class DeploymentSpec:
    """How the run is laid on the cluster. dense_gpus -1: the config's parallel.dense_ranks."""
    dense_gpus: int = -1              # dense-only GPUs in all, the last ones of each replica
    data_parallel: int = 1            # copies of the whole expert set, sequences split
    seq_len: int = 4096               # tokens per sequence (attention cost, activations)


@dataclass(frozen=True)
class Cluster:
    name: str
    nodes: int
    gpus_per_node: int
    gpu: GpuSpec = field(default_factory=GpuSpec)
    network: NetworkSpec = field(default_factory=NetworkSpec)
    deployment: DeploymentSpec = field(default_factory=DeploymentSpec)
    source: str = "<cluster>"

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


TABLES = {"gpu": GpuSpec, "network": NetworkSpec, "deployment": DeploymentSpec}
FRACTIONS = ("mfu", "memory_util", "copy_util")
NON_NEGATIVE = ("reserved_gib", "attention_mfu", "launch_us", "sync_us", "intra_node_latency_us",
                "inter_node_latency_us", "transport_buffer_gib")


def _table(name: str, values: dict, where: str):
    """One table -> its dataclass (the run config's reader: unknown keys and wrong types name
    the key), then the planner's range checks."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: [{name}] must be a table")
    obj = build_table(name, values, where, TABLES[name])
    for key, value in vars(obj).items():
        _check_range(name, key, value, where)
    return obj


def _check_range(table: str, key: str, value, where: str) -> None:
    bad = None
    if key in FRACTIONS and not 0 < value <= 1:
        bad = "must be in (0, 1]"
    elif key == "attention_mfu" and not 0 <= value <= 1:
        bad = "must be in [0, 1] (0: same as mfu)"
    elif key in NON_NEGATIVE and value < 0:
        bad = "must be >= 0"
    elif key == "dense_gpus" and value < -1:
        bad = "must be >= 0 (or -1: the config's parallel.dense_ranks)"
    elif key not in FRACTIONS + NON_NEGATIVE + ("dense_gpus",) and value <= 0:
        bad = "must be > 0"
    if bad:
        raise ConfigError(f"{where}: {table}.{key} {bad}, got {value!r}")


def _cluster_table(values, where: str) -> tuple[str, int, int]:
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: [cluster] must be a table")
    unknown = set(values) - {"name", "nodes", "gpus_per_node"}
    if unknown:
        raise ConfigError(f"{where}: unknown key cluster.{sorted(unknown)[0]} (known: name, nodes, gpus_per_node)")
    for key in ("nodes", "gpus_per_node"):
        if key not in values:
            raise ConfigError(f"{where}: cluster.{key} is required")
        if _coerce("cluster", key, values[key], 0, where) < 1:
            raise ConfigError(f"{where}: cluster.{key} must be >= 1, got {values[key]!r}")
    name = _coerce("cluster", "name", values.get("name", Path(where).stem), "", where)
    return name, values["nodes"], values["gpus_per_node"]


def build_cluster(tables: dict, where: str = "<cluster>") -> Cluster:
    """Parsed TOML tables -> a validated Cluster."""
    unknown = set(tables) - set(TABLES) - {"cluster"}
    if unknown:
        raise ConfigError(f"{where}: unknown table [{sorted(unknown)[0]}] (known: cluster, gpu, network, deployment)")
    name, nodes, gpn = _cluster_table(tables.get("cluster", {}), where)
    parts = {t: _table(t, tables.get(t, {}), where) for t in TABLES}
    cluster = Cluster(name, nodes, gpn, source=where, **parts)
    dp = cluster.deployment.data_parallel
    if cluster.world_size % dp:
        raise ConfigError(f"{where}: deployment.data_parallel ({dp}) must divide the "
                          f"{cluster.world_size} GPUs (cluster.nodes x cluster.gpus_per_node)")
    return cluster


def load_cluster(path: str | Path) -> Cluster:
    """Read and validate a cluster TOML file."""
    return build_cluster(read_toml(path, "cluster file"), where=str(path))


__all__ = ["Cluster", "GpuSpec", "NetworkSpec", "DeploymentSpec", "build_cluster", "load_cluster"]
