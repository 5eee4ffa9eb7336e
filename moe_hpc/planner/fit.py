"""Does the job fit its GPUs? The planner's per-GPU memory for the run's own layout against the
memory each rank's device has free, checked before any weight is loaded (run, its dry run,
bench), so a model too large is refused in seconds with both figures and the smallest layout
that fits, instead of running out of memory after minutes of loading.

The runtime may not import the planner (pyproject.toml's layers contract): the CLI hands
``check_memory`` to the job (``Job.memory_check``); the bench calls it itself.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config.cluster import GIB, Cluster, DeploymentSpec, GpuSpec
from ..config.errors import ConfigError
from ..config.run_config import Config
from .deployment import make_layout
from .memory import Memory, cache_rows_fitting, plan_memory
from .workload import workload_of

MOST_RANKS = 4096         # the search for a layout that fits stops here
ONE_BY_ONE = 64           # ... and tries every rank count up to this one (a few seconds at most)


@dataclass(frozen=True)
class MemoryFit:
    """One rank's planned memory against what its device has free (None: no limit known)."""
    rank: int
    need: Memory
    free: int | None

    @property
    def fits(self) -> bool:
        return self.free is None or self.need.total <= self.free

    @property
    def headroom(self) -> float:
        return float("inf") if self.free is None else self.free - self.need.total

    def text(self) -> str:
        m = self.need
        parts = ", ".join(f"{name.replace('_', ' ')} {getattr(m, name) / GIB:.2f}" for name in
                          ("dense_weights", "expert_weights", "activations", "token_buffers", "kv_cache")
                          if getattr(m, name)).replace("kv cache", "KV cache")
        have = ("no limit known (the CPU; run.memory_limit_gib sets one)" if self.free is None
                else f"{self.free / GIB:.2f} GiB free")
        return f"rank {self.rank} needs {m.total / GIB:.2f} GiB ({parts} GiB, and fixed) of {have}"


def _cluster(world_size: int, seq_len: int, free: int) -> Cluster:
    """The run itself as a one-node cluster whose GPUs have ``free`` bytes (placement and roles
    do not depend on nodes)."""
    return Cluster("this run", 1, world_size, gpu=GpuSpec(memory_gib=free / GIB),
                   deployment=DeploymentSpec(seq_len=seq_len), source="<this run>")


def rank_memory(cfg: Config, world_size: int, seq_len: int, new_tokens: int = 0,
                fused_core: bool = True) -> list[Memory]:
    """[ranks of one data-parallel replica] the planner's memory of each local rank when
    ``world_size`` ranks run ``cfg`` on sequences of ``seq_len`` positions (``new_tokens`` > 0:
    generate that many after each, with a KV cache on the dense ranks; ``fused_core``: cuDNN's
    fused attention is there, ``workload.flash_planned``)."""
    cluster = _cluster(world_size, seq_len, 0)
    layout = make_layout(cfg, cluster)
    return [g.memory for g in plan_memory(cfg, cluster, layout, workload_of(cfg, cluster, fused_core=fused_core),
                                          new_tokens=new_tokens)]


def _fits_with(cfg: Config, ranks: int, seq_len: int, free: int, new_tokens: int, fused_core: bool) -> bool:
    try:
        return max(m.total for m in rank_memory(cfg, ranks, seq_len, new_tokens, fused_core)) <= free
    except ConfigError:          # no valid layout on this many ranks (dp, dense_tp, ...)
        return False


def smallest_fit(cfg: Config, world_size: int, seq_len: int, free: int, new_tokens: int = 0,
                 fused_core: bool = True) -> int | None:
    """The fewest ranks (more than ``world_size``, each GPU with ``free`` bytes) whose fullest
    GPU fits, tried one by one up to ``ONE_BY_ONE`` (a placement's uneven split makes the need
    jump up and down with the count), then doubling. None when the dense side alone (what more ranks do not spread) is too
    large, or no count up to ``MOST_RANKS`` fits."""
    if min(_unspread(m) for m in rank_memory(cfg, world_size, seq_len, new_tokens, fused_core) if m.dense_weights) > free:
        return None
    step = cfg.parallel.dp
    # at least one count past the world, however large the world already is
    counts = list(range(world_size + step, max(world_size + step, ONE_BY_ONE) + 1, step))
    while counts[-1] < MOST_RANKS:           # past ONE_BY_ONE, doubling (each plan takes longer)
        counts.append(2 * counts[-1])
    return next((n for n in counts if _fits_with(cfg, n, seq_len, free, new_tokens, fused_core)), None)


def _unspread(m: Memory) -> int:
    """What a dense rank holds whatever the rank count: all but the experts and their buffers."""
    return m.total - m.expert_weights - m.token_buffers


def check_memory(cfg: Config, world_size: int, group_rank: int, world_rank: int, seq_len: int,
                 free: int | None, generate: bool = False, fused_core: bool = True) -> MemoryFit:
    """This rank's planned memory against ``free`` bytes (None: no limit known); raises
    ConfigError naming both and the smallest layout that fits when it does not fit.

    free: the device's free bytes, at most ``run.memory_limit_gib`` when that is set (on the
    CPU that alone sets a limit). generate: a generate job (the CLI's ``moe-hpc generate``),
    whose dense ranks also hold a KV cache of run.chunk_sequences (or generate.decode_slots, when
    fewer) x (seq_len + max_new_tokens). fused_core: cuDNN's fused attention runs here (the
    tiled core holds more: ``workload.flash_planned``)."""
    limit = int(cfg.run.memory_limit_gib * GIB)
    if limit:
        free = limit if free is None else min(free, limit)
    new_tokens = cfg.generate.max_new_tokens if generate else 0
    result = MemoryFit(world_rank, rank_memory(cfg, world_size, seq_len, new_tokens, fused_core)[group_rank], free)
    if result.fits:
        return result
    fewer = kv_cache_hint(cfg, result.need, seq_len + new_tokens, free)
    ranks = None if fewer else smallest_fit(cfg, world_size, seq_len, free, new_tokens, fused_core)
    hint = fewer or (f"smallest layout that fits: {ranks} ranks of this config" if ranks else
                     f"no rank count up to {MOST_RANKS} fits (the dense side alone is too large: "
                     "try parallel.dense_tp or parallel.dense_stages; moe-hpc plan suggests a layout)")
    raise ConfigError(f"the model does not fit: {result.text()}; {hint}")


def kv_cache_hint(cfg: Config, need: Memory, positions: int, free: int) -> str | None:
    """How many sequences per group (or decode slots) fit when the KV cache is what does not:
    the cache is linear in its rows, and the rest (weights, buffers, activations: these only
    shrink with fewer sequences, and do not depend on the slots) stays as planned, so the figure fits (the largest that does, or a little under it); None when no
    KV cache is planned or not even one sequence fits."""
    if not need.kv_cache:
        return None
    rows = cfg.generate.cache_rows(cfg.run.chunk_sequences)
    fit = cache_rows_fitting(need, rows, free)
    if fit < 1:
        return None
    held = (f"{rows} decode slots (generate.decode_slots) of" if cfg.generate.decode_slots
            else f"{rows} sequences x")
    return (f"that includes {need.kv_cache / GIB:.2f} GiB of KV cache for {held} {positions:,} positions "
            f"(prompt + generate.max_new_tokens); {fit} sequences per group fit (--set run.chunk_sequences={fit}), "
            f"or {fit} decode slots (--set generate.decode_slots={fit})")


def with_chunk(cfg: Config, sequences: int) -> Config:
    """``cfg`` with ``run.chunk_sequences = sequences`` (the bench's chunk)."""
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, chunk_sequences=sequences))


__all__ = ["MemoryFit", "check_memory", "rank_memory", "smallest_fit", "with_chunk", "MOST_RANKS"]
