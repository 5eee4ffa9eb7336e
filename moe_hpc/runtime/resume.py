"""Checkpoint and resume: the progress record beside the output, and when to trust it.

A run fills ``<output>.tmp`` chunk by chunk (``files/batches.py``).  After every writer has synced a
chunk's bytes to disk and all ranks have agreed on it (``comm.failure.collective``), rank 0 replaces
``<output>.progress.json`` atomically (write a temporary file, fsync, rename, fsync the
directory).  A record that says "k chunks done" is therefore never ahead of the bytes, and a
crash at any moment leaves either the old record or the new one.

The record holds a fingerprint of everything that decides the output's bits: the effective
config, the identity (path, size, mtime) of the weights and input files, and the rank layout
(world size, dense and expert ranks).  A rerun whose fingerprint is equal skips the recorded
chunks; one whose fingerprint differs is refused (``ResumeError``, naming what differs) and
leaves the partial output alone: ``--restart`` discards it.  Per-expert token counts, summed
over ranks, travel in the record, so ``/stats/expert_tokens`` survives a resume.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import __version__
from ..config.errors import MoeHpcError, OutputError, PeerFailed, ResumeError
from ..config.roles import RoleLayout
from ..config.run_config import Config
from ..files.atomic import atomic_path, tmp_path_for
from ..files.batches import finalize_output

PROGRESS_FORMAT = "moe_hpc.progress/1"


def progress_path_for(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".progress.json")


def file_identity(path: str | Path) -> dict:
    """What makes a file "the same file" for resuming: where it is, its size, its mtime."""
    path = Path(path).resolve()
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def fingerprint(cfg: Config, weights: Path, input_path: Path, roles: RoleLayout) -> dict:
    """Everything the output's bits depend on, as a JSON-able dict."""
    return {"config_sha256": hashlib.sha256(cfg.to_json().encode()).hexdigest(),
            "weights": file_identity(weights), "input": file_identity(input_path),
            "layout": {"world_size": roles.world_size, "dense_ranks": list(roles.dense_ranks),
                       "expert_ranks": list(roles.expert_ranks)},
            "version": __version__}


@dataclass
class Progress:
    """Chunks ``[0, chunks_done)`` of every dense rank are durable in ``<output>.tmp``.

    expert_tokens: [num_moe_layers, num_experts] int64, summed over ranks and done chunks.
    """
    fingerprint: dict
    chunks_total: int
    chunks_done: int
    expert_tokens: np.ndarray

    def to_json(self) -> str:
        return json.dumps({"format": PROGRESS_FORMAT, "fingerprint": self.fingerprint,
                           "chunks_total": self.chunks_total, "chunks_done": self.chunks_done,
                           "expert_tokens": self.expert_tokens.tolist()}, indent=1)


def save_progress(output: str | Path, progress: Progress) -> None:
    """Atomically replace the record (rank 0, after the chunk's bytes are durable)."""
    path = progress_path_for(output)
    try:
        with atomic_path(path, durable=True) as tmp:
            tmp.write_text(progress.to_json())
    except OSError as exc:     # a full disk: the previous record stays, and stays true
        raise OutputError(f"{path}: cannot write the progress record ({exc.strerror})") from None


def load_progress(output: str | Path) -> Progress:
    path = progress_path_for(output)
    try:
        raw = json.loads(path.read_text())
        if raw.get("format") != PROGRESS_FORMAT:
            raise ValueError(f"format is {raw.get('format')!r}, expected {PROGRESS_FORMAT!r}")
        return Progress(raw["fingerprint"], int(raw["chunks_total"]), int(raw["chunks_done"]),
                        np.asarray(raw["expert_tokens"], dtype=np.int64))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ResumeError(f"{path}: unreadable progress record ({exc}); pass --restart to "
                          "discard the partial output") from None


def finished_chunks(output: str | Path) -> tuple[int, int] | None:
    """(done, total) from the progress record when at least one chunk is finished, else None
    (no record, an unreadable one, or none done): the one test of whether a partial output
    holds work worth keeping."""
    try:
        progress = load_progress(output)
    except ResumeError:
        return None
    return (progress.chunks_done, progress.chunks_total) if progress.chunks_done else None


def start_or_resume(output: str | Path, fp: dict, chunks_total: int, restart: bool, model, create, reopen):
    """Rank 0: reopen the partial output when its record allows (``reopen()``), else lay it out
    afresh (``create()``) and record 0 chunks done at once, so from here on it is resumable.
    -> (what create or reopen returned, Progress)."""
    progress = resume_point(output, fp, chunks_total, restart)
    if progress is not None:
        return reopen(), progress
    made = create()
    progress = Progress(fp, chunks_total, 0, np.zeros((model.num_moe_layers, model.num_experts), np.int64))
    save_progress(output, progress)
    return made, progress


def publish_with_record(output: str | Path, stats, attrs: dict) -> None:
    """Rank 0: statistics and provenance into ``<output>.tmp``, the rename, then the progress
    record goes (after the rename: the output is whole)."""
    finalize_output(output, stats, attrs)
    progress_path_for(output).unlink(missing_ok=True)


def discard_partial(output: str | Path) -> None:
    """Remove ``<output>.tmp`` and its progress record; never masks the error that led here."""
    for path in (tmp_path_for(output), progress_path_for(output)):
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass


def kept_for_resume(exc: MoeHpcError, chunks_done: int, chunks_total: int, output: str | Path) -> MoeHpcError:
    """An error found mid-run, as the same error that says the finished chunks stay for a rerun
    to resume (and that no longer discards them)."""
    note = (f" ({chunks_done} of {chunks_total} chunks are finished and kept in {tmp_path_for(output)}: "
            "rerun the same command to resume after them)")
    if isinstance(exc, PeerFailed):
        return PeerFailed(str(exc) + note, discards_partial=False)
    kept = type(exc)(str(exc) + note)
    kept.discards_partial = False
    return kept


def _difference(old: dict, new: dict) -> str | None:
    """The first fingerprint entry that differs, in words."""
    if old.get("layout") != new["layout"]:
        o, n = old.get("layout") or {}, new["layout"]
        return (f"rank layout ({o.get('world_size')} ranks, dense ranks {o.get('dense_ranks')} "
                f"then; {n['world_size']} ranks, dense ranks {n['dense_ranks']} now)")
    if old.get("config_sha256") != new["config_sha256"]:
        return "config (a key in the file or a --set differs)"
    for name in ("weights", "input"):
        if old.get(name) != new[name]:
            return f"{name} file ({old.get(name)} then, {new[name]} now)"
    if old.get("version") != new["version"]:
        return f"moe_hpc version ({old.get('version')} then, {new['version']} now)"
    return None


def check_partial(output: str | Path, fp: dict, chunks_total: int, restart: bool) -> Progress | None:
    """The progress a run with fingerprint ``fp`` would resume from, or None to start afresh.

    Changes nothing on disk (the dry run asks too). Raises ResumeError when a partial output
    exists that this run may not continue.
    """
    tmp, record = tmp_path_for(output), progress_path_for(output)
    if restart or not (tmp.exists() and record.exists()):
        return None                  # a tmp without a record died before its first chunk
    progress = load_progress(output)
    why = _difference(progress.fingerprint, fp)
    if why is None and progress.chunks_total != chunks_total:
        why = f"chunk count ({progress.chunks_total} then, {chunks_total} now)"
    if why is not None:
        raise ResumeError(f"{record}: a partial run of {output} exists with a different {why}; "
                          "rerun with the same command and rank count to resume it, or pass "
                          "--restart to discard it")
    return progress


def resume_point(output: str | Path, fp: dict, chunks_total: int, restart: bool) -> Progress | None:
    """Rank 0: ``check_partial``, clearing any leftovers when starting afresh."""
    progress = check_partial(output, fp, chunks_total, restart)
    if progress is None:
        discard_partial(output)
    return progress


__all__ = ["Progress", "PROGRESS_FORMAT", "fingerprint", "file_identity", "progress_path_for",
           "save_progress", "load_progress", "discard_partial", "kept_for_resume", "check_partial", "resume_point"]
