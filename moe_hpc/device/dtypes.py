"""The two floating types of the project, and their sizes: one home for every module that
needs them (the planner's byte counts included).

bf16 is ml_dtypes' ``bfloat16`` on the host and on the GPU (CuPy takes it as a 2-byte dtype for
storage and matmul); fp32 is where every product accumulates.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)
F32 = np.dtype(np.float32)
BF16_BYTES = BF16.itemsize
F32_BYTES = F32.itemsize

__all__ = ["BF16", "F32", "BF16_BYTES", "F32_BYTES"]
