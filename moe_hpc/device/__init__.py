"""The array-module seam (NumPy on the CPU, CuPy on the GPU), the bf16/fp32 dtypes, the fused
kernels in both forms, and the datasheet figures GPUs are judged against.

May import: config.
"""
