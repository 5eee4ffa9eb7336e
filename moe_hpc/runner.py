"""One inference job from files to files: set up, stream chunks, write, finalize.

Every step that can fail on some ranks only runs under ``failure.collective``, so a bad file
seen by one rank stops all ranks together, and the temporary output is removed.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import __version__
from .backend import make_backend
from .balance import REPORT_WINDOW, Balancer
from .checkpoint import Checkpoint
from .config import Config
from .engine import Engine
from .failure import collective
from .io import (OutputWriter, check_output_path, create_output, discard_output, finalize_output,
                 open_input)
from .placement import make_placement
from .topology import build_topology, role_layout
from .trace import TraceRecorder, write_trace


@dataclass(frozen=True)
class Job:
    cfg: Config
    weights: Path
    input: Path
    output: Path
    overwrite: bool = False
    debug: bool = False
    trace: Path | None = None       # also record a routing trace here (``--trace``)


@dataclass(frozen=True)
class InputMeta:
    num_sequences: int
    seq_len: int


def sequence_range(dense_index: int, num_dense: int, num_sequences: int) -> tuple[int, int]:
    """Contiguous block of sequences owned by dense rank ``dense_index``."""
    return (dense_index * num_sequences // num_dense, (dense_index + 1) * num_sequences // num_dense)


def num_chunks(num_sequences: int, num_dense: int, chunk_sequences: int) -> int:
    """Chunks every rank steps through: enough for the largest dense rank's share."""
    largest = max(b - a for a, b in (sequence_range(d, num_dense, num_sequences) for d in range(num_dense)))
    return math.ceil(largest / chunk_sequences)


def _inspect_input(job: Job) -> InputMeta:
    batch = open_input(job.input, job.cfg.model.hidden_size, job.cfg.model.vocab_size)
    try:
        return InputMeta(batch.num_sequences, batch.seq_len)
    finally:
        batch.close()


def _check_setup(job: Job, rank: int):
    if rank != 0:
        return None
    check_output_path(job.output, job.overwrite)
    if job.trace is not None:
        check_output_path(job.trace, job.overwrite)
    return _inspect_input(job)


def _attach(engine: Engine, job: Job, placement, log) -> None:
    """The optional passengers of a run: the load balancer and the trace recorder."""
    run = job.cfg.run
    if run.balance:
        engine.balancer = Balancer(placement, job.cfg.model.top_k, run.balance_threshold, run.balance_gamma,
                                   engine.topo.world, engine.backend.to_host, engine.xp, log)
    if job.trace is not None:
        engine.trace = TraceRecorder(job.cfg.model)


def _finish(job: Job, stats: np.ndarray, attrs: dict, trace) -> None:
    """Rank 0: the trace first, then the output, so the output appears only when all is done."""
    if trace is not None:
        write_trace(job.trace, trace)
    finalize_output(job.output, stats, attrs)


def _load(engine: Engine, job: Job) -> None:
    with Checkpoint(job.weights, job.cfg.model) as ckpt:
        engine.load(ckpt)


def run_job(comm, job: Job, log=print) -> dict:
    """Run ``job`` on every rank of ``comm``. Returns rank 0's summary (others: {})."""
    t_start = time.perf_counter()
    cfg = job.cfg
    collective(comm, role_layout, comm.Get_size(), cfg.parallel.dense_ranks, debug=job.debug)
    topo = build_topology(comm, cfg)
    world, rank = topo.world, topo.rank
    sync = lambda fn, *a: collective(world, fn, *a, debug=job.debug)
    try:
        meta = world.bcast(sync(_check_setup, job, rank), root=0)
        backend = sync(make_backend, cfg.run.device, topo.local_rank)
        placement = sync(make_placement, cfg.model, len(topo.roles.expert_ranks), cfg.parallel.placement)
        engine = Engine(cfg, topo, backend, placement)
        _attach(engine, job, placement, log)
        sync(_load, engine, job)
        layout = world.bcast(
            sync(lambda: create_output(job.output, meta.num_sequences, meta.seq_len, cfg.model.hidden_size,
                                       cfg.run.output_dtype, cfg.model.vocab_size if cfg.run.logits else 0)
                 if rank == 0 else None), root=0)
        if rank == 0:
            log(f"moe-hpc: {meta.num_sequences} sequences x {meta.seq_len} positions on {topo.size} rank(s) "
                f"({len(topo.roles.dense_ranks)} dense, {len(topo.roles.expert_ranks)} expert, "
                f"placement {placement.kind}, device {backend.name})")
        tokens = _stream_chunks(engine, job, meta, layout, sync)
        stats = np.zeros_like(engine.expert_tokens)
        world.Reduce(engine.expert_tokens, stats, root=0)
        trace = engine.trace.gather(world, topo.roles.dense_ranks) if engine.trace else None
        wall = time.perf_counter() - t_start
        summary = {}
        if rank == 0:
            attrs = {"config": cfg.to_json(), "version": __version__, "ranks": topo.size,
                     "roles": topo.describe(), "placement": placement.to_json(),
                     "wall_time_s": wall, "device": backend.name}
            if engine.balancer is not None:
                attrs["balance"] = engine.balancer.report()
                for b in attrs["balance"]["blocks"]:
                    log(f"balance: block {b['block']}: max/mean expert load {b['before']:.2f} (first micro-batch) "
                        f"-> {b['after']:.2f} (last {REPORT_WINDOW}), {b['updates']} bias update(s)")
            sync(_finish, job, stats, attrs, trace)
            summary = {"output": str(job.output), "sequences": meta.num_sequences, "tokens": tokens,
                       "wall_time_s": wall, "tokens_per_s": tokens / wall if wall else 0.0}
            if engine.balancer is not None:
                summary["balance"] = attrs["balance"]
        else:
            sync(lambda: None)
        engine.close()
        return summary
    except BaseException:
        if rank == 0:
            discard_output(job.output)
        raise
    finally:
        topo.free()


def _stream_chunks(engine: Engine, job: Job, meta: InputMeta, layout, sync) -> int:
    """Read, compute and write every chunk; returns the valid tokens processed (summed)."""
    topo, cfg = engine.topo, job.cfg
    dense = topo.roles.dense_ranks
    nchunks = num_chunks(meta.num_sequences, len(dense), cfg.run.chunk_sequences)
    batch = writer = None
    if topo.is_dense:
        batch = sync(open_input, job.input, cfg.model.hidden_size, cfg.model.vocab_size)
        writer = OutputWriter(layout)
        lo, hi = sequence_range(dense.index(topo.rank), len(dense), meta.num_sequences)
    else:
        sync(lambda: None)
    tokens = 0
    try:
        for c in range(nchunks):
            if not topo.is_dense:
                sync(lambda: None)
                engine.serve_chunk()
                sync(lambda: None)
                continue
            s0 = min(hi, lo + c * cfg.run.chunk_sequences)
            s1 = min(hi, s0 + cfg.run.chunk_sequences)
            inputs = sync(batch.read_chunk, s0, s1, cfg.model.hidden_size, cfg.model.vocab_size)
            lengths = batch.lengths[s0:s1]
            hidden, logits = engine.forward_chunk(inputs, lengths, s0)
            sync(_write_chunk, writer, engine.backend, s0, hidden, logits)
            tokens += int(lengths.sum())
    finally:
        if writer is not None:
            writer.close()
        if batch is not None:
            batch.close()
    return topo.world.allreduce(tokens)


def _write_chunk(writer: OutputWriter, backend, s0: int, hidden, logits) -> None:
    if hidden.shape[0] == 0:
        return
    writer.write_hidden(s0, backend.to_host(hidden))
    if logits is not None:
        writer.write_logits(s0, backend.to_host(logits))


__all__ = ["Job", "run_job", "sequence_range", "num_chunks"]
