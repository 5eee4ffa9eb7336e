"""``moe-hpc run --dry-run``: check everything a run needs and print its layout; compute nothing.

Run it with the same launcher and rank count as the real job (``jobs/moe_plan.sbatch``): every
rank builds the communicators, binds its device, opens and checks the checkpoint's metadata
(no weights are read) and, on dense ranks, the input and the output directory, so a file
system missing on one node shows up here.  Rank 0 then prints the layout: nodes and hosts, the
role, device, hosted experts and sequences of each rank, the chunks, and what the run would do
with an existing partial output (resume it, or refuse).  Nothing is written.
"""
from __future__ import annotations

import os

from ..comm.agree import host_name
from ..comm.failure import collective, on_rank0
from ..comm.topology import build_topology
from ..config.errors import OutputError
from ..config.roles import check_layout
from ..files.batches import open_input
from ..files.lock import check_not_held
from ..files.checkpoint import Checkpoint
from .job import Job, check_setup, checked_input_line, num_chunks, preflight, sequence_range
from .resume import check_partial, fingerprint


def _check_files(job: Job, is_dense: bool) -> None:
    """What this rank will open in the run: the checkpoint, and (dense) the input and output dir."""
    m = job.cfg.model
    with Checkpoint(job.weights, m):
        pass
    if is_dense:
        open_input(job.input, m.hidden_size, m.vocab_size).close()
        parent = job.output.parent
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OutputError(f"{job.output}: output directory {parent} is not writable from this rank")


def _rank_row(topo, backend, placement, num_sequences: int) -> dict:
    """This rank's line of the layout table."""
    seqs = sequence_range(topo.dense_index, topo.num_dense, num_sequences) if topo.is_dense else None
    device = "cpu" if backend.name == "cpu" else f"gpu {backend.xp.cuda.Device().id}"
    return {"rank": topo.rank, "host": host_name(), "node": topo.node_of_rank[topo.rank],
            "local": topo.local_rank, "role": " ".join(filter(None, (topo.roles.role_of(topo.group_rank),
                                                                    topo.roles.dense_part(topo.group_rank)))),
            "device": device,
            "experts": len(placement.experts_on(topo.expert_slot)) if topo.is_expert else 0,
            "sequences": seqs}


def _partial_state(job: Job, meta, roles) -> str:
    check_not_held(job.output)            # the run would be refused: so is its dry run
    progress = check_partial(job.output, fingerprint(job.cfg, job.weights, job.input, roles),
                             len(meta.chunk_tokens), job.restart)
    if progress is None:
        return "a fresh run"
    return f"resume at chunk {progress.chunks_done + 1} of {progress.chunks_total}"


def format_layout(rows: list[dict], meta, job: Job, placement, partial: str) -> str:
    """The printed plan: a header, then one line per rank."""
    cfg = job.cfg
    nodes = sorted({r["node"] for r in rows})
    dense = [r for r in rows if r["sequences"] is not None]
    per_dense = [b - a for a, b in (r["sequences"] for r in dense)]
    experts = [r["experts"] for r in rows if "expert" in r["role"]]
    lines = [
        f"dry run: {job.weights} and {job.input} ({meta.num_sequences} sequences x {meta.seq_len} "
        f"positions, {sum(meta.chunk_tokens)} tokens) are readable on every rank that needs them",
        f"output: {job.output}: {partial}",
        f"ranks: {len(rows)} on {len(nodes)} node(s); {len(dense)} dense, {len(experts)} expert; "
        f"placement {placement.kind}; {min(experts)}-{max(experts)} experts per expert rank",
        f"chunks: {num_chunks(meta.num_sequences, len(dense), cfg.run.chunk_sequences)} of up to "
        f"{cfg.run.chunk_sequences} sequences; {min(per_dense)}-{max(per_dense)} sequences per dense rank",
        f"{'rank':>5} {'node':>4} {'host':<16} {'local':>5} {'role':<20} {'device':<7} {'experts':>7}  sequences"]
    for r in rows:
        seqs = "-" if r["sequences"] is None else "[{}, {})".format(*r["sequences"])
        lines.append(f"{r['rank']:>5} {r['node']:>4} {r['host']:<16} {r['local']:>5} {r['role']:<20} "
                     f"{r['device']:<7} {r['experts']:>7}  {seqs}")
    lines.append("dry run: OK, nothing computed or written")
    return "\n".join(lines)


def dry_run(comm, job: Job, log=print) -> dict:
    """Check and print the plan of ``job`` on every rank of ``comm``; returns rank 0's rows."""
    cfg = job.cfg
    p = cfg.parallel
    collective(comm, check_layout, comm.Get_size(), p.dp, p.dense_ranks, p.expert_tp, p.dense_tp, p.dense_stages,
               debug=job.debug)
    topo = build_topology(comm, cfg)
    world, rank = topo.world, topo.rank
    sync = lambda fn, *a: collective(world, fn, *a, debug=job.debug)
    try:
        meta = world.bcast(on_rank0(world, check_setup, job, topo.num_dense, debug=job.debug), root=0)
        checked = preflight(topo, job, meta)          # the run's own checks
        backend, placement = checked.backend, checked.placement
        seconds, fit = world.gather(checked.check_seconds, root=0), world.gather(checked.fit, root=0)
        sync(_check_files, job, topo.is_dense)
        partial = on_rank0(world, _partial_state, job, meta, topo.roles, debug=job.debug)
        rows = world.gather(_rank_row(topo, backend, placement, meta.num_sequences), root=0)
        if rank == 0:
            log(checked_input_line(meta, job, len(topo.dense_world_ranks), max(seconds)))
            if fit[0] is not None:
                log("memory: " + min(fit, key=lambda f: f.headroom).text() + ": fits")
            log(format_layout(rows, meta, job, placement, partial))
        return {"rows": rows, "partial": partial} if rank == 0 else {}
    finally:
        topo.free()


__all__ = ["dry_run", "format_layout"]
