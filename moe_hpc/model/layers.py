"""Norms, RoPE and the MLPs, written once against ``xp`` (NumPy or CuPy).

Shapes in comments; every function keeps the SPEC precision rule: bf16 in and out, fp32 inside.
"""
from __future__ import annotations

import numpy as np

from ..device.backend import matmul_bf16
from ..device.dtypes import BF16, F32
from ..device.kernels import activation, add_rmsnorm, expert_mlp


def rmsnorm(x, weight, eps: float, xp=np):
    """x: [..., H] bf16, weight: [H] -> bf16. Statistics in fp32 (one fused kernel on the GPU)."""
    return add_rmsnorm(x, None, weight, eps)


def mlp(x, w1, b1, w2, b2, kind: str, xp=np, reduce=None):
    """act(x @ w1 + b1) @ w2 + b2 (the dense block). x: [T, H] bf16, w1: [H, F], w2: [F, H]
    -> [T, H] bf16. The same fused expert kernel as the MoE experts, then the output bias.

    reduce: for a tensor-parallel member (w1, b1 its columns, w2 its rows), a function that sums
    the fp32 partial outputs over the group in place; b2 is added once, after the sum."""
    if reduce is not None:
        partial = expert_mlp(x, w1, b1, w2, kind, out=xp.empty((x.shape[0], w2.shape[1]), dtype=F32))
        reduce(partial)
        return (partial if b2 is None else partial + b2.astype(F32, copy=False)).astype(BF16)
    y = expert_mlp(x, w1, b1, w2, kind)
    if b2 is None:
        return y
    return (y.astype(F32) + b2.astype(F32, copy=False)).astype(BF16)


def rope_tables(positions, head_dim: int, theta: float, xp=np):
    """cos, sin: [L, head_dim/2] fp32 for integer positions [L]."""
    i = xp.arange(head_dim // 2, dtype=np.float64)
    freqs = theta ** (-2.0 * i / head_dim)
    angles = xp.asarray(positions, dtype=np.float64)[:, None] * freqs[None, :]
    return xp.cos(angles).astype(F32), xp.sin(angles).astype(F32)


def apply_rope(x, cos, sin, xp=np):
    """x: [..., L, heads, D] bf16; rotate the two halves of D (SPEC's half-split form) -> bf16."""
    half = x.shape[-1] // 2
    x32 = x.astype(F32)
    c, s = cos[:, None, :], sin[:, None, :]
    lo, hi = x32[..., :half], x32[..., half:]
    out = xp.empty_like(x32)
    out[..., :half] = lo * c - hi * s
    out[..., half:] = hi * c + lo * s
    return out.astype(BF16)


__all__ = ["rmsnorm", "mlp", "rope_tables", "apply_rope", "matmul_bf16", "activation"]
