"""One inference job from files to files: set up, stream chunks, record progress, finalize.

Every step that can fail on some ranks only runs under ``comm.failure.collective``, so a bad file
seen by one rank stops all ranks together.  The output grows in ``<output>.tmp``, each dense
rank's reads and writes overlapping its compute on one I/O thread (``io_worker.py``); once a
chunk is durable on every writer, rank 0 records it in ``<output>.progress.json``
(``resume.py``), so a run stopped by a signal, a dead rank, a time limit or an error found
mid-run resumes where it stopped.  Only errors that doom the output (bad inputs) found before
the first chunk is finished remove the partial output.  Rank 0 holds ``<output>.lock`` for the
job's life (``files/lock.py``): one job per output.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

from .. import __version__
from ..comm.failure import collective, on_rank0
from ..comm.topology import build_topology
from ..config.errors import Interrupted, MoeHpcError, OutputError
from ..config.roles import RoleLayout, check_layout
from ..files.batches import OutputWriter, create_output, logprob_summary, open_input, reopen_output
from ..files.checkpoint import Checkpoint
from ..files.lock import OutputLock
from ..moe.balance import REPORT_WINDOW, Balancer
from ..placement.traces import TraceRecorder, write_trace
from .assemble import assemble, load_weights, wire
from .engine import Engine
from .io_worker import IoWorker
from .job import InputMeta, Job, Preflight, check_setup, chunk_slice, preflight, sequence_range
from .progress import ProgressLog, expert_load, phase_summary
from .resume import (Progress, discard_partial, fingerprint, finished_chunks, kept_for_resume, progress_path_for,
                     publish_with_record, save_progress, start_or_resume)
from .signals import StopRequest, signal_name


def _open_output(job: Job, meta: InputMeta, roles: RoleLayout):
    """Rank 0: resume ``<output>.tmp`` if its record allows, else lay it out afresh.

    Returns (OutputLayout, Progress) (``resume.start_or_resume``)."""
    cfg = job.cfg
    shape = (job.output, meta.num_sequences, meta.seq_len, cfg.model.hidden_size, cfg.run.output_dtype,
             cfg.model.vocab_size if cfg.run.logits else 0, cfg.run.logprobs)
    return start_or_resume(job.output, fingerprint(cfg, job.weights, job.input, roles), len(meta.chunk_tokens),
                           job.restart, cfg.model, lambda: create_output(*shape), lambda: reopen_output(*shape))


def _passengers(job: Job, topo, backend, placement, log) -> dict:
    """The optional passengers of a run, for the MoE layer: the load balancer and the trace recorder."""
    run = job.cfg.run
    trace = TraceRecorder(job.cfg.model) if job.trace is not None else None
    balancer = Balancer(placement, job.cfg.model.top_k, run.balance_threshold, run.balance_gamma, topo.world,
                        backend.to_host, backend.xp, log) if run.balance else None
    return {"balancer": balancer, "trace": trace}


def _load(job: Job, topo, placement, backend, wiring):
    with Checkpoint(job.weights, job.cfg.model) as ckpt:
        return load_weights(job.cfg, topo, placement, backend, wiring, ckpt, head=job.eos is not None)


def _log(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


class JobScope:
    """Around a job's body on every rank: rank 0's output lock (``lock``, taken by the body
    before any file is touched), the partial output's fate on an error (removed by rank 0 when
    the error dooms it and the body had ``owned`` it), and the topology freed at the end."""

    def __init__(self, topo, job: Job):
        self.topo, self.job, self.lock, self.owned = topo, job, None, False

    def __enter__(self) -> "JobScope":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        try:
            if isinstance(exc, MoeHpcError) and self.owned and self.topo.rank == 0 and exc.discards_partial:
                done = finished_chunks(self.job.output)
                if done is not None:        # e.g. a resumed run whose input went bad: keep the work
                    raise kept_for_resume(exc, *done, self.job.output) from exc
                discard_partial(self.job.output)
        finally:
            if self.lock is not None:
                self.lock.release()
            self.topo.free()


def run_job(comm, job: Job, log=_log) -> dict:
    """Run ``job`` on every rank of ``comm``. Returns rank 0's summary (others: {}).

    Raises Interrupted (all ranks) when a stop signal was agreed on at a chunk boundary.
    """
    t_start = time.perf_counter()
    p = job.cfg.parallel
    collective(comm, check_layout, comm.Get_size(), p.dp, p.dense_ranks, p.expert_tp, p.dense_tp, p.dense_stages,
               debug=job.debug)
    topo = build_topology(comm, job.cfg)
    world = topo.world
    with JobScope(topo, job) as scope:
        meta = world.bcast(on_rank0(world, check_setup, job, topo.num_dense, debug=job.debug), root=0)
        scope.lock = on_rank0(world, OutputLock, job.output, debug=job.debug)     # before any file is touched
        engine, checked = prepare_engine(topo, job, meta, log if topo.rank == 0 else (lambda text: None))
        layout, progress = world.bcast(on_rank0(world, _open_output, job, meta, topo.roles, debug=job.debug),
                                       root=0)
        scope.owned = True
        if topo.rank == 0:
            _log_start(log, job, meta, engine, progress, checked.threads)
        t_loop = time.perf_counter()
        stats = stream_chunks(engine, job, meta, layout, progress)
        return _finish(engine, job, meta, progress, stats, t_start, time.perf_counter() - t_loop, log)


def prepare_engine(topo, job: Job, meta: InputMeta, log) -> tuple[Engine, Preflight]:
    """The preflight checks (``job.preflight``), then wire, load and assemble this rank's engine."""
    cfg, world = job.cfg, topo.world
    sync = lambda fn, *a: collective(world, fn, *a, debug=job.debug)
    checked = preflight(topo, job, meta)
    backend, placement = checked.backend, checked.placement
    wiring = wire(cfg, topo, backend)
    weights = sync(_load, job, topo, placement, backend, wiring)
    return assemble(cfg, topo, backend, placement, wiring, weights,
                    **_passengers(job, topo, backend, placement, log)), checked


def _log_start(log, job: Job, meta: InputMeta, engine: Engine, progress: Progress, threads: str) -> None:
    topo, p = engine.topo, job.cfg.parallel
    roles = topo.roles
    tp = f" in TP groups of {p.expert_tp}" if p.expert_tp > 1 else ""
    log(f"moe-hpc: {meta.num_sequences} sequences x {meta.seq_len} positions on {topo.size} rank(s) "
        f"({p.dp} x [{len(roles.dense_ranks)} dense, {len(roles.expert_ranks)} expert{tp}], placement "
        f"{engine.placement.kind}, device {engine.backend.name}), {progress.chunks_total} chunk(s), {threads}")
    if progress.chunks_done == progress.chunks_total:
        log(f"moe-hpc: all {progress.chunks_total} chunk(s) are done (recorded in "
            f"{progress_path_for(job.output)}): finishing the output")
    elif progress.chunks_done:
        log(f"moe-hpc: resuming at chunk {progress.chunks_done + 1} of {progress.chunks_total} "
            f"(recorded in {progress_path_for(job.output)})")


def _finish(engine: Engine, job: Job, meta: InputMeta, progress: Progress, stats: np.ndarray,
            t_start: float, loop_s: float, log=_log) -> dict:
    """Finalize the output (stats, provenance, rename) and return rank 0's summary."""
    topo, world = engine.topo, engine.topo.world
    times = world.gather(dict(engine.times.seconds), root=0)
    idle = world.gather(engine.moe.idle_fraction if topo.is_expert else None, root=0)
    router = engine.moe.router
    trace = router.trace.gather(world, topo.dense_world_ranks) if router.trace else None
    engine.close()
    wall = time.perf_counter() - t_start
    attrs = provenance(job, engine, wall)
    if router.balancer is not None:
        attrs["balance"] = router.balancer.report()
        if topo.rank == 0:
            for b in attrs["balance"]["blocks"]:
                log(f"balance: block {b['block']}: max/mean expert load {b['before']:.2f} (first micro-batch) "
                    f"-> {b['after']:.2f} (last {REPORT_WINDOW}), {b['updates']} bias update(s)")
    scores = on_rank0(world, logprob_summary, job.output, debug=job.debug) if job.cfg.run.logprobs else {}
    if scores:
        attrs.update(scores)
    on_rank0(world, _finalize, job.output, stats, attrs, trace, job.trace, debug=job.debug)
    if topo.rank != 0:
        return {}
    new_tokens = sum(meta.chunk_tokens[progress.chunks_done:])
    return {"output": str(job.output), "sequences": meta.num_sequences, "tokens": sum(meta.chunk_tokens),
            "tokens_this_run": new_tokens, "chunks": progress.chunks_total,
            "resumed_at_chunk": progress.chunks_done, "ranks": topo.size, "nodes": len(set(topo.node_of_rank)),
            "dense_ranks": len(topo.roles.dense_ranks), "expert_ranks": len(topo.roles.expert_ranks),
            "device": engine.backend.name, "wall_time_s": round(wall, 4), "loop_time_s": round(loop_s, 4),
            "tokens_per_s": round(new_tokens / loop_s, 2) if loop_s > 0 else 0.0,
            "steady_tokens_per_s": steady_tokens_per_s(engine.times.chunk_ends, meta.chunk_tokens[progress.chunks_done:]),
            "phases_s": phase_summary(times), "expert_load": expert_load(stats),
            "expert_idle_fraction": _mean([v for v in idle if v is not None]),
            **({"balance": attrs["balance"]} if "balance" in attrs else {}), **(scores or {})}


def steady_tokens_per_s(chunk_ends: list[float], chunk_tokens: list[int]) -> float | None:
    """Tokens/s after the first chunk of this run (which pays one-off costs: kernel compiles,
    cuDNN graph builds, NCCL set-up), from rank 0's chunk-end times; None with one chunk."""
    if len(chunk_ends) < 2:
        return None
    return round(sum(chunk_tokens[1:len(chunk_ends)]) / (chunk_ends[-1] - chunk_ends[0]), 2)


def _mean(values: list) -> float:
    return round(sum(values) / len(values), 4) if values else 0.0


def provenance(job: Job, engine: Engine, wall_s: float) -> dict:
    """The output's root attributes every job writes: what ran, where, and how long."""
    topo = engine.topo
    return {"config": job.cfg.to_json(), "version": __version__, "ranks": topo.size, "roles": topo.describe(),
            "placement": engine.placement.to_json(), "wall_time_s": wall_s, "device": engine.backend.name}


def _finalize(output: Path, stats: np.ndarray, attrs: dict, trace=None, trace_path=None) -> None:
    """Rank 0: the trace first, then the output, so the output appears only when all is done."""
    if trace is not None:
        write_trace(trace_path, trace)
    publish_with_record(output, stats, attrs)


def stream_chunks(engine: Engine, job: Job, meta: InputMeta, layout, progress: Progress, rank_chunks=None,
                  reporter=None) -> np.ndarray:
    """Chunks ``progress.chunks_done ..`` on every rank: read, compute, write, record.
    ``rank_chunks``: a rank's part of a chunk (``_RankChunks``, a run's, unless given: generation's);
    ``reporter``: rank 0's progress (a ProgressLog of the chunks' tokens unless given), told
    ``chunk_done(c, tokens)`` with what ``rank_chunks.chunk(c)`` returned (None: the chunk's own count).

    A ``rank_chunks`` has ``read(c)`` (collective: the chunk's input, agreed on), ``chunk(c)`` (the
    rest of the chunk; its write may still be in flight when it returns), ``settle()`` (collective:
    wait for any write in flight and agree it succeeded everywhere) and ``durable`` (chunks
    ``[.., durable)`` are written and synced on every writer, as agreed): the record follows
    ``durable``, never the chunks computed.

    Returns (rank 0) expert_tokens [moe_layers, experts] int64 summed over ranks and all chunks,
    the resumed ones included; zeros elsewhere.
    """
    topo, world = engine.topo, engine.topo.world
    chunks = progress.chunks_total
    stop = job.stop or StopRequest()
    if reporter is None and topo.rank == 0:
        reporter = ProgressLog(meta.chunk_tokens, progress.chunks_done, job.progress, job.progress_every)
    record, counts = _Record(world, job, progress), np.zeros_like(engine.moe.router.expert_tokens)
    signum = 0
    with (rank_chunks or _RankChunks)(engine, job, meta, layout) as rank_chunks:
        try:
            for c in range(progress.chunks_done, chunks):
                signum = stop.agreed(world)      # every rank sees the same answer: all stop here
                if signum:
                    break
                _read_keeping_finished(rank_chunks, record, c)
                done = rank_chunks.chunk(c)
                world.Reduce(engine.moe.router.expert_tokens, counts, root=0)
                engine.times.chunk_ends.append(time.perf_counter())
                record.finished(c, counts)
                record.save(rank_chunks.durable)
                if reporter and topo.rank == 0:
                    reporter.chunk_done(c, done)
            rank_chunks.settle()                 # the last chunk computed is written before the end or the stop
            record.save(rank_chunks.durable)
        except MoeHpcError as exc:
            if exc.discards_partial and record.done == 0:     # nothing finished: nothing worth keeping
                raise
            raise kept_for_resume(exc, record.done, chunks, job.output) from exc
        if signum:
            raise Interrupted(f"stopped by {signal_name(signum)} after chunk {record.done} of {chunks}; "
                              f"progress is in {progress_path_for(job.output)}: rerun the same "
                              "command to resume")
    return record.progress.expert_tokens if topo.rank == 0 else counts


def _read_keeping_finished(rank_chunks, record: "_Record", c: int) -> None:
    """``rank_chunks.read(c)``; when it fails (on every rank at once: the read is agreed on), the
    chunk before, whose write is still in flight, is settled and recorded first, so the chunks
    kept are all those finished, as when nothing overlapped."""
    try:
        rank_chunks.read(c)
    except MoeHpcError:
        rank_chunks.settle()
        record.save(rank_chunks.durable)
        raise


class _Record:
    """The progress record as this run advances it: ``save(durable)`` records the chunks written
    and synced on every writer, never more. Since a chunk's write may finish after the next
    chunk's compute, rank 0 keeps each computed chunk's expert_tokens totals until it is saved."""

    def __init__(self, world, job: Job, progress: Progress):
        self.world, self.job, self.progress = world, job, progress
        self.done = progress.chunks_done           # the same on every rank
        self.base, self.totals = progress.expert_tokens, {}

    def finished(self, c: int, counts: np.ndarray) -> None:
        """Chunk c is computed; ``counts``: this run's expert_tokens summed over ranks (rank 0's)."""
        if self.world.Get_rank() == 0:
            self.totals[c + 1] = self.base + counts

    def save(self, durable: int) -> None:
        """Collective: record chunks ``[.., durable)`` as done (nothing when already recorded)."""
        if durable <= self.done:
            return
        progress = self.progress
        if self.world.Get_rank() == 0:
            progress = dataclasses.replace(progress, chunks_done=durable, expert_tokens=self.totals[durable])
        on_rank0(self.world, save_progress, self.job.output, progress, debug=self.job.debug)
        self.progress, self.done = progress, durable
        self.totals = {k: v for k, v in self.totals.items() if k > durable}


class _RankChunks:
    """One rank's part of a chunk: a dense rank reads, computes and writes its sequences; an
    expert-only rank serves the chunk's MoE blocks. Opens the input and output on enter.

    A dense rank's file I/O runs on its ``IoWorker`` thread: chunk c+1 is read while chunk c is
    computed (``read``), and chunk c's write and sync run while chunk c+1 is computed
    (``chunk``); both are waited for, and agreed on, on the main thread. The worker's queue is
    in the order handed: read c+1, then write c, so a read never waits behind a write."""

    def __init__(self, engine: Engine, job: Job, meta: InputMeta, layout):
        self.engine, self.job = engine, job
        self.sync = lambda fn, *a: collective(engine.topo.world, fn, *a, debug=job.debug)
        self.layout, self.meta = layout, meta
        self.batch = self.writer = self.io = None
        self.inputs, self.reads = None, {}         # chunk c's input; reads ahead: chunk -> future
        self.in_flight = self.write = None         # the chunk whose write is not yet agreed on; its future
        self.durable = 0

    def __enter__(self) -> "_RankChunks":
        topo, m = self.engine.topo, self.job.cfg.model
        if not topo.is_dense:
            self.sync(lambda: None)
            return self
        self.batch = self.sync(open_input, self.job.input, m.hidden_size, m.vocab_size)
        # in a dense TP group every member holds the same output, and only the last pipeline
        # stage has it: that stage's leaders write
        self.writer = OutputWriter(self.layout) if topo.writes_output else None
        self.lo, self.hi = sequence_range(topo.dense_index, topo.num_dense, self.meta.num_sequences)
        self.io = IoWorker()
        return self

    @property
    def _reads_input(self) -> bool:
        # the first pipeline stage reads the inputs; later stages get activations from the one
        # before (the last reads the tokens too when it scores them)
        e = self.engine
        return e.first_stage or (e.last_stage and self.job.cfg.run.logprobs)

    def read(self, c: int) -> None:
        """Chunk c's input, read ahead during chunk c-1 (or now, for the first), agreed on by every
        rank: a bad value or a failed read raises here, as when it was read here; then chunk
        c+1's read is handed to the worker."""
        if self.batch is None or not self._reads_input:
            self.sync(lambda: None)
            return
        t0 = time.perf_counter()
        future = self.reads.pop(c, None) or self._read_ahead(c)
        self.inputs = self.sync(future.result)
        if c + 1 < len(self.meta.chunk_tokens):
            self.reads[c + 1] = self._read_ahead(c + 1)
        self.engine.times.add("io", t0)

    def _read_ahead(self, c: int):
        s0, s1 = chunk_slice(self.lo, self.hi, c, self.job.cfg.run.chunk_sequences)
        m = self.job.cfg.model
        return self.io.submit(self.batch.read_chunk, s0, s1, m.hidden_size, m.vocab_size)

    def chunk(self, c: int) -> None:
        """Compute chunk c, settle chunk c-1's write, hand chunk c's to the worker."""
        e = self.engine
        if self.batch is None:
            e.serve_chunk()
            self.settle()                   # the agreement the writers join: nothing to write here
            self._write_behind(c, None)
            return
        s0, s1 = chunk_slice(self.lo, self.hi, c, self.job.cfg.run.chunk_sequences)
        lengths = self.batch.lengths[s0:s1]
        hidden, logits = e.forward_chunk(self.inputs if e.first_stage else None, lengths, s0, self.batch.seq_len)
        logprobs = e.next_token_logprobs(hidden, self.inputs, lengths) if self.job.cfg.run.logprobs and \
            hidden is not None else None
        self.inputs = None
        if self.writer is None:             # a dense TP member that is not its group's leader
            hidden = logits = logprobs = None
        # chunk c-1's write settled first: its host arrays are gone before chunk c's exist
        self.settle()
        t0 = time.perf_counter()
        # copied to the host here, on the main thread and the compute stream, so the copy waits
        # for the forward: the worker only ever sees host arrays
        hidden, logits = (None if a is None else e.backend.to_host(a) for a in (hidden, logits))
        e.times.add("io", t0)
        self._write_behind(c, (_write_chunk, self.writer, s0, hidden, logits, logprobs))

    def _write_behind(self, c: int, write) -> None:
        """Hand chunk c's write (``write``: the call, or None with nothing to write) to the worker,
        once chunk c-1's is settled. Every rank has chunk c in flight after it, so all join the
        same agreements."""
        self.in_flight, self.write = c, self.io.submit(*write) if write is not None else None

    def settle(self) -> None:
        """Collective: wait for the write in flight and agree that every writer wrote and synced
        it; its error (a full disk, ...) is raised here, on every rank, inside the agreement."""
        if self.in_flight is None:
            return
        t0, write = time.perf_counter(), self.write
        self.sync(lambda: None if write is None else write.result())
        self.durable, self.in_flight, self.write = self.in_flight + 1, None, None
        self.engine.times.add("io", t0)

    def __exit__(self, *exc) -> None:
        if self.io is not None:     # first: no read or write may still be using the files
            self.io.close()
        if self.writer is not None:
            self.writer.close()
        if self.batch is not None:
            self.batch.close()


def _write_chunk(writer: OutputWriter | None, s0: int, hidden, logits, logprobs=None) -> None:
    """On the worker: write and sync this rank's sequences of one chunk (host arrays; durable
    before it is recorded); a dense TP member that is not its group's leader has nothing to
    write (writer None), nor has a stage other than the last (hidden None)."""
    if writer is None or hidden is None:
        return
    try:
        if hidden.shape[0]:
            writer.write_hidden(s0, hidden)
            if logits is not None:
                writer.write_logits(s0, logits)
            if logprobs is not None:
                writer.write_logprobs(s0, logprobs)
        writer.sync()
    except OSError as exc:      # a full disk or quota, a lost file server: the user's to fix
        raise OutputError(f"{writer.layout.tmp_path}: cannot write sequences {s0}.. ({exc.strerror})") from None


__all__ = ["run_job", "prepare_engine", "stream_chunks", "JobScope", "provenance"]
