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
from .checkpoint import Checkpoint
from .config import Config
from .engine import Engine
from .failure import collective
from .io import (OutputWriter, check_output_path, create_output, discard_output, finalize_output,
                 open_input)
from .placement import make_placement
from .topology import build_topology, check_layout


@dataclass(frozen=True)
class Job:
    cfg: Config
    weights: Path
    input: Path
    output: Path
    overwrite: bool = False
    debug: bool = False


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
    return _inspect_input(job)


def _load(engine: Engine, job: Job) -> None:
    with Checkpoint(job.weights, job.cfg.model) as ckpt:
        engine.load(ckpt)


def run_job(comm, job: Job, log=print) -> dict:
    """Run ``job`` on every rank of ``comm``. Returns rank 0's summary (others: {})."""
    t_start = time.perf_counter()
    cfg = job.cfg
    p = cfg.parallel
    collective(comm, check_layout, comm.Get_size(), p.dp, p.dense_ranks, p.expert_tp, debug=job.debug)
    topo = build_topology(comm, cfg)
    world, rank = topo.world, topo.rank
    sync = lambda fn, *a: collective(world, fn, *a, debug=job.debug)
    try:
        meta = world.bcast(sync(_check_setup, job, rank), root=0)
        backend = sync(make_backend, cfg.run.device, topo.local_rank)
        placement = sync(make_placement, cfg.model, topo.num_expert_slots, cfg.parallel.placement)
        engine = Engine(cfg, topo, backend, placement)
        sync(_load, engine, job)
        layout = world.bcast(
            sync(lambda: create_output(job.output, meta.num_sequences, meta.seq_len, cfg.model.hidden_size,
                                       cfg.run.output_dtype, cfg.model.vocab_size if cfg.run.logits else 0)
                 if rank == 0 else None), root=0)
        if rank == 0:
            log(f"moe-hpc: {meta.num_sequences} sequences x {meta.seq_len} positions on {topo.size} rank(s) "
                f"({p.dp} x [{len(topo.roles.dense_ranks)} dense, {len(topo.roles.expert_ranks)} expert"
                f"{f' in TP groups of {p.expert_tp}' if p.expert_tp > 1 else ''}], "
                f"placement {placement.kind}, device {backend.name})")
        tokens = _stream_chunks(engine, job, meta, layout, sync)
        stats = np.zeros_like(engine.expert_tokens)
        world.Reduce(engine.expert_tokens, stats, root=0)
        wall = time.perf_counter() - t_start
        summary = {}
        if rank == 0:
            attrs = {"config": cfg.to_json(), "version": __version__, "ranks": topo.size,
                     "roles": topo.describe(), "placement": placement.to_json(),
                     "wall_time_s": wall, "device": backend.name}
            sync(finalize_output, job.output, stats, attrs)
            summary = {"output": str(job.output), "sequences": meta.num_sequences, "tokens": tokens,
                       "wall_time_s": wall, "tokens_per_s": tokens / wall if wall else 0.0}
        idle = world.gather(engine.expert_idle_fraction() if topo.is_expert else None, root=0)
        if rank == 0:
            idle = [v for v in idle if v is not None]
            summary["expert_idle_fraction"] = sum(idle) / len(idle) if idle else 0.0
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
    nchunks = num_chunks(meta.num_sequences, topo.num_dense, cfg.run.chunk_sequences)
    batch = writer = None
    if topo.is_dense:
        batch = sync(open_input, job.input, cfg.model.hidden_size, cfg.model.vocab_size)
        writer = OutputWriter(layout)
        lo, hi = sequence_range(topo.dense_index, topo.num_dense, meta.num_sequences)
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
