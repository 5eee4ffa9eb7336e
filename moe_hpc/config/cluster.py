"""The cluster description: one TOML schema read by ``place``, ``make-trace`` and ``plan`` alike.

Four tables (keys, defaults and units in docs/cluster.md):

    [cluster]     name, nodes, gpus_per_node                    (nodes and gpus_per_node required)
    [gpu]         memory_gib, expert_memory_fraction, peak_tflops, mfu, memory_tb_s, memory_util,
                  reserved_gib, attention_mfu, copy_util, launch_us, sync_us
    [network]     intra_node_gb_s, intra_node_latency_us, inter_node_gb_s, rails_per_node,
                  inter_node_latency_us, transport_buffer_gib
    [deployment]  dense_gpus, data_parallel, seq_len

GPU ``g`` (world rank ``g``) sits on node ``g // gpus_per_node``, the runner's rank-to-node
formula.  The links are those of ``placement/links.py``: one NVLink port per GPU into its node's
switch (``intra_node_gb_s`` per direction) and the node's ``rails_per_node`` InfiniBand rails of
``inter_node_gb_s`` each into a non-blocking fat tree.

The [gpu] defaults are the seeds' (400 TFLOP/s at 60% MFU, 64 GiB, 1.8 TB/s at 80%); the overhead
defaults (launch_us, sync_us, copy_util) are what the planner fits from the H200 bench
(docs/plan.md).  Errors name the file and the key, like the run config's; a file in the retired
placement-only form (``[intra_node]``, ``[inter_node]``, ``cluster.gpu_memory_gb``) gets one
error naming the key to use instead.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError
from .run_config import build_table, coerce, read_toml

GIB = 2 ** 30      # the unit of every memory size here (GiB)


@dataclass(frozen=True)
class GpuSpec:
    """One GPU: capacity in GiB (2^30 bytes), rates in TFLOP/s and TB/s, fractions in (0, 1]."""
    memory_gib: float = 64.0          # what the allocator can have
    expert_memory_fraction: float = 0.5   # share of it expert weights may take (placement)
    peak_tflops: float = 400.0        # dense bf16 tensor-core peak
    mfu: float = 0.60                 # fraction of peak the bf16 GEMMs reach
    memory_tb_s: float = 1.8          # HBM bandwidth
    memory_util: float = 0.80         # fraction of it elementwise and gather kernels reach
    reserved_gib: float = 1.0         # CUDA context, cuBLAS workspace, allocator slack
    attention_mfu: float = 0.0        # attention core (QK^T, PV) as a fraction of peak; 0: = mfu
    copy_util: float = 0.40           # a transport's copy within one GPU, fraction of memory_tb_s
    launch_us: float = 17.0           # host cost of one GPU operation issued from Python
    sync_us: float = 300.0            # one host round trip (device-to-host copy that waits)
    overlap_loss: float = 1.0         # share of the shorter of transfers and expert GEMMs overlap fails to hide
                                      # (measured ~1 on 4 x H200 with NCCL: docs/performance.md)

    @property
    def attention_fraction(self) -> float:
        return self.attention_mfu or self.mfu


@dataclass(frozen=True)
class NetworkSpec:
    """Bandwidths in GB/s (1e9 bytes) per direction; latencies in microseconds."""
    intra_node_gb_s: float = 300.0    # one GPU's NVLink port into its node's switch
    intra_node_latency_us: float = 3.0
    inter_node_gb_s: float = 50.0     # one InfiniBand rail
    rails_per_node: int = 0           # rails of a node into the fat tree; 0: one per GPU
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
    def num_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def rails(self) -> int:
        return self.network.rails_per_node or self.gpus_per_node

    @property
    def node_bytes_per_s(self) -> float:
        """One node's inter-node bandwidth per direction: all its rails together."""
        return self.rails * self.network.inter_node_gb_s * 1e9

    @property
    def gpu_bytes_per_s(self) -> float:
        """One GPU's NVLink port per direction."""
        return self.network.intra_node_gb_s * 1e9


TABLES = {"gpu": GpuSpec, "network": NetworkSpec, "deployment": DeploymentSpec}
FRACTIONS = ("mfu", "memory_util", "copy_util", "expert_memory_fraction")
NON_NEGATIVE = ("reserved_gib", "attention_mfu", "launch_us", "sync_us", "overlap_loss", "intra_node_latency_us",
                "inter_node_latency_us", "transport_buffer_gib", "rails_per_node")

# The placement-only form of earlier versions: what each of its keys is called now.
RETIRED = {
    "[intra_node]": "network.intra_node_gb_s and network.intra_node_latency_us",
    "[inter_node]": "network.inter_node_gb_s (per rail), network.rails_per_node and "
                    "network.inter_node_latency_us",
    "cluster.gpu_memory_gb": "gpu.memory_gib (GiB, 2^30 bytes: 80 GB is 74.5 GiB)",
    "cluster.expert_memory_fraction": "gpu.expert_memory_fraction",
}


def _check_retired(tables: dict, where: str) -> None:
    cluster = tables.get("cluster", {})
    used = [f"[{t}]" for t in ("intra_node", "inter_node") if t in tables]
    if isinstance(cluster, dict):
        used += [f"cluster.{k}" for k in ("gpu_memory_gb", "expert_memory_fraction") if k in cluster]
    if used:
        raise ConfigError(f"{where}: {used[0]} is from the retired cluster form; use "
                          f"{RETIRED[used[0]]} instead (docs/cluster.md)")


def _table(name: str, values: dict, where: str):
    """One table -> its dataclass (the run config's reader: unknown keys and wrong types name
    the key), then the range checks."""
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
    elif key == "overlap_loss" and not 0 <= value <= 1:
        bad = "must be in [0, 1] (0: perfect overlap, 1: none)"
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
        if coerce("cluster", key, values[key], 0, where) < 1:
            raise ConfigError(f"{where}: cluster.{key} must be >= 1, got {values[key]!r}")
    name = coerce("cluster", "name", values.get("name", Path(where).stem), "", where)
    return name, values["nodes"], values["gpus_per_node"]


def build_cluster(tables: dict, where: str = "<cluster>") -> Cluster:
    """Parsed TOML tables -> a validated Cluster."""
    _check_retired(tables, where)
    unknown = set(tables) - set(TABLES) - {"cluster"}
    if unknown:
        raise ConfigError(f"{where}: unknown table [{sorted(unknown)[0]}] (known: cluster, gpu, network, deployment)")
    name, nodes, gpn = _cluster_table(tables.get("cluster", {}), where)
    parts = {t: _table(t, tables.get(t, {}), where) for t in TABLES}
    cluster = Cluster(name, nodes, gpn, source=where, **parts)
    dp = cluster.deployment.data_parallel
    if cluster.num_gpus % dp:
        raise ConfigError(f"{where}: deployment.data_parallel ({dp}) must divide the "
                          f"{cluster.num_gpus} GPUs (cluster.nodes x cluster.gpus_per_node)")
    return cluster


def load_cluster(path: str | Path) -> Cluster:
    """Read and validate a cluster TOML file."""
    return build_cluster(read_toml(path, "cluster file"), where=str(path))


__all__ = ["Cluster", "GpuSpec", "NetworkSpec", "DeploymentSpec", "build_cluster", "load_cluster", "RETIRED", "GIB"]
