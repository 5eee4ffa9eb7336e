"""HDF5 at the edge: opening files with errors that name them, format tags, and the bf16 codec.

bf16 has no HDF5 type: it is stored as uint16 bit patterns with the dataset attribute
``dtype = "bfloat16"``; float32 and float16 (float64 accepted) are read and rounded to bf16.
Every error names the file and the dataset.
"""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from ..config.errors import InputError
from ..device.dtypes import BF16

FLOAT_KINDS = {np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.float64)}


def is_bf16_dataset(dset: h5py.Dataset) -> bool:
    tag = dset.attrs.get("dtype")
    if isinstance(tag, bytes):
        tag = tag.decode()
    return dset.dtype == np.uint16 and tag == "bfloat16"


def check_float_dataset(dset: h5py.Dataset, where: str) -> None:
    """Floating datasets are float32/float16 (float64 accepted) or bf16 stored as tagged uint16."""
    if dset.dtype in FLOAT_KINDS or is_bf16_dataset(dset):
        return
    if dset.dtype == np.uint16:
        raise InputError(f"{where}: dtype uint16 without the attribute dtype = \"bfloat16\"")
    raise InputError(f"{where}: dtype {dset.dtype} is not a floating type "
                     "(float32, float16, or bfloat16 as tagged uint16)")


def decode_float(raw: np.ndarray, bf16_tagged: bool) -> np.ndarray:
    """Stored array -> bf16 array (values rounded to bf16 where stored wider)."""
    return raw.view(BF16) if bf16_tagged else raw.astype(BF16)


def read_float(dset: h5py.Dataset, where: str, index=()) -> np.ndarray:
    """Read (a slice of) a floating dataset as bf16, turning HDF5 failures into InputError."""
    check_float_dataset(dset, where)
    try:
        raw = dset[index]
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(f"{where}: cannot read data ({exc}); is the file truncated?") from None
    return decode_float(np.asarray(raw), is_bf16_dataset(dset))


def write_float(group: h5py.Group, name: str, array: np.ndarray, **kwargs) -> h5py.Dataset:
    """Write a bf16 array as uint16 bit patterns tagged dtype = "bfloat16"; others as they are."""
    array = np.asarray(array)
    if array.dtype == BF16:
        dset = group.create_dataset(name, data=array.view(np.uint16), **kwargs)
        dset.attrs["dtype"] = "bfloat16"
        return dset
    return group.create_dataset(name, data=array, **kwargs)


def open_h5(path: str | Path, what: str) -> h5py.File:
    """Open an existing HDF5 file read-only with an error that says which file and why."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: {what} file does not exist")
    if not path.is_file():
        raise InputError(f"{path}: {what} path is not a file")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise InputError(f"{path}: not a readable HDF5 {what} file ({short_reason(exc)})") from None


def check_format(f: h5py.File, expected: str, where: str) -> None:
    fmt = f.attrs.get("format")
    if isinstance(fmt, bytes):
        fmt = fmt.decode(errors="replace")
    if not isinstance(fmt, str) or fmt != expected:
        raise InputError(f"{where}: root attribute format is {fmt!r}, expected {expected!r}")


def short_reason(exc: Exception) -> str:
    return str(exc).split("(")[0].strip() or type(exc).__name__


__all__ = ["open_h5", "check_format", "read_float", "write_float", "decode_float",
           "check_float_dataset", "is_bf16_dataset", "short_reason"]
