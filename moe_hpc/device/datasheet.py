"""GPU datasheet figures the project judges itself against: one home for each.

Dense bf16 tensor-core peak (no sparsity) and HBM bandwidth of the SXM parts, from NVIDIA's
datasheets. The bench's MFU and the planner's calibration both read them here.
"""
from __future__ import annotations

# name fragment (as CUDA reports the device) -> (dense bf16 TFLOP/s, HBM TB/s)
DATASHEET = {"H100": (989.0, 3.35), "H200": (989.0, 4.8)}
HOPPER_BF16_TFLOPS = DATASHEET["H100"][0]


def datasheet_for(device_name: str) -> tuple[float, float] | None:
    """-> (bf16 TFLOP/s, HBM TB/s) of the first known part named in ``device_name``, else None."""
    for part, figures in DATASHEET.items():
        if part in device_name:
            return figures
    return None


__all__ = ["DATASHEET", "HOPPER_BF16_TFLOPS", "datasheet_for"]
