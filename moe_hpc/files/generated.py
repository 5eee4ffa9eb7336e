"""Generation's output datasets (SPEC, "Generation"), laid out in ``<output>.tmp`` and filled a
group of sequences at a time by rank 0.

They are small ([S, N] ints and floats), so rank 0 gathers each group's rows and writes them
with h5py, then makes them durable before the group is recorded as done; ``finalize_output``
(batches.py) adds the statistics and provenance and renames the file, as for a run.
"""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from ..config.errors import OutputError
from .atomic import fsync_path, tmp_path_for
from .batches import OUTPUT_FORMAT
from .h5 import short_reason

FINISH_EOS, FINISH_LENGTH, FINISH_POSITIONS = 0, 1, 2    # /finish_reason values
# name -> (dtype, per-sequence shape (N: max_new_tokens), padding)
DATASETS = {"generated": (np.int32, True, -1), "generated_lengths": (np.int32, False, 0),
            "generated_logprobs": (np.float32, True, np.nan), "finish_reason": (np.uint8, False, 0)}
MEANINGS = {"generated": "the new tokens of each sequence, -1 past its length",
            "generated_lengths": "how many of /generated's tokens are valid",
            "generated_logprobs": "log-probability of each new token under the unmodified distribution; NaN padding",
            "finish_reason": "0 end-of-sequence, 1 max_new_tokens, 2 max positions"}


def _shape(name: str, S: int, N: int) -> tuple[int, ...]:
    return (S, N) if DATASETS[name][1] else (S,)


def create_generated(output: str | Path, S: int, N: int) -> None:
    """Rank 0: lay out ``<output>.tmp`` with the four datasets, every row padding."""
    tmp = tmp_path_for(output)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = OUTPUT_FORMAT
            for name, (dtype, _, pad) in DATASETS.items():
                f.create_dataset(name, data=np.full(_shape(name, S, N), pad, dtype))
                f[name].attrs["meaning"] = MEANINGS[name]
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{output}: cannot create the output file ({short_reason(exc)})") from None


def reopen_generated(output: str | Path, S: int, N: int) -> None:
    """Rank 0: the partial output being resumed has this run's datasets."""
    tmp = tmp_path_for(output)
    try:
        with h5py.File(tmp, "r") as f:
            found = {n: f[n].shape for n in DATASETS if n in f}
    except OSError as exc:
        raise OutputError(f"{tmp}: cannot reopen the partial output ({short_reason(exc)})") from None
    want = {n: _shape(n, S, N) for n in DATASETS}
    if found != want:
        raise OutputError(f"{tmp}: datasets {found} do not match this run's {want}; "
                          "pass --restart to discard the partial output")


def write_generated(output: str | Path, parts) -> None:
    """Rank 0: parts, each (s0, tokens [s, N], lengths [s], logprobs [s, N], finish [s]) of
    sequences s0.., written and made durable."""
    tmp = tmp_path_for(output)
    try:
        with h5py.File(tmp, "r+") as f:
            for s0, *values in parts:
                for name, value in zip(DATASETS, values):
                    f[name][s0:s0 + len(value)] = value
        fsync_path(tmp)
    except OSError as exc:
        raise OutputError(f"{tmp}: cannot write generated tokens ({short_reason(exc)})") from None


def read_generated(output: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rank 0, every group written: (generated [S, N], generated_lengths [S], finish_reason [S])
    of ``<output>.tmp``."""
    try:
        with h5py.File(tmp_path_for(output), "r") as f:
            return f["generated"][()], f["generated_lengths"][()], f["finish_reason"][()]
    except OSError as exc:
        raise OutputError(f"{tmp_path_for(output)}: cannot read generated tokens ({short_reason(exc)})") from None


def generated_summary(output: str | Path) -> dict:
    """Rank 0, before the rename: how many tokens were generated and their mean per sequence."""
    with h5py.File(tmp_path_for(output), "r") as f:
        lengths = f["generated_lengths"][()]
    return {"generated_tokens": int(lengths.sum()), "mean_generated_length": round(float(lengths.mean()), 4)}


__all__ = ["create_generated", "reopen_generated", "write_generated", "read_generated", "generated_summary", "DATASETS",
           "FINISH_EOS", "FINISH_LENGTH", "FINISH_POSITIONS"]
