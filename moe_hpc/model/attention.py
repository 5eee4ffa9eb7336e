"""Causal self-attention with RoPE and grouped key/value heads (GQA; MHA when equal).

Queries are processed in blocks of ``block`` rows so the fp32 score matrix stays
[S, heads, block, L] however long the sequences are.  Padding at the end of a sequence needs no
mask: causality already keeps it out of every valid position.
"""
from __future__ import annotations

import math

import numpy as np

from ..backend import BF16, F32, matmul_bf16
from .layers import apply_rope, rope_tables


def attention(a, w, cfg, block: int, xp=np):
    """a: [S, L, H] bf16 (normed input); w: DenseLayer (wq, wk, wv, wo) -> [S, L, H] bf16."""
    S, L, H = a.shape
    nh, nkv, D = cfg.num_heads, cfg.kv_heads, cfg.head_dim
    cos, sin = rope_tables(xp.arange(L), D, cfg.rope_theta, xp)
    q = apply_rope(matmul_bf16(a, w.wq, xp).reshape(S, L, nh, D), cos, sin)
    k = apply_rope(matmul_bf16(a, w.wk, xp).reshape(S, L, nkv, D), cos, sin)
    v = matmul_bf16(a, w.wv, xp).reshape(S, L, nkv, D)
    # [S, kv, group, L, D]: query head h reads key/value head h // group
    group = nh // nkv
    q32 = q.astype(F32).transpose(0, 2, 1, 3).reshape(S, nkv, group, L, D)
    k32 = k.astype(F32).transpose(0, 2, 1, 3)[:, :, None]          # [S, kv, 1, L, D]
    v32 = v.astype(F32).transpose(0, 2, 1, 3)[:, :, None]
    out = xp.empty((S, nkv, group, L, D), dtype=BF16)
    scale = F32.type(1.0 / math.sqrt(D))
    for q0 in range(0, L, block):
        q1 = min(L, q0 + block)
        # keys past q1 are all masked for this block: leave them out entirely
        scores = xp.matmul(q32[..., q0:q1, :], xp.swapaxes(k32[..., :q1, :], -1, -2)) * scale
        causal = xp.arange(q0, q1)[:, None] >= xp.arange(q1)[None, :]
        scores = xp.where(causal, scores, F32.type(-np.inf))
        scores -= scores.max(axis=-1, keepdims=True)
        p = xp.exp(scores)
        p /= p.sum(axis=-1, keepdims=True)
        out[..., q0:q1, :] = xp.matmul(p, v32[..., :q1, :]).astype(BF16)
    o = out.reshape(S, nh, L, D).transpose(0, 2, 1, 3).reshape(S, L, nh * D)
    return matmul_bf16(o, w.wo, xp)


__all__ = ["attention"]
