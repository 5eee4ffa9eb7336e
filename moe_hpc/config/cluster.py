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
from .fields import AT_LEAST_0, AT_LEAST_1, FRACTION, POSITIVE, Rule, checked
from .run_config import build_table, coerce, read_toml

GIB = 2 ** 30      # the unit of every memory size here (GiB)


@dataclass(frozen=True)
class GpuSpec:
    """One GPU: capacity in GiB (2^30 bytes), rates in TFLOP/s and TB/s, fractions in (0, 1]."""
    memory_gib: float = checked(64.0, POSITIVE)          # what the allocator can have
    expert_memory_fraction: float = checked(0.5, FRACTION)   # share of it expert weights may take (placement)
    peak_tflops: float = checked(400.0, POSITIVE)        # dense bf16 tensor-core peak
    mfu: float = checked(0.60, FRACTION)                 # fraction of peak the bf16 GEMMs reach
    memory_tb_s: float = checked(1.8, POSITIVE)          # HBM bandwidth
    memory_util: float = checked(0.80, FRACTION)         # fraction of it elementwise and gather kernels reach
    reserved_gib: float = checked(1.0, AT_LEAST_0)         # CUDA context, cuBLAS workspace, allocator slack
    attention_mfu: float = checked(0.0, Rule(0, 1, note="0: same as mfu"))   # attention core (QK^T, PV), of peak
    copy_util: float = checked(0.40, FRACTION)           # a transport's copy within one GPU, fraction of memory_tb_s
    launch_us: float = checked(17.0, AT_LEAST_0)           # host cost of one GPU operation issued from Python
    sync_us: float = checked(300.0, AT_LEAST_0)            # one host round trip (device-to-host copy that waits)
    # share of the shorter of transfers and expert GEMMs overlap fails to hide
    # (measured ~1 on 4 x H200 with NCCL: docs/performance.md)
    overlap_loss: float = checked(1.0, Rule(0, 1, note="0: perfect overlap, 1: none"))

    @property
    def attention_fraction(self) -> float:
        return self.attention_mfu or self.mfu


@dataclass(frozen=True)
class NetworkSpec:
    """Bandwidths in GB/s (1e9 bytes) per direction; latencies in microseconds."""
    intra_node_gb_s: float = checked(300.0, POSITIVE)    # one GPU's NVLink port into its node's switch
    intra_node_latency_us: float = checked(3.0, AT_LEAST_0)
    inter_node_gb_s: float = checked(50.0, POSITIVE)     # one InfiniBand rail
    rails_per_node: int = checked(0, AT_LEAST_0)           # rails of a node into the fat tree; 0: one per GPU
    inter_node_latency_us: float = checked(10.0, AT_LEAST_0)
    transport_buffer_gib: float = checked(1.0, AT_LEAST_0)  # what the transport (NCCL) keeps per GPU for its peers


@dataclass(frozen=True)
class DeploymentSpec:
    """How the run is laid on the cluster. dense_gpus -1: the config's parallel.dense_ranks."""
    # dense-only GPUs in all, the last ones of each replica
    dense_gpus: int = checked(-1, Rule(-1, note="-1: the config's parallel.dense_ranks"))
    data_parallel: int = checked(1, AT_LEAST_1)            # copies of the whole expert set, sequences split
    seq_len: int = checked(4096, AT_LEAST_1)               # tokens per sequence (attention cost, activations)


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
    """One table -> its dataclass (the run config's reader: unknown keys, wrong types and values
    out of each field's range name the key)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: [{name}] must be a table")
    return build_table(name, values, where, TABLES[name])


def _cluster_table(values, where: str) -> tuple[str, int, int]:
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: [cluster] must be a table")
    unknown = set(values) - {"name", "nodes", "gpus_per_node"}
    if unknown:
        raise ConfigError(f"{where}: unknown key cluster.{sorted(unknown)[0]} (known: name, nodes, gpus_per_node)")
    for key in ("nodes", "gpus_per_node"):
        if key not in values:
            raise ConfigError(f"{where}: cluster.{key} is required")
        coerce("cluster", key, values[key], 0, where, AT_LEAST_1)
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
