"""HDF5 batches: reading and validating inputs, writing outputs in place and atomically.

Validation happens here, at the edge: every error names the file and the dataset, and the hot
path downstream trusts what it gets.

The output is one ordinary HDF5 file with contiguous, early-allocated datasets.  Rank 0 lays it
out under ``<output>.tmp``; every dense rank then writes its own sequences straight into the
dataset's bytes (``os.pwrite`` at the dataset offset), which needs no parallel HDF5 and no
gather through one rank; rank 0 finally writes the statistics and provenance and renames the
file.  A file at the output path is therefore always complete.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ..config.errors import InputError, OutputError
from ..device.dtypes import BF16
from .atomic import publish, tmp_path_for
from .h5 import check_float_dataset, check_format, open_h5, read_float, short_reason

INPUT_FORMAT = "moe_hpc.input/1"
OUTPUT_FORMAT = "moe_hpc.output/1"
CHECK_BLOCK_BYTES = 64 << 20      # input bytes read at a time by InputBatch.check_values
BF16_EXPONENT = 0x7F80            # a bf16 whose exponent bits are all set is NaN or Inf



# ---------------------------------------------------------------- input batches

@dataclass
class InputBatch:
    """An open, validated input file. ``hidden`` or ``tokens`` is set, never both needed."""
    path: Path
    file: h5py.File
    num_sequences: int
    seq_len: int
    kind: str                     # "hidden" | "tokens"
    lengths: np.ndarray           # [S] int64, seq_len where /lengths is absent

    def read_chunk(self, s0: int, s1: int, hidden_size: int, vocab_size: int) -> np.ndarray:
        """Sequences [s0, s1): hidden [s, L, H] bf16 (padding zeroed) or tokens [s, L] int64.

        Raises InputError for NaN/Inf hidden values or out-of-range tokens at valid positions.
        """
        where = f"{self.path}: /{self.kind}"
        valid = np.arange(self.seq_len)[None, :] < self.lengths[s0:s1, None]
        if self.kind == "tokens":
            try:
                tokens = np.asarray(self.file["tokens"][s0:s1]).astype(np.int64)
            except (OSError, ValueError) as exc:
                raise InputError(f"{where}: cannot read data ({short_reason(exc)}); is the file truncated?") from None
            bad = valid & ((tokens < 0) | (tokens >= vocab_size))
            if bad.any():
                s, pos = np.argwhere(bad)[0]
                raise InputError(f"{where}: token {tokens[s, pos]} at sequence {s0 + s}, position "
                                 f"{pos} is outside [0, vocab_size={vocab_size})")
            return np.where(valid, tokens, 0)
        x = read_float(self.file["hidden"], where, np.s_[s0:s1])
        bad = valid[:, :, None] & ((x.view(np.uint16) & BF16_EXPONENT) == BF16_EXPONENT)   # NaN or Inf
        if bad.any():
            s, pos, _ = np.argwhere(bad)[0]
            raise InputError(f"{where}: NaN or Inf at sequence {s0 + s}, position {pos}")
        return np.where(valid[:, :, None], x, np.zeros((), BF16))

    def check_values(self, s0: int, s1: int, hidden_size: int, vocab_size: int) -> None:
        """Sequences [s0, s1) pass ``read_chunk``'s checks (tokens in range, no NaN/Inf at
        valid positions): read a block of about ``CHECK_BLOCK_BYTES`` at a time, so the whole
        input can be checked before any compute without holding it in memory."""
        row_bytes = self.file[self.kind].dtype.itemsize * self.seq_len * (hidden_size if self.kind == "hidden" else 1)
        step = max(1, CHECK_BLOCK_BYTES // row_bytes)
        for a in range(s0, s1, step):
            self.read_chunk(a, min(s1, a + step), hidden_size, vocab_size)

    def check_positions(self, max_positions: int) -> None:
        """No sequence is longer than the model's ``max_position_embeddings`` (0: no limit known)."""
        if max_positions and (self.lengths > max_positions).any():
            s = int(np.argmax(self.lengths > max_positions))
            raise InputError(f"{self.path}: sequence {s} has {self.lengths[s]} tokens, more than the model's "
                             f"max_position_embeddings = {max_positions}; set run.allow_long_sequences = true "
                             "to run it past the length the model was trained for")

    def close(self) -> None:
        self.file.close()


def open_input(path: str | Path, hidden_size: int, vocab_size: int) -> InputBatch:
    """Open and validate an input batch file against the model's H and V."""
    path = Path(path)
    f = open_h5(path, "input")
    try:
        return _validate_input(path, f, hidden_size, vocab_size)
    except Exception:
        f.close()
        raise


def _validate_input(path: Path, f: h5py.File, hidden_size: int, vocab_size: int) -> InputBatch:
    check_format(f, INPUT_FORMAT, str(path))
    if "hidden" in f:
        dset, kind = f["hidden"], "hidden"
        if not isinstance(dset, h5py.Dataset) or dset.ndim != 3:
            raise InputError(f"{path}: /hidden must be a 3-D dataset [S, L, H], got shape "
                             f"{getattr(dset, 'shape', None)}")
        check_float_dataset(dset, f"{path}: /hidden")
        if dset.shape[2] != hidden_size:
            raise InputError(f"{path}: /hidden has H = {dset.shape[2]} but the config's "
                             f"model.hidden_size is {hidden_size}")
    elif "tokens" in f:
        dset, kind = f["tokens"], "tokens"
        if not isinstance(dset, h5py.Dataset) or dset.ndim != 2:
            raise InputError(f"{path}: /tokens must be a 2-D dataset [S, L]")
        if dset.dtype.kind not in "iu":
            raise InputError(f"{path}: /tokens must be integer, got {dset.dtype}")
        if vocab_size == 0:
            raise InputError(f"{path}: /tokens needs an embedding, but model.vocab_size is 0 "
                             "(give /hidden instead)")
    else:
        raise InputError(f"{path}: missing dataset /hidden (or /tokens)")
    S, L = dset.shape[:2]
    if S == 0 or L == 0:
        raise InputError(f"{path}: /{kind} is empty (shape {dset.shape})")
    lengths = _read_lengths(path, f, S, L)
    return InputBatch(path, f, S, L, kind, lengths)


def _read_lengths(path: Path, f: h5py.File, S: int, L: int) -> np.ndarray:
    if "lengths" not in f:
        return np.full(S, L, dtype=np.int64)
    dset = f["lengths"]
    if not isinstance(dset, h5py.Dataset) or dset.shape != (S,):
        raise InputError(f"{path}: /lengths must have shape ({S},), got {getattr(dset, 'shape', None)}")
    if dset.dtype.kind not in "iu":
        raise InputError(f"{path}: /lengths must be integer, got {dset.dtype}")
    try:
        lengths = np.asarray(dset[()]).astype(np.int64)
    except OSError as exc:
        raise InputError(f"{path}: /lengths: cannot read data ({short_reason(exc)}); is the file truncated?") from None
    if (lengths < 0).any() or (lengths > L).any():
        s = int(np.argmax((lengths < 0) | (lengths > L)))
        raise InputError(f"{path}: /lengths[{s}] = {lengths[s]} is outside [0, L={L}]")
    return lengths


# ---------------------------------------------------------------- output file

@dataclass(frozen=True)
class OutputLayout:
    """Where each dataset's bytes start in the temporary file (sent to every dense rank)."""
    tmp_path: str
    hidden_offset: int
    hidden_itemsize: int
    logits_offset: int            # -1 when no /logits
    seq_len: int
    hidden_size: int
    vocab_size: int
    logprobs_offset: int = -1     # -1 when no /logprobs


def _contiguous(f: h5py.File, name: str, shape, dtype) -> h5py.Dataset:
    """Contiguous dataset whose storage exists now, so its file offset is known up front.

    Fill is skipped: every byte is written by a dense rank (padding as explicit zeros). No
    modification time is stored, so equal runs write equal bytes (a resumed run included).
    """
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_obj_track_times(False)
    dcpl.set_layout(h5py.h5d.CONTIGUOUS)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    space = h5py.h5s.create_simple(tuple(shape))
    dsid = h5py.h5d.create(f.id, name.encode(), h5py.h5t.py_create(np.dtype(dtype)), space, dcpl=dcpl)
    return h5py.Dataset(dsid)


def create_output(output: str | Path, S: int, L: int, H: int, output_dtype: str,
                  vocab_size: int = 0, logprobs: bool = False) -> OutputLayout:
    """Lay out ``<output>.tmp`` (rank 0 only) and return where each rank writes."""
    tmp = tmp_path_for(output)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = OUTPUT_FORMAT
            stored = np.uint16 if output_dtype == "bfloat16" else np.float32
            hidden = _contiguous(f, "hidden", (S, L, H), stored)
            if output_dtype == "bfloat16":
                hidden.attrs["dtype"] = "bfloat16"
            if vocab_size:
                logits = _contiguous(f, "logits", (S, L, vocab_size), np.uint16)
                logits.attrs["dtype"] = "bfloat16"
            if logprobs:
                lp = _contiguous(f, "logprobs", (S, L), np.float32)
                lp.attrs["meaning"] = ("log-probability of input token t+1 at position t; NaN at each "
                                       "sequence's last position and at padding")
            return _layout_of(f, tmp)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{output}: cannot create the output file ({short_reason(exc)})") from None


def reopen_output(output: str | Path, S: int, L: int, H: int, output_dtype: str,
                  vocab_size: int = 0, logprobs: bool = False) -> OutputLayout:
    """The layout of an existing ``<output>.tmp`` being resumed, checked against the run."""
    tmp = tmp_path_for(output)
    want = {"hidden": ((S, L, H), np.uint16 if output_dtype == "bfloat16" else np.float32)}
    if vocab_size:
        want["logits"] = ((S, L, vocab_size), np.uint16)
    if logprobs:
        want["logprobs"] = ((S, L), np.float32)
    try:
        with h5py.File(tmp, "r") as f:
            found = {n: (f[n].shape, f[n].dtype) for n in ("hidden", "logits", "logprobs") if n in f}
            if found != {n: (shape, np.dtype(dt)) for n, (shape, dt) in want.items()}:
                raise OutputError(f"{tmp}: datasets {found} do not match this run's {want}; "
                                  "pass --restart to discard the partial output")
            return _layout_of(f, tmp)
    except OSError as exc:
        raise OutputError(f"{tmp}: cannot reopen the partial output ({short_reason(exc)})") from None


def _layout_of(f: h5py.File, tmp: Path) -> OutputLayout:
    hidden = f["hidden"]
    L, H = hidden.shape[1:]
    logits, logprobs = (f[n] if n in f else None for n in ("logits", "logprobs"))
    offset = hidden.id.get_offset()
    if offset is None or any(d is not None and d.id.get_offset() is None for d in (logits, logprobs)):
        raise OutputError(f"{tmp}: datasets are not contiguous and allocated; pass --restart")
    return OutputLayout(str(tmp), offset, hidden.dtype.itemsize,
                        -1 if logits is None else logits.id.get_offset(), L, H,
                        0 if logits is None else logits.shape[2],
                        -1 if logprobs is None else logprobs.id.get_offset())


class OutputWriter:
    """One dense rank's raw writes into the laid-out temporary file."""

    def __init__(self, layout: OutputLayout):
        self.layout = layout
        self.fd = os.open(layout.tmp_path, os.O_WRONLY)

    def write_hidden(self, s0: int, hidden: np.ndarray) -> None:
        """hidden: [s, L, H] bf16 for sequences s0.. (padding already zero)."""
        lay = self.layout
        stored = hidden.view(np.uint16) if lay.hidden_itemsize == 2 else hidden.astype(np.float32)
        self._pwrite(stored, lay.hidden_offset + s0 * lay.seq_len * lay.hidden_size * lay.hidden_itemsize)

    def write_logits(self, s0: int, logits: np.ndarray) -> None:
        """logits: [s, L, V] bf16."""
        lay = self.layout
        self._pwrite(logits.view(np.uint16), lay.logits_offset + s0 * lay.seq_len * lay.vocab_size * 2)

    def write_logprobs(self, s0: int, logprobs: np.ndarray) -> None:
        """logprobs: [s, L] float32 (NaN where there is no next token)."""
        lay = self.layout
        self._pwrite(logprobs.astype(np.float32, copy=False), lay.logprobs_offset + s0 * lay.seq_len * 4)

    def _pwrite(self, array: np.ndarray, offset: int) -> None:
        view = memoryview(np.ascontiguousarray(array).astype("<" + array.dtype.str[1:], copy=False)).cast("B")
        while view:
            written = os.pwrite(self.fd, view, offset)
            view, offset = view[written:], offset + written

    def sync(self) -> None:
        """Make this rank's writes durable (before the chunk is recorded as done)."""
        os.fdatasync(self.fd)

    def close(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)


def logprob_summary(output: str | Path) -> dict:
    """Rank 0, before the rename: mean of ``<output>.tmp``'s /logprobs over the positions that
    have a next token, and the perplexity exp(-mean); {} when the run wrote none."""
    with h5py.File(tmp_path_for(output), "r") as f:
        if "logprobs" not in f:
            return {}
        total, count = 0.0, 0
        for s in range(f["logprobs"].shape[0]):        # a row at a time: S x L may be large
            row = f["logprobs"][s].astype(np.float64)
            total, count = total + np.nansum(row), count + int(np.isfinite(row).sum())
    mean = total / count if count else float("nan")
    return {"mean_logprob": round(mean, 6), "perplexity": round(float(np.exp(-mean)), 6), "predicted_tokens": count}


def finalize_output(output: str | Path, expert_tokens: np.ndarray, attrs: dict) -> None:
    """Rank 0, after every writer closed: stats and provenance, fsync, atomic rename."""
    tmp = tmp_path_for(output)
    try:
        with h5py.File(tmp, "r+") as f:
            if "stats" in f:          # a run killed while finalizing, then resumed
                del f["stats"]
            f.create_dataset("stats/expert_tokens", data=expert_tokens.astype(np.int64))
            for key, value in attrs.items():
                f.attrs[key] = value if isinstance(value, (int, float, str)) else json.dumps(value)
        publish(tmp, output)
    except OSError as exc:            # a full disk: every chunk is recorded, a rerun only finishes
        raise OutputError(f"{tmp}: cannot finish the output ({exc.strerror or short_reason(exc)}); every chunk is kept: "
                          "rerun the same command to finish it") from None


__all__ = ["InputBatch", "open_input", "OutputLayout", "OutputWriter", "create_output", "reopen_output",
           "finalize_output", "logprob_summary", "INPUT_FORMAT", "OUTPUT_FORMAT"]
