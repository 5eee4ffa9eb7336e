"""Multi-head latent attention (DeepSeek-V3), for the engine: the projections that make q, k
and v, and the RoPE and softmax scale of the model's (optionally YaRN-scaled) rotary embedding.

q = [q_nope | q_rope] per head, from a (normed) latent ``wq_a -> q_a_norm -> wq_b`` or directly
``wq``; the k/v latent ``c = kv_a_norm((a wkv_a)[:Rkv])`` gives each head's [k_nope | v] through
``wkv_b``; one RoPE key ``k_rope = (a wkv_a)[Rkv:]`` is shared by every head. RoPE turns the
rope parts only (half-split layout: the reader de-interleaves DeepSeek's pairs). The core
(``attention.tiled_attention``) then sees plain multi-head attention with q/k head width
head_dim = nope + rope and value width v_head_dim. bf16 in and out, fp32 inside, as everywhere.
"""
from __future__ import annotations

import functools
import math

import numpy as np

from ..config.run_config import MLA_NORM_EPS, ModelConfig
from ..device.backend import matmul_bf16
from ..device.dtypes import F32
from .layers import apply_rope, rmsnorm


def _mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction for a context ``factor``: 0.1 mscale ln(factor) + 1 (1 when factor <= 1)."""
    return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


def rope_frequencies(m: ModelConfig) -> tuple[np.ndarray, float]:
    """-> (inverse frequencies [rope/2] float64, cos/sin scale) of the model's RoPE over its
    qk_rope_head_dim dims: plain, or YaRN's blend of interpolated (divided by rope_factor) and
    original frequencies, ramped between the dims that turn beta_fast and beta_slow times over
    the original context (the ramp's ends floored/ceiled, as the released models do)."""
    dim = m.qk_rope_head_dim
    base = m.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    if m.rope_scaling != "yarn":
        return 1.0 / base, 1.0
    f = m.rope_factor

    def dim_of(rotations: float) -> float:
        return dim * math.log(m.rope_original_max_positions / (rotations * 2 * math.pi)) / (2 * math.log(m.rope_theta))
    low, high = max(math.floor(dim_of(m.rope_beta_fast)), 0), min(math.ceil(dim_of(m.rope_beta_slow)), dim - 1)
    ramp = np.clip((np.arange(dim // 2) - low) / ((high - low) or 0.001), 0.0, 1.0)   # 0: keep, 1: interpolate
    inv = (1.0 / base) * (1.0 - ramp) + (1.0 / (f * base)) * ramp
    if m.rope_attention_factor:
        scale = m.rope_attention_factor
    elif m.rope_mscale and m.rope_mscale_all_dim:
        scale = _mscale(f, m.rope_mscale) / _mscale(f, m.rope_mscale_all_dim)
    else:
        scale = _mscale(f)
    return inv, scale


def softmax_scale(m: ModelConfig) -> float:
    """1/sqrt(head_dim), times mscale(factor, mscale_all_dim)^2 under YaRN when mscale_all_dim is given."""
    scale = 1.0 / math.sqrt(m.head_dim)
    if m.rope_scaling == "yarn" and m.rope_mscale_all_dim:
        scale *= _mscale(m.rope_factor, m.rope_mscale_all_dim) ** 2
    return scale


@functools.lru_cache(maxsize=16)
def _tables(m: ModelConfig, L: int, xp):
    inv, scale = rope_frequencies(m)
    angles = np.arange(L, dtype=np.float64)[:, None] * inv[None, :]
    return xp.asarray((np.cos(angles) * scale).astype(F32)), xp.asarray((np.sin(angles) * scale).astype(F32))


def rope_table(m: ModelConfig, positions: int, xp=np):
    """cos, sin [positions, rope/2] fp32 of the model's RoPE (scaled), positions 0.. positions-1."""
    return _tables(m, positions, xp)


def mla_query(a, w, m: ModelConfig, cos, sin, xp=np):
    """a: [S, L, H] bf16 -> q [S, L, nh, head_dim] bf16, its rope part turned by cos, sin
    ([L, rope/2] or [S, L, rope/2])."""
    S, L, _ = a.shape
    D, R = m.head_dim, m.qk_rope_head_dim
    if w.wq_b is not None:
        q = matmul_bf16(rmsnorm(matmul_bf16(a, w.wq_a, xp), w.q_a_norm, MLA_NORM_EPS, xp), w.wq_b, xp)
    else:
        q = matmul_bf16(a, w.wq, xp)
    q = q.reshape(S, L, m.num_heads, D)
    q[..., D - R:] = apply_rope(q[..., D - R:], cos, sin, xp)
    return q


def mla_latent(a, w, m: ModelConfig, cos, sin, xp=np):
    """a: [S, L, H] bf16 -> (c [S, L, kv_lora_rank] the normed k/v latent, k_rope [S, L, rope]
    the shared RoPE key, turned): what a KV cache keeps of MLA, per token."""
    Rkv = m.kv_lora_rank
    latent = matmul_bf16(a, w.wkv_a, xp)                                # [S, L, Rkv + R]
    c = xp.ascontiguousarray(latent[..., :Rkv])                         # the GPU's norm kernel reads rows densely
    k_rope = apply_rope(latent[..., None, Rkv:], cos, sin, xp)[..., 0, :]
    return rmsnorm(c, w.kv_a_norm, MLA_NORM_EPS, xp), k_rope


def mla_expand(c, k_rope, w, m: ModelConfig, xp=np):
    """c: [S, L, Rkv], k_rope: [S, L, rope] -> k [S, L, nh, head_dim] (each head's k_nope | the
    shared k_rope) and v [S, L, nh, v_head_dim] bf16, through wkv_b."""
    S, L, _ = c.shape
    nh, D, R = m.num_heads, m.head_dim, m.qk_rope_head_dim
    kv = matmul_bf16(c, w.wkv_b, xp).reshape(S, L, nh, D - R + m.v_head_dim)
    k = xp.empty((S, L, nh, D), dtype=kv.dtype)
    k[..., :D - R] = kv[..., :D - R]
    k[..., D - R:] = k_rope[:, :, None, :]                              # one RoPE key for all heads
    return k, xp.ascontiguousarray(kv[..., D - R:])


def mla_qkv(a, w, m: ModelConfig, xp=np):
    """a: [S, L, H] bf16 (normed input); w: AttentionWeights with the MLA weights; m: the (member's)
    model -> q, k [S, L, nh, head_dim] and v [S, L, nh, v_head_dim] bf16, RoPE applied."""
    cos, sin = _tables(m, a.shape[1], xp)
    return (mla_query(a, w, m, cos, sin, xp), *mla_expand(*mla_latent(a, w, m, cos, sin, xp), w, m, xp))


__all__ = ["mla_qkv", "mla_query", "mla_latent", "mla_expand", "rope_table", "softmax_scale", "rope_frequencies"]
