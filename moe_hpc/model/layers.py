"""Norms, RoPE and the MLPs, written once against ``xp`` (NumPy or CuPy).

Shapes in comments; every function keeps the SPEC precision rule: bf16 in and out, fp32 inside.
"""
from __future__ import annotations

import numpy as np

from ..device.backend import matmul_bf16
from ..device.dtypes import BF16, F32
from ..device.kernels import activation, add_bias, add_rmsnorm, expert_mlp, matmul_f32out


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
    return y if b2 is None else add_bias(y, b2)


def _biased(y, bias):
    """y: [..., N] bf16 + bias [N] | None, summed in fp32, rounded once."""
    return y if bias is None else add_bias(y, bias)


def project_qkv(a, w, cfg, xp=np):
    """The attention's inputs before RoPE. a: [S, L, H] bf16; w: AttentionWeights (wq, wk, wv, their
    optional biases bq, bk, bv and q/k norms) -> q [S, L, nh, D], k and v [S, L, kv, D] bf16.

    ``cfg.qk_norm``: "head" RMS-normalises each head's D values (weight [D]), "full" the whole
    projection of all heads (weight [nh D] / [kv D]) before it is cut into heads."""
    S, L, _ = a.shape
    nh, nkv, D = cfg.num_heads, cfg.kv_heads, cfg.head_dim
    q, k, v = (_biased(matmul_bf16(a, wm, xp), b) for wm, b in ((w.wq, w.bq), (w.wk, w.bk), (w.wv, w.bv)))
    if cfg.qk_norm == "full":
        q, k = rmsnorm(q, w.q_norm, cfg.norm_eps, xp), rmsnorm(k, w.k_norm, cfg.norm_eps, xp)
    q, k, v = q.reshape(S, L, nh, D), k.reshape(S, L, nkv, D), v.reshape(S, L, nkv, D)
    if cfg.qk_norm == "head":
        q, k = rmsnorm(q, w.q_norm, cfg.norm_eps, xp), rmsnorm(k, w.k_norm, cfg.norm_eps, xp)
    return q, k, v


def shared_expert(m, w, cfg, xp=np):
    """The shared expert of an MoE block, run on the dense rank beside the routed ones.
    m: [T, H] bf16 (the block's normed MLP input); w: GateWeights (shared_w1 fused [gate | up],
    shared_w2, shared_gate [H] | None) -> [T, H] bf16, scaled by sigmoid(m . shared_gate)."""
    y = expert_mlp(m, w.shared_w1, None, w.shared_w2, cfg.ffn_kind)
    if w.shared_gate is None:
        return y
    g32 = w.shared_gate.astype(F32, copy=False)
    # [T] fp32; on the GPU a reduction: CuPy's matrix-vector product is a cuBLAS call, which
    # CuPy refuses inside a captured decode graph (runtime/decode_graph.py)
    g = m.astype(F32) @ g32 if xp is np else (m.astype(F32) * g32[None, :]).sum(axis=1)
    return (y.astype(F32) * (1.0 / (1.0 + xp.exp(-g)))[:, None]).astype(BF16)


def token_logprobs(hidden, lm_head, targets, xp=np):
    """log softmax(hidden @ lm_head)[target] per row. hidden: [n, H] bf16 final hidden states;
    lm_head: [H, V]; targets: [n] int token ids -> [n] fp32. The logits stay fp32 (never rounded
    to bf16) and exist only for these n rows."""
    logits = matmul_f32out(hidden, lm_head)                          # [n, V] fp32
    top = logits.max(axis=-1, keepdims=True)
    lse = top[:, 0] + xp.log(xp.exp(logits - top).sum(axis=-1))
    return logits[xp.arange(logits.shape[0]), targets] - lse


def rope_tables(positions, head_dim: int, theta: float, xp=np):
    """cos, sin: [L, head_dim/2] fp32 for integer positions [L]."""
    i = xp.arange(head_dim // 2, dtype=np.float64)
    freqs = theta ** (-2.0 * i / head_dim)
    angles = xp.asarray(positions, dtype=np.float64)[:, None] * freqs[None, :]
    return xp.cos(angles).astype(F32), xp.sin(angles).astype(F32)


def apply_rope(x, cos, sin, xp=np):
    """x: [..., L, heads, D] bf16; rotate the two halves of D (SPEC's half-split form) -> bf16.
    cos, sin: [L, D/2] fp32 shared by every sequence, or [S, L, D/2] each sequence's own."""
    half = x.shape[-1] // 2
    x32 = x.astype(F32)
    c, s = cos[..., None, :], sin[..., None, :]
    lo, hi = x32[..., :half], x32[..., half:]
    out = xp.empty_like(x32)
    out[..., :half] = lo * c - hi * s
    out[..., half:] = hi * c + lo * s
    return out.astype(BF16)


__all__ = ["rmsnorm", "mlp", "project_qkv", "shared_expert", "token_logprobs", "rope_tables", "apply_rope", "matmul_bf16", "activation"]
