"""Causal self-attention with RoPE and grouped key/value heads (GQA; MHA when equal).

Queries and keys are processed in tiles of ``block`` rows with an online softmax (fp32 running
max and sum), so the fp32 scores never exceed [S, heads, block, block] however long the
sequences are (10,000-token sequences included).  Padding at the end of a sequence needs no
mask: causality already keeps it out of every valid position.
"""
from __future__ import annotations

import math

import numpy as np

from ..device.backend import matmul_bf16
from ..device.dtypes import BF16, F32
from ..device.kernels import matmul_f32out
from .layers import apply_rope, project_qkv, rope_tables


def attention(a, w, cfg, block: int, xp=np, reduce=None):
    """a: [S, L, H] bf16 (normed input); w: DenseLayer (wq, wk, wv, wo) -> [S, L, H] bf16.

    reduce: for a tensor-parallel member (``cfg`` its local heads, ``w`` its shard), a function
    that sums the fp32 partial outputs over the group in place; the sum is rounded once."""
    S, L, H = a.shape
    nh, nkv, D = cfg.num_heads, cfg.kv_heads, cfg.head_dim
    cos, sin = rope_tables(xp.arange(L), D, cfg.rope_theta, xp)
    q, k, v = project_qkv(a, w, cfg, xp)
    q, k = apply_rope(q, cos, sin, xp), apply_rope(k, cos, sin, xp)
    # [S, kv, group, L, D]: query head h reads key/value head h // group
    group = nh // nkv
    q32 = q.astype(F32).transpose(0, 2, 1, 3).reshape(S, nkv, group, L, D)
    k32 = k.astype(F32).transpose(0, 2, 1, 3)[:, :, None]          # [S, kv, 1, L, D]
    v32 = v.astype(F32).transpose(0, 2, 1, 3)[:, :, None]
    out = xp.empty((S, nkv, group, L, D), dtype=BF16)
    scale = F32.type(1.0 / math.sqrt(D))
    for q0 in range(0, L, block):
        q1 = min(L, q0 + block)
        out[..., q0:q1, :] = _query_block(q32[..., q0:q1, :] * scale, k32, v32, q0, block, xp)
    o = out.reshape(S, nh, L, D).transpose(0, 2, 1, 3).reshape(S, L, nh * D)
    if reduce is None:
        return matmul_bf16(o, w.wo, xp)
    partial = matmul_f32out(xp.ascontiguousarray(o.reshape(S * L, nh * D)), w.wo)
    reduce(partial)
    return partial.astype(BF16).reshape(S, L, -1)


def _query_block(q, k, v, q0: int, block: int, xp):
    """Online softmax over key tiles for queries q0..q0+bq: scores never exceed [.., bq, block].

    q: [S, kv, g, bq, D] fp32 (pre-scaled); k, v: [S, kv, 1, L, D] fp32 -> [S, kv, g, bq, D] bf16.
    """
    bq = q.shape[-2]
    top = xp.full(q.shape[:-1] + (1,), -np.inf, dtype=F32)      # running max
    norm = xp.zeros(q.shape[:-1] + (1,), dtype=F32)             # running sum of exp
    acc = xp.zeros(q.shape, dtype=F32)
    for k0 in range(0, q0 + bq, block):           # keys past the last query are all masked
        k1 = min(q0 + bq, k0 + block)
        s = xp.matmul(q, xp.swapaxes(k[..., k0:k1, :], -1, -2))
        if k1 > q0:                                # the diagonal tile: mask the future
            s = xp.where(xp.arange(q0, q0 + bq)[:, None] >= xp.arange(k0, k1)[None, :], s, F32.type(-np.inf))
        new_top = xp.maximum(top, s.max(axis=-1, keepdims=True))
        p = xp.exp(s - new_top)
        rescale = xp.exp(top - new_top)
        norm = norm * rescale + p.sum(axis=-1, keepdims=True)
        acc = acc * rescale + xp.matmul(p, v[..., k0:k1, :])
        top = new_top
    return (acc / norm).astype(BF16)


__all__ = ["attention"]
