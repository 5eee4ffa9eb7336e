"""A job and its chunks: which sequences each dense rank owns and how they are cut.

Pure arithmetic shared by the runner and the dry run (and the tests): dense rank d of D owns a
contiguous block of sequences, and every rank steps through the same number of chunks, enough
for the largest block, so the collectives of a chunk match on all ranks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config.errors import InputError
from ..config.run_config import Config
from ..files.atomic import check_output
from ..files.batches import open_input
from ..files.lock import lock_path_for
from .resume import progress_path_for
from .signals import StopRequest


@dataclass(frozen=True)
class Job:
    cfg: Config
    weights: Path
    input: Path
    output: Path
    overwrite: bool = False
    debug: bool = False
    restart: bool = False             # discard a partial output instead of resuming it
    progress: str = "auto"            # auto | bar | lines | off (progress.ProgressLog)
    progress_every: float = 10.0      # seconds between progress lines
    stop: StopRequest | None = None   # signals noted by the CLI; None: never stop early
    trace: Path | None = None         # also record a routing trace here (``--trace``)
    summary: Path | None = None       # the CLI also writes the JSON summary here (``--summary``)


@dataclass(frozen=True)
class InputMeta:
    num_sequences: int
    seq_len: int
    chunk_tokens: tuple[int, ...]     # [chunks] valid tokens per chunk, summed over dense ranks


def sequence_range(dense_index: int, num_dense: int, num_sequences: int) -> tuple[int, int]:
    """Contiguous block of sequences owned by dense rank ``dense_index``."""
    return (dense_index * num_sequences // num_dense, (dense_index + 1) * num_sequences // num_dense)


def num_chunks(num_sequences: int, num_dense: int, chunk_sequences: int) -> int:
    """Chunks every rank steps through: enough for the largest dense rank's share."""
    largest = max(b - a for a, b in (sequence_range(d, num_dense, num_sequences) for d in range(num_dense)))
    return math.ceil(largest / chunk_sequences)


def chunk_slice(lo: int, hi: int, chunk: int, chunk_sequences: int) -> tuple[int, int]:
    """Sequences [s0, s1) of chunk ``chunk`` for a dense rank owning [lo, hi) (may be empty)."""
    s0 = min(hi, lo + chunk * chunk_sequences)
    return s0, min(hi, s0 + chunk_sequences)


def chunk_tokens(lengths: np.ndarray, num_dense: int, chunk_sequences: int) -> tuple[int, ...]:
    """lengths: [S] int64 -> [chunks] valid tokens of each chunk over all dense ranks."""
    S = len(lengths)
    totals = [0] * num_chunks(S, num_dense, chunk_sequences)
    for d in range(num_dense):
        lo, hi = sequence_range(d, num_dense, S)
        for c in range(len(totals)):
            s0, s1 = chunk_slice(lo, hi, c, chunk_sequences)
            totals[c] += int(lengths[s0:s1].sum())
    return tuple(totals)


def check_outputs(job: Job) -> None:
    """Every path the job will write, before any work: none is an input, each can be written."""
    inputs = (job.weights, job.input)
    check_output(job.output, job.overwrite, inputs, beside=(progress_path_for(job.output), lock_path_for(job.output)))
    if job.trace is not None:
        check_output(job.trace, job.overwrite, inputs + (job.output,))
    if job.summary is not None:       # a summary is a report, rewritten by every run
        check_output(job.summary, True, inputs + (job.output,))


def check_setup(job: Job, num_dense: int) -> InputMeta:
    """Rank 0: the output may be written, the input is readable; its shape and chunk sizes."""
    check_outputs(job)
    cfg = job.cfg
    batch = open_input(job.input, cfg.model.hidden_size, cfg.model.vocab_size)
    try:
        if cfg.run.logprobs and batch.kind != "tokens":
            raise InputError(f"{job.input}: run.logprobs needs token inputs (/tokens), this file has /{batch.kind}")
        return InputMeta(batch.num_sequences, batch.seq_len,
                         chunk_tokens(batch.lengths, num_dense, cfg.run.chunk_sequences))
    finally:
        batch.close()


__all__ = ["Job", "InputMeta", "sequence_range", "num_chunks", "chunk_slice", "chunk_tokens", "check_outputs", "check_setup"]
