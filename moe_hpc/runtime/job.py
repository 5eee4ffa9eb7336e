"""A job and its chunks: which sequences each dense rank owns and how they are cut.

Pure arithmetic shared by the runner and the dry run (and the tests): dense rank d of D owns a
contiguous block of sequences, and every rank steps through the same number of chunks, enough
for the largest block, so the collectives of a chunk match on all ranks.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..comm.failure import collective
from ..comm.topology import ranks_sharing_cores
from ..config.errors import InputError
from ..config.run_config import Config, config_files
from ..device.backend import free_memory_bytes, make_backend
from ..device.threads import limit_blas_threads
from ..files.atomic import check_output
from ..files.batches import open_input
from ..files.checkpoint import Checkpoint
from ..files.lock import lock_path_for
from ..files.prompts import completions_path
from ..model.attention import fused_core_expected
from ..placement.file import make_placement
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
    # planner.fit.check_memory, handed in by the CLI (the runtime may not import the planner):
    # (cfg, world size, rank in its replica, world rank, seq_len, free bytes | None) -> MemoryFit
    memory_check: Callable | None = None
    eos: tuple[int, ...] | None = None   # generation (``moe-hpc generate``): end-of-sequence ids; None: a run
    # ``generate --prompts``: the JSON Lines prompts and the folder of their tokenizer.json; the
    # input is then the tokenised batch that rank 0 writes at ``prompt_batch_path(output)``
    prompts: Path | None = None
    tokenizer_dir: Path | None = None


@dataclass(frozen=True)
class InputMeta:
    num_sequences: int
    seq_len: int
    chunk_tokens: tuple[int, ...]     # [chunks] valid tokens per chunk, summed over dense ranks
    chunk_counts: tuple[int, ...]     # [chunks] sequences per chunk, summed over dense ranks
    kind: str = "hidden"              # the input's dataset: hidden | tokens


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
    """lengths: [S] int64 -> [chunks] valid tokens of each chunk over all dense ranks (ones:
    its sequences)."""
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
    beside = (progress_path_for(job.output), lock_path_for(job.output))
    if job.prompts is None:
        inputs = (job.weights, job.input, *config_files(job.cfg))
    else:                             # job.input is then written beside the output, as is OUT.jsonl
        inputs = (job.weights, job.prompts, job.tokenizer_dir, *config_files(job.cfg))
        beside += (job.input,)
    check_output(job.output, job.overwrite, inputs, beside=beside)
    if job.prompts is not None:
        check_output(completions_path(job.output), job.overwrite, inputs + (job.output,))
    if job.trace is not None:
        check_output(job.trace, job.overwrite, inputs + (job.output,))
    if job.summary is not None:       # a summary is a report, rewritten by every run
        check_output(job.summary, True, inputs + (job.output,))


def check_setup(job: Job, num_dense: int) -> InputMeta:
    """Rank 0: the output may be written, the checkpoint is this model's, the input is readable;
    its shape and chunk sizes."""
    check_outputs(job)
    cfg = job.cfg
    # the checkpoint's model table before placement: a mistyped --set model.num_experts must be
    # refused by name here, not found as an allocation the size of that table
    with Checkpoint(job.weights, cfg.model):
        pass
    batch = open_input(job.input, cfg.model.hidden_size, cfg.model.vocab_size)
    try:
        if cfg.run.logprobs and batch.kind != "tokens":
            raise InputError(f"{job.input}: run.logprobs needs token inputs (/tokens), this file has /{batch.kind}")
        if not cfg.run.allow_long_sequences:
            batch.check_positions(cfg.model.max_position_embeddings)
        return InputMeta(batch.num_sequences, batch.seq_len,
                         chunk_tokens(batch.lengths, num_dense, cfg.run.chunk_sequences),
                         chunk_tokens(np.ones_like(batch.lengths), num_dense, cfg.run.chunk_sequences), batch.kind)
    finally:
        batch.close()


def check_input_values(job: Job, part: int, parts: int) -> float:
    """Part ``part`` of ``parts`` of the input's sequences holds no bad value (a token out of
    range, NaN/Inf at a valid position), read block by block: run by every dense rank before
    any weight is loaded, so a bad value near the end cannot cost the work before it.
    Returns the seconds it took."""
    t0 = time.perf_counter()
    m = job.cfg.model
    batch = open_input(job.input, m.hidden_size, m.vocab_size)
    try:
        batch.check_values(*sequence_range(part, parts, batch.num_sequences), m.hidden_size, m.vocab_size)
    finally:
        batch.close()
    return time.perf_counter() - t0


def check_input_share(job: Job, topo) -> float:
    """``check_input_values`` on this rank's share, the input split over every dense rank
    (expert-only ranks may not see the input): the seconds it took, 0 on expert-only ranks."""
    if not topo.is_dense:
        return 0.0
    dense = topo.dense_world_ranks
    return check_input_values(job, dense.index(topo.rank), len(dense))


def check_fit(job: Job, topo, backend, seq_len: int):
    """This rank's planned memory against its device's free memory (``Job.memory_check``), before
    any weight is loaded: a MemoryFit, or None when the job has no check."""
    if job.memory_check is None:
        return None
    return job.memory_check(job.cfg, topo.size, topo.group_rank, topo.rank, seq_len, free_memory_bytes(backend),
                            fused_core=fused_core_expected(job.cfg.run.attention, backend))


def checked_input_line(meta: InputMeta, job: Job, dense: int, seconds: float) -> str:
    """The dry run's line saying what ``check_input_values`` made sure of."""
    m = job.cfg.model
    limit = m.max_position_embeddings if not job.cfg.run.allow_long_sequences else 0
    return (f"input: all {meta.num_sequences} sequences checked before any compute by {dense} dense rank(s) in "
            f"{seconds:.2f} s: lengths in [0, L = {meta.seq_len}]"
            + (f" and <= max_position_embeddings = {limit}" if limit else "")
            + ", at every valid position " + (f"tokens in [0, vocab_size = {m.vocab_size})" if meta.kind == "tokens"
                                              else "hidden values finite (no NaN or Inf)"))



@dataclass
class Preflight:
    """What the checks before loading leave behind, for the run and its dry run alike."""
    backend: object
    placement: object
    check_seconds: float          # this rank's share of the input-value check (0 on expert-only ranks)
    fit: object                   # this rank's MemoryFit, or None when the job has no memory check
    threads: str                  # the BLAS threads each rank was given, for the start line


def preflight(topo, job: Job, meta: InputMeta) -> Preflight:
    """Every rank, before any weight is loaded: its BLAS threads, every input value (the dense ranks' shares), the
    device, the planner's memory against its free memory, the placement. One home, so the dry
    run checks exactly what the run does."""
    sync = lambda fn, *a: collective(topo.world, fn, *a, debug=job.debug)
    threads = sync(limit_blas_threads, *ranks_sharing_cores(topo.node))
    seconds = sync(check_input_share, job, topo)
    backend = sync(make_backend, job.cfg.run.device, topo.local_rank, job.cfg.run.memory_limit_gib)
    fit = sync(check_fit, job, topo, backend, meta.seq_len)
    placement = sync(make_placement, job.cfg.model, topo.num_expert_slots, job.cfg.parallel.placement)
    return Preflight(backend, placement, seconds, fit, threads)

__all__ = ["Job", "InputMeta", "sequence_range", "num_chunks", "chunk_slice", "chunk_tokens", "check_outputs", "check_setup",
           "check_input_values", "Preflight", "preflight", "check_input_share", "checked_input_line", "check_fit"]
