"""``moe-hpc generate``: continue each prompt of a token batch by up to N tokens (SPEC,
"Generation"; docs/generate.md).

A run's machinery carries it (runner.py): the same set-up, failure agreement, output lock,
chunks as the groups of sequences that are recorded and resumed, stop signals between groups.
Per group a dense rank allocates every attention block's KV cache once, with a row ("slot")
for each of its sequences or ``generate.decode_slots`` of them, runs one prefill over the
prompts that have a slot, then decode steps in which all its active sequences step together,
one new position each; with fewer slots than sequences a finished sequence's slot goes to the
next waiting prompt, whose prefill joins the step (continuous batching). Every rank joins every
step's MoE exchanges (a rank with nothing to run, or an expert-only one, with no tokens) until
no rank has an active or a waiting sequence left.

With text prompts (``--prompts``) rank 0 tokenises them into ``<output>.prompts.h5``, the job's
input, and writes the decoded completions to ``OUT.jsonl`` once every group is written.
"""
from __future__ import annotations

import dataclasses
import sys
import time

import numpy as np

from ..comm.failure import collective, on_rank0
from ..comm.topology import build_topology
from ..config.errors import ConfigError, InputError, MoeHpcError
from ..config.roles import check_layout
from ..files.batches import open_input
from ..files.generated import (FINISH_EOS, FINISH_LENGTH, FINISH_POSITIONS, create_generated,
                               generated_summary, read_generated, reopen_generated, write_generated)
from ..files.lock import OutputLock
from ..files.prompts import (completions_path, decode, keep_or_write_token_batch, read_token_prompts,
                             write_completions)
from ..model.blocks import CacheAt
from ..model.sampling import SamplingParams, pick_tokens
from .job import InputMeta, Job, check_outputs, check_setup, chunk_slice, sequence_range
from .progress import ProgressLog, phase_summary
from .resume import Progress, fingerprint, progress_path_for, publish_with_record, start_or_resume
from .runner import JobScope, prepare_engine, provenance, stream_chunks


def generate_config(cfg, log):
    """The run config as generation runs it: a vocabulary, and one wave (cross-layer waves stay
    off: a decode step is one position per sequence)."""
    if cfg.model.vocab_size == 0:
        raise ConfigError(f"{cfg.source}: generate needs model.vocab_size > 0 (token inputs and an LM head)")
    if cfg.run.pipeline_waves > 1:
        log(f"moe-hpc: generate runs run.pipeline_waves = 1 (was {cfg.run.pipeline_waves}): cross-layer waves "
            "stay off during decode")
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, pipeline_waves=1))
    return cfg


def sampling_params(cfg) -> SamplingParams:
    g = cfg.generate
    return SamplingParams(g.temperature, g.top_k, g.top_p, g.seed)


def check_prompts(job: Job, num_dense: int) -> InputMeta:
    """Rank 0: the run's checks of paths and input, then generation's: token prompts, none
    empty, none so long that prompt + max_new_tokens passes max_position_embeddings."""
    cfg = job.cfg
    meta = check_setup(dataclasses.replace(job, cfg=dataclasses.replace(
        cfg, run=dataclasses.replace(cfg.run, allow_long_sequences=True))), num_dense)
    if meta.kind != "tokens":
        raise InputError(f"{job.input}: generate needs token prompts (/tokens), this file has /{meta.kind}")
    batch = open_input(job.input, cfg.model.hidden_size, cfg.model.vocab_size)
    lengths = batch.lengths
    batch.close()
    if (lengths == 0).any():
        raise InputError(f"{job.input}: sequence {int(np.argmax(lengths == 0))} has an empty prompt "
                         "(/lengths is 0): there is no last token to continue from")
    check_prompt_lengths(lengths, cfg, lambda s: f"{job.input}: sequence {s}")
    return meta


def check_prompt_lengths(lengths: np.ndarray, cfg, where) -> None:
    """lengths [S]: none so long that prompt + max_new_tokens passes max_position_embeddings
    (unless run.allow_long_sequences); ``where(s)`` names sequence s in the message."""
    N, limit = cfg.generate.max_new_tokens, cfg.model.max_position_embeddings
    if limit and not cfg.run.allow_long_sequences and (lengths + N > limit).any():
        s = int(np.argmax(lengths + N > limit))
        raise InputError(f"{where(s)}: its prompt of {lengths[s]} tokens plus generate.max_new_tokens"
                         f" = {N} passes the model's max_position_embeddings = {limit}; shorten one or set "
                         "run.allow_long_sequences = true")


@dataclasses.dataclass(frozen=True)
class TextPrompts:
    """Rank 0's text side of ``--prompts``: the prompts (for OUT.jsonl) and their tokenizer."""
    prompts: list
    tokenizer: object


def tokenize_prompts(job: Job) -> TextPrompts:
    """Rank 0, after the output checks and under the lock: read and tokenise ``job.prompts``, and
    leave the batch at ``job.input`` for the job to read.

    A file rather than an in-memory batch: every dense rank reads its share of the input by path
    (``open_input``), the output checks and the resume fingerprint are about files, and a rerun
    finds the very batch its partial output was made from (kept unless the tokens changed)."""
    prompts, batch, tokenizer = read_token_prompts(job.prompts, job.tokenizer_dir, job.cfg.model.vocab_size)
    # named by the prompt's line, and before the batch is written
    check_prompt_lengths(batch.lengths, job.cfg, lambda s: f"{job.prompts}:{prompts[s].line}")
    keep_or_write_token_batch(job.input, batch)
    return TextPrompts(prompts, tokenizer)


def check_job(job: Job, num_dense: int) -> tuple[InputMeta, TextPrompts | None]:
    """Rank 0, before any work: ``check_prompts``, after tokenising text prompts if any."""
    text = tokenize_prompts(job) if job.prompts is not None else None
    return check_prompts(job, num_dense), text


def drop_prompt_batch(job: Job) -> None:
    """Rank 0, the job failed: the tokenised prompts go unless a partial output kept for resuming needs them."""
    if job.prompts is not None and not progress_path_for(job.output).exists():
        job.input.unlink(missing_ok=True)


def write_text_completions(job: Job, text: TextPrompts) -> None:
    """Rank 0, every group written (before the output's rename, so a crash in between leaves
    a partial output a rerun resumes): OUT.jsonl, one completion per prompt in input order."""
    generated, lengths, finish = read_generated(job.output)
    write_completions(completions_path(job.output), text.prompts, decode(text.tokenizer, generated, lengths), finish)


def _open_output(job: Job, meta: InputMeta, roles):
    """Rank 0: resume ``<output>.tmp`` if its record allows, else lay it out afresh -> Progress."""
    S, N = meta.num_sequences, job.cfg.generate.max_new_tokens
    fp = fingerprint(job.cfg, job.weights, job.input, roles) | {"eos": list(job.eos)}
    _, progress = start_or_resume(job.output, fp, len(meta.chunk_tokens), job.restart, job.cfg.model,
                                  lambda: create_generated(job.output, S, N), lambda: reopen_generated(job.output, S, N))
    return progress


class _Group:
    """One group's results on the host: tokens [s, N] int32 (-1 padding), lengths [s],
    logprobs [s, N] float32 (NaN padding), finish [s] uint8."""

    def __init__(self, s: int, N: int):
        self.tokens = np.full((s, N), -1, np.int32)
        self.logprobs = np.full((s, N), np.nan, np.float32)
        self.lengths = np.zeros(s, np.int32)
        self.finish = np.full(s, FINISH_LENGTH, np.uint8)

    def record(self, rows, steps, tokens, logprobs, stop, reason) -> None:
        """rows: [n] the sequences that ran, each at its own ``steps`` [n]; stop: [n] which of
        them end here, for ``reason`` [n]."""
        self.tokens[rows, steps], self.logprobs[rows, steps], self.lengths[rows] = tokens, logprobs, steps + 1
        self.finish[rows[stop]] = reason[stop]


def _stops(tokens, steps, prompt_lengths, N: int, eos: np.ndarray, limit: int):
    """tokens: [n] just picked at ``steps`` [n] by sequences of ``prompt_lengths`` [n] -> (stop
    [n], reason [n]): an end-of-sequence id, the N-th token, or the model's last position."""
    at_eos = np.isin(tokens, eos)
    at_limit = (prompt_lengths + steps + 1 >= limit) if limit else np.zeros(len(tokens), bool)
    reason = np.where(at_eos, FINISH_EOS, np.where(steps + 1 == N, FINISH_LENGTH, FINISH_POSITIONS)).astype(np.uint8)
    return at_eos | (steps + 1 == N) | at_limit, reason


class _Slots:
    """A dense rank's KV cache rows ("slots") for its group of ``sequences``: ``count`` of them
    (``GenerateConfig.cache_rows``), taken by the group's sequences in input order as earlier
    ones finish (continuous batching). Every member of the owner's pipeline and dense-TP group
    keeps the same books from the same shared picks, so they agree on every row."""

    def __init__(self, sequences: int, count: int):
        self.count, self.sequences = count, sequences
        self.of = np.full(sequences, -1, np.int64)        # each sequence's cache row while it runs
        self.free = list(range(count))
        self.next = 0                                     # the first sequence not yet admitted

    def room(self, running: int) -> int:
        """How many waiting sequences the next step admits when ``running`` continue."""
        return min(self.count - running, self.sequences - self.next)

    def release(self, finished: np.ndarray) -> None:
        self.free.extend(int(r) for r in self.of[finished])
        self.of[finished] = -1

    def admit(self, n: int) -> np.ndarray:
        """The next ``n`` waiting sequences, each into the lowest free row -> their indices [n]."""
        self.free.sort()
        seqs = np.arange(self.next, self.next + n, dtype=np.int64)
        self.of[seqs], self.free, self.next = self.free[:n], self.free[n:], self.next + n
        return seqs


def share_picks(world, owner: int | None, picks):
    """Collective over the world, once per decode step: each sequence owner's picks (still
    active rows [n], their new tokens [n], how many waiting sequences it admits next), from the
    rank that made them (the leader of the last pipeline stage, ``owner`` its dense_index; None
    elsewhere) to every rank of its pipeline and TP group -> {owner: picks}, or None when no
    rank has an active or a waiting sequence left."""
    entries = world.allgather(None if owner is None else (owner, picks))
    table = dict(e for e in entries if e is not None)
    return table if any(len(rows) or admits for rows, _, admits in table.values()) else None


def _forwards(table) -> tuple[bool, bool]:
    """The step's collective forwards, the same on every rank: (a decode step, as some rank has
    active sequences; a prefill, as some rank admits waiting ones)."""
    return (any(len(rows) for rows, _, _ in table.values()), any(admits for _, _, admits in table.values()))


def _prefill(engine, tokens: np.ndarray, lengths: np.ndarray, seqs: np.ndarray, slots: _Slots, s0: int, P: int):
    """The prompts of ``seqs`` (maybe none) into their cache rows from position 0 -> their
    logits [n, V] on the last stage."""
    La = int(lengths[seqs].max(initial=1))
    return engine.forward_cached(tokens[seqs, :La], lengths[seqs], CacheAt(slots.of[seqs], np.zeros(len(seqs), np.int64)),
                                 (s0 + seqs)[:, None] * P + np.arange(La)[None, :])


def _step(engine, table, owner: int, ran, slots: _Slots, made, tokens, lengths, s0: int, P: int, t0: float):
    """This dense rank's forwards of one step, those every rank runs (``_forwards``): of the
    sequences that ran (``ran``) the finished give back their slots, the active decode one
    position, then the prompts it admits prefill -> (the sequences that ran now, in the logits'
    order; their logits [n, V] on the last stage, else None; the time)."""
    none = np.zeros(0, np.int64)
    rows, picked, admits = table.get(owner, (none, none, 0))
    slots.release(np.setdiff1d(ran, rows))
    order = np.argsort(slots.of[rows])                    # ascending rows: MLA's cache read is then a view
    rows, picked = rows[order], picked[order]
    decode, prefill = _forwards(table)
    parts = []
    if decode:
        pos = lengths[rows] + made[rows] - 1
        parts.append(engine.forward_cached(picked[:, None], np.ones(len(rows), np.int64), CacheAt(slots.of[rows], pos),
                                           ((s0 + rows) * P + pos)[:, None]))
        t0 = engine.times.add("decode", t0)
    admitted = slots.admit(admits) if prefill else none
    if prefill:
        parts.append(_prefill(engine, tokens, lengths, admitted, slots, s0, P))
        t0 = engine.times.add("prefill", t0)
    logits = np.concatenate(parts) if parts[0] is not None else None
    return np.concatenate([rows, admitted]), logits, t0


def decode_group(engine, world, tokens: np.ndarray, lengths: np.ndarray, s0: int, job: Job) -> _Group:
    """A dense rank's group (its sequences s0.., maybe none): tokens [s, L] prompts, lengths [s]
    -> its generated tokens (on the last stage). Collective over the world: one exchange per
    MoE block and forward (a step's decode, and its prefill of newly admitted prompts), one
    ``share_picks`` per step. A sequence's tokens depend on its own steps only, never on its
    cache row or the sequences beside it (sampling is keyed by sequence and step)."""
    cfg, N, topo = job.cfg, job.cfg.generate.max_new_tokens, engine.topo
    s, L = tokens.shape
    P, params = L + N, sampling_params(cfg)
    eos = np.asarray(() if cfg.generate.ignore_eos else job.eos, np.int64)
    limit = 0 if cfg.run.allow_long_sequences else cfg.model.max_position_embeddings
    owner = topo.dense_index if topo.writes_output else None
    group, made = _Group(s, N), np.zeros(s, np.int64)
    slots = _Slots(s, cfg.generate.cache_rows(s))
    t0 = time.perf_counter()
    engine.open_cache(slots.count, P)
    ran = slots.admit(slots.room(0))
    logits = _prefill(engine, tokens, lengths, ran, slots, s0, P)
    t0 = engine.times.add("prefill", t0)
    while True:
        picks = None
        if logits is not None:                            # the last stage picks
            steps = made[ran]
            picked, logprobs = pick_tokens(logits, s0 + ran, steps, params)
            stop, reason = _stops(picked, steps, lengths[ran], N, eos, limit)
            group.record(ran, steps, picked, logprobs, stop, reason)
            picks = (ran[~stop], picked[~stop].astype(np.int64), slots.room(int(np.count_nonzero(~stop))))
        made[ran] += 1
        table = share_picks(world, owner, picks)
        if table is None:                                 # every rank steps while any has a sequence
            break
        ran, logits, t0 = _step(engine, table, topo.dense_index, ran, slots, made, tokens, lengths, s0, P, t0)
    engine.times.add("decode", t0)
    return group


def serve_group(engine, world) -> None:
    """An expert-only rank's part of a group: the first prefill's exchanges, then each step's
    forwards' (a decode step, a prefill of admitted prompts, or both)."""
    t0 = time.perf_counter()
    engine.serve_chunk()
    t0 = engine.times.add("prefill", t0)
    while (table := share_picks(world, None, None)) is not None:
        for _ in range(sum(_forwards(table))):
            engine.serve_chunk()
    engine.times.add("decode", t0)


class _GenerateChunks:
    """One rank's part of a group (``runner.stream_chunks``' rank_chunks): a dense rank reads its
    prompts and decodes them, an expert-only rank serves; rank 0 gathers the writers' rows,
    writes them durably and returns the group's generated tokens (the progress line's count).
    Its I/O stays on the main thread (a group's decode dwarfs its read and write): each group is
    durable when ``chunk`` returns, and ``settle`` has nothing to wait for."""

    def __init__(self, engine, job: Job, meta: InputMeta, layout=None):
        self.engine, self.job, self.meta = engine, job, meta
        self.world = engine.topo.world
        self.batch = self.tokens = None
        self.durable = 0

    def __enter__(self) -> "_GenerateChunks":
        topo, m = self.engine.topo, self.job.cfg.model
        if topo.is_dense:
            self.batch = collective(self.world, open_input, self.job.input, m.hidden_size, m.vocab_size,
                                    debug=self.job.debug)
            self.lo, self.hi = sequence_range(topo.dense_index, topo.num_dense, self.meta.num_sequences)
        else:
            collective(self.world, lambda: None, debug=self.job.debug)
        return self

    def read(self, c: int) -> None:
        """Collective: group c's prompts (a dense rank's), agreed on by every rank."""
        m = self.job.cfg.model
        if self.batch is None:
            collective(self.world, lambda: None, debug=self.job.debug)
            return
        s0, s1 = chunk_slice(self.lo, self.hi, c, self.job.cfg.run.chunk_sequences)
        self.tokens = collective(self.world, self.batch.read_chunk, s0, s1, m.hidden_size, m.vocab_size,
                                 debug=self.job.debug)

    def chunk(self, c: int) -> int | None:
        e, job = self.engine, self.job
        part = None
        if self.batch is None:
            serve_group(e, self.world)
        else:
            s0, s1 = chunk_slice(self.lo, self.hi, c, job.cfg.run.chunk_sequences)
            g = decode_group(e, self.world, self.tokens, self.batch.lengths[s0:s1], s0, job)
            if e.topo.writes_output and s1 > s0:
                part = (s0, g.tokens, g.lengths, g.logprobs, g.finish)
        parts = [p for p in self.world.gather(part, root=0) or [] if p is not None]
        t0 = time.perf_counter()
        on_rank0(self.world, write_generated, job.output, parts, debug=job.debug)
        e.times.add("io", t0)
        self.durable = c + 1
        return sum(int(p[2].sum()) for p in parts)

    def settle(self) -> None:
        """Nothing in flight: ``chunk`` writes its group before it returns."""

    def __exit__(self, *exc) -> None:
        if self.batch is not None:
            self.batch.close()


def generate_job(comm, job: Job, log=None) -> dict:
    """``run_job``'s course for generation (``job.eos`` set): rank 0's summary (others: {})."""
    t_start, log = time.perf_counter(), log or _log
    p = job.cfg.parallel
    collective(comm, check_layout, comm.Get_size(), p.dp, p.dense_ranks, p.expert_tp, p.dense_tp, p.dense_stages,
               debug=job.debug)
    job = dataclasses.replace(job, cfg=collective(comm, generate_config, job.cfg,
                                                  log if comm.Get_rank() == 0 else (lambda text: None)))
    topo = build_topology(comm, job.cfg)
    scope = JobScope(topo, job)
    try:
        with scope:
            return _generate(scope, job, log, t_start)
    except (MoeHpcError, KeyboardInterrupt):
        if comm.Get_rank() == 0 and scope.lock is not None:   # never another job's batch: only under our lock
            drop_prompt_batch(job)
        raise


def _generate(scope: JobScope, job: Job, log, t_start: float) -> dict:
    """The job's body inside its scope: checks, lock, prompts, engine, groups, finish."""
    topo = scope.topo
    world = topo.world
    on_rank0(world, check_outputs, job, debug=job.debug)
    scope.lock = on_rank0(world, OutputLock, job.output, debug=job.debug)   # before the prompt batch is written
    meta, text = on_rank0(world, check_job, job, topo.num_dense, debug=job.debug) or (None, None)
    meta = world.bcast(meta, root=0)
    engine, _ = prepare_engine(topo, job, meta, log if topo.rank == 0 else (lambda text: None))
    progress = world.bcast(on_rank0(world, _open_output, job, meta, topo.roles, debug=job.debug), root=0)
    scope.owned = True
    reporter = _reporter(job, meta, progress, log) if topo.rank == 0 else None
    t_loop = time.perf_counter()
    stats = stream_chunks(engine, job, meta, None, progress, _GenerateChunks, reporter)
    return _finish(engine, job, meta, progress, stats, t_start, time.perf_counter() - t_loop, reporter, text)


def _reporter(job: Job, meta: InputMeta, progress: Progress, log) -> ProgressLog:
    """Progress in generated tokens; each group's bound up front is its sequences (over every
    dense rank, the last group's fewer) x N."""
    N = job.cfg.generate.max_new_tokens
    bound = [n * N for n in meta.chunk_counts]
    if progress.chunks_done:
        log(f"moe-hpc: resuming at group {progress.chunks_done + 1} of {progress.chunks_total}")
    log(f"moe-hpc: generate up to {N} tokens for each of {meta.num_sequences} prompts, "
        f"{len(meta.chunk_tokens)} group(s)")
    return ProgressLog(bound, progress.chunks_done, job.progress, job.progress_every, unit="generated tokens")


def _finish(engine, job: Job, meta: InputMeta, progress: Progress, stats, t_start: float, loop_s: float,
            reporter: ProgressLog | None, text: TextPrompts | None) -> dict:
    """Finalize the output; rank 0's summary (the rates over this run's groups: a resumed run's
    earlier groups are in the output, not in its times)."""
    topo, world = engine.topo, engine.topo.world
    times = world.gather(dict(engine.times.seconds), root=0)
    engine.close()
    done = on_rank0(world, generated_summary, job.output, debug=job.debug)
    attrs = provenance(job, engine, time.perf_counter() - t_start) | {"eos_token_ids": list(job.eos)}
    if job.prompts is not None:
        on_rank0(world, write_text_completions, job, text, debug=job.debug)
    on_rank0(world, _finalize, job, stats, attrs, debug=job.debug)
    if topo.rank != 0:
        return {}
    if job.prompts is not None:
        done["completions"] = str(completions_path(job.output))
    prompt, generated = sum(meta.chunk_tokens[progress.chunks_done:]), reporter.done - reporter.start_done
    prefill, decode = engine.times.seconds["prefill"], engine.times.seconds["decode"]
    return {"output": str(job.output), "sequences": meta.num_sequences, "prompt_tokens": sum(meta.chunk_tokens),
            **done, "groups": progress.chunks_total, "resumed_at_group": progress.chunks_done, "ranks": topo.size,
            "device": engine.backend.name, "wall_time_s": round(time.perf_counter() - t_start, 4),
            "loop_time_s": round(loop_s, 4),
            "prompt_tokens_per_s": round(prompt / prefill, 2) if prefill > 0 else 0.0,
            "generated_tokens_this_run": generated,
            "generated_tokens_per_s": round(generated / decode, 2) if decode > 0 else 0.0,
            "phases_s": phase_summary(times)}


def _finalize(job: Job, stats, attrs) -> None:
    """Rank 0: stats and provenance, the rename, then the record and the tokenised prompts (the
    output is whole)."""
    publish_with_record(job.output, stats, attrs)
    if job.prompts is not None:
        job.input.unlink(missing_ok=True)


def _log(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


__all__ = ["generate_job", "decode_group", "serve_group", "share_picks", "check_prompts", "check_prompt_lengths", "check_job", "generate_config",
           "TextPrompts", "tokenize_prompts", "write_text_completions", "drop_prompt_batch"]
