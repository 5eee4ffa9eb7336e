"""FP8 block-scaled weights as DeepSeek-V3 publishes them, dequantised when read.

A quantised weight is float8 e4m3 [out, in] beside ``<name>_scale_inv`` fp32
[ceil(out/b0), ceil(in/b1)] (``quantization_config.weight_block_size`` = [b0, b1], [128, 128]
in the released checkpoints): the weight is ``w8[i, j] * scale_inv[i // b0, j // b1]``. Each
tensor is dequantised alone, in fp32, and rounded once to bf16, so a rank's memory holds one
tensor's fp32 copy at a time. The safetensors package's NumPy side has no float8 type, so those
tensors are read here straight from the shard (its header says where their bytes are).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from ..config.errors import InputError
from ..device.dtypes import BF16

F8_DTYPE = np.dtype(ml_dtypes.float8_e4m3fn)


def read_raw(path: Path, tensor: str) -> np.ndarray:
    """A float8 e4m3 tensor of a safetensors file, memory-mapped -> [shape] float8_e4m3fn."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    entry = header.get(tensor)
    if entry is None or entry.get("dtype") != "F8_E4M3":
        raise InputError(f"{path}: tensor {tensor}: not a float8 e4m3 tensor")
    start, stop = entry["data_offsets"]
    shape = tuple(entry["shape"])
    if stop - start != int(np.prod(shape)):
        raise InputError(f"{path}: tensor {tensor}: {stop - start} bytes for shape {shape}")
    return np.memmap(path, dtype=F8_DTYPE, mode="r", offset=8 + size + start, shape=shape)


def dequantize(w8: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """w8: [out, in] float8 e4m3; scale_inv: [ceil(out/b0), ceil(in/b1)] -> [out, in] bf16."""
    b0, b1 = block
    rows, cols = w8.shape
    want = (-(-rows // b0), -(-cols // b1))
    if tuple(scale_inv.shape) != want:
        raise InputError(f"weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {want} for a "
                         f"[{rows}, {cols}] weight in {b0}x{b1} blocks")
    scale = np.repeat(np.repeat(np.asarray(scale_inv, np.float32), b0, axis=0)[:rows], b1, axis=1)[:, :cols]
    return (np.asarray(w8).astype(np.float32) * scale).astype(BF16)


__all__ = ["F8_DTYPE", "read_raw", "dequantize"]
