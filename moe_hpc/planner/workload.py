"""What one step of one dense rank computes: the planner's unit of work.

The slot padding default is measured: the busiest expert of a micro-batch over the mean,
11-12.5% in the bench JSONs under ``benchmarks/results/``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..config.cluster import Cluster
from ..config.run_config import Config

DEFAULT_SLOT_PADDING = 0.12       # busiest expert over the mean, measured 11-12.5% (bench JSONs)


@dataclass(frozen=True)
class Workload:
    """One step of one dense rank: a chunk of ``sequences`` x ``seq_len`` tokens.

    tokens: T = sequences * seq_len; micro_batches: ceil(T / micro_batch_tokens);
    mb_tokens: tokens of the largest micro-batch; flash: the attention core is cuDNN's fused
    flash attention (``flash_planned``), else the tiled fp32 core.
    """
    sequences: int
    seq_len: int
    micro_batch_tokens: int
    slot_padding: float = DEFAULT_SLOT_PADDING
    flash: bool = False

    @property
    def tokens(self) -> int:
        return self.sequences * self.seq_len

    @property
    def micro_batches(self) -> int:
        return math.ceil(self.tokens / self.micro_batch_tokens)

    @property
    def mb_tokens(self) -> int:
        return min(self.tokens, self.micro_batch_tokens)


def flash_planned(cfg: Config, fused_core: bool = True) -> bool:
    """Whether a run of ``cfg`` attends through cuDNN's fused flash core: a GPU where the core is
    there (``fused_core``: a plan assumes the [gpu] extras, which install cuDNN's frontend; a
    run's memory check knows), ``run.attention`` auto or cudnn, and layers the fused path runs."""
    return fused_core and cfg.run.attention != "tiles" and cfg.model.plain_qkv


def workload_of(cfg: Config, cluster: Cluster, slot_padding: float = DEFAULT_SLOT_PADDING,
                fused_core: bool = True) -> Workload:
    return Workload(cfg.run.chunk_sequences, cluster.deployment.seq_len, cfg.run.micro_batch_tokens,
                    slot_padding, flash_planned(cfg, fused_core))


__all__ = ["Workload", "workload_of", "flash_planned", "DEFAULT_SLOT_PADDING"]
