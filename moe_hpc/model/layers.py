"""Norms, activations, RoPE and the MLPs, written once against ``xp`` (NumPy or CuPy).

Shapes in comments; every function keeps the SPEC precision rule: bf16 in and out, fp32 inside.
"""
from __future__ import annotations

import math

import numpy as np

from ..backend import BF16, F32, matmul_bf16


def rmsnorm(x, weight, eps: float, xp=np):
    """x: [..., H] bf16, weight: [H] -> bf16. Statistics in fp32."""
    x32 = x.astype(F32)
    inv = 1.0 / xp.sqrt(xp.mean(x32 * x32, axis=-1, keepdims=True) + F32.type(eps))
    return (x32 * inv * weight.astype(F32, copy=False)).astype(BF16)


def _erf(x, xp):
    if xp is np:
        return _erf_numpy(x)
    import cupyx.scipy.special
    return cupyx.scipy.special.erf(x)


def _erf_numpy(x):
    """erf for NumPy, which has none: the Chebyshev-fitted erfc of Numerical Recipes,
    fractional error under 1.2e-7, far below bf16's resolution."""
    z = np.abs(x).astype(np.float64)
    t = 1.0 / (1.0 + 0.5 * z)
    poly = (-1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (-0.18628806
            + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223
            + t * 0.17087277)))))))))
    y = 1.0 - t * np.exp(-z * z + poly)
    return (np.sign(x) * y).astype(np.float32)


def activation(h32, kind: str, xp=np):
    """Elementwise activation of an fp32 array (exact-erf gelu, tanh gelu or silu)."""
    if kind == "gelu":
        return 0.5 * h32 * (1.0 + _erf(h32 * F32.type(1 / math.sqrt(2.0)), xp))
    if kind == "gelu_tanh":
        c = F32.type(math.sqrt(2.0 / math.pi))
        return 0.5 * h32 * (1.0 + xp.tanh(c * (h32 + F32.type(0.044715) * h32 * h32 * h32)))
    if kind == "silu":
        return h32 / (1.0 + xp.exp(-h32))
    raise ValueError(f"unknown activation {kind!r}")


def mlp(x, w1, b1, w2, b2, kind: str, xp=np):
    """act(x @ w1 + b1) @ w2 + b2 (the dense block). x: [T, H] bf16, w1: [H, F], w2: [F, H]
    -> [T, H] bf16. The same fused expert kernel as the MoE experts, then the output bias."""
    from ..kernels import expert_mlp
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


__all__ = ["rmsnorm", "activation", "mlp", "rope_tables", "apply_rope", "matmul_bf16"]
