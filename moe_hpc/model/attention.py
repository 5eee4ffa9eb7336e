"""Causal self-attention with RoPE and grouped key/value heads (GQA; MHA when equal).

Two cores compute the same function. On the GPU, with cuDNN's frontend present, a fused flash
kernel on tensor cores (``device.flash_cudnn``) reads q, k and v from one QKV GEMM's output. The
tiled core below is the portable one (NumPy, and CuPy without cuDNN):

Queries and keys are processed in tiles of ``block`` rows with an online softmax (fp32 running
max and sum), so the fp32 scores never exceed [S, heads, block, block] however long the
sequences are (10,000-token sequences included).  Padding at the end of a sequence needs no
mask: causality already keeps it out of every valid position.
"""
from __future__ import annotations

import dataclasses
import functools
import sys

import numpy as np

from ..config.errors import ConfigError
from ..device.backend import cudnn_frontend_present, matmul_bf16
from ..device.dtypes import BF16, F32
from ..device.kernels import matmul_f32out, rope_heads
from .layers import apply_rope, project_qkv, rope_tables
from .mla import mla_expand, mla_latent, mla_qkv, mla_query, softmax_scale


def attention(a, w, cfg, block: int, xp=np, reduce=None, flash=None):
    """a: [S, L, H] bf16 (normed input); w: AttentionWeights (wq, wk, wv, wo; the MLA weights when
    ``cfg.mla``) -> [S, L, H] bf16.

    flash: a fused attention kernel (``device.flash_cudnn``); used when the layer carries the
    fused ``wqkv`` (``fuse_qkv``), else the tiled online softmax below.
    reduce: for a tensor-parallel member (``cfg`` its local heads, ``w`` its shard), a function
    that sums the fp32 partial outputs over the group in place; the sum is rounded once."""
    S, L, _ = a.shape
    if cfg.mla:     # MLA's q/k (nope | rope) and v widths differ: the tiled core takes them
        o = tiled_attention(*mla_qkv(a, w, cfg, xp), softmax_scale(cfg), block, xp)
    elif flash is not None and w.wqkv is not None and flash.supports(S, L, cfg.num_heads, cfg.kv_heads, cfg.head_dim,
                                                                     softmax_scale(cfg)):
        o = _fused_core(a, w, cfg, flash, xp)
    else:
        o = _tiled_core(a, w, cfg, block, xp)
    return _project_out(o, w, xp, reduce)


def _heads_of(qkv, cfg):
    """The fused QKV GEMM's output [S, L, (nh + 2 kv) D] -> views q [S, L, nh, D], k and v
    [S, L, kv, D] (no copy)."""
    S, L, _ = qkv.shape
    nh, nkv, D = cfg.num_heads, cfg.kv_heads, cfg.head_dim
    return tuple(qkv[..., a0 * D:a1 * D].reshape(S, L, a1 - a0, D)
                 for a0, a1 in ((0, nh), (nh, nh + nkv), (nh + nkv, nh + 2 * nkv)))


def _project_out(o, w, xp, reduce):
    """o: [S, L, nh Dv] bf16 heads' outputs -> [S, L, H] bf16 through wo (summed over a dense-TP
    group by ``reduce``, rounded once)."""
    S, L, _ = o.shape
    if reduce is None:
        return matmul_bf16(o, w.wo, xp)
    partial = matmul_f32out(xp.ascontiguousarray(o.reshape(S * L, -1)), w.wo)
    reduce(partial)
    return partial.astype(BF16).reshape(S, L, -1)


def cached_attention(a, w, cfg, cache, at, block: int, xp=np, reduce=None, flash=None):
    """Attention that fills and reads a KV cache (generation). a: [S, L, H] bf16 normed input of
    sequences whose cache rows are ``at.rows`` [S] and whose first position is ``at.start`` [S]
    (host ints); cache: ``blocks.KvCache``. Prefill (L > 1, every start 0) attends over its own
    keys as ``attention`` does and keeps them; a decode step (L = 1) keeps its key and attends
    over the cache up to its own position -> [S, L, H] bf16, equal to ``attention`` over the
    whole sequence so far up to bf16 rounding. flash: the fused core, which a prefill takes as
    ``attention`` does (the cache keeps its k and v heads after RoPE)."""
    S, L, _ = a.shape
    if L == 1 and not cfg.mla:
        return _project_out(decode_step_attention(a, w, cfg, cache, at, xp), w, xp, reduce)
    if flash is not None and w.wqkv is not None and flash.supports(S, L, cfg.num_heads, cfg.kv_heads, cfg.head_dim,
                                                                   softmax_scale(cfg)):
        o, qkv = _fused_core(a, w, cfg, flash, xp, keep=True)
        cache.put(at.rows, at.start, _heads_of(qkv, cfg)[1:])
        return _project_out(o, w, xp, reduce)
    positions = xp.asarray(at.start[:, None] + np.arange(L))            # [S, L]
    cos, sin = (t[positions] for t in cache.rope)
    if cfg.mla:
        q = mla_query(a, w, cfg, cos, sin, xp)
        keys = mla_latent(a, w, cfg, cos, sin, xp)                      # (normed latent, RoPE key)
    else:
        q, k, v = project_qkv(a, w, cfg, xp)
        q, keys = apply_rope(q, cos, sin, xp), (apply_rope(k, cos, sin, xp), v)
    cache.put(at.rows, at.start, keys)
    if L > 1:
        k, v = mla_expand(*keys, w, cfg, xp) if cfg.mla else keys
        o = tiled_attention(q, k, v, softmax_scale(cfg), block, xp)
    else:                   # MLA's latent expands per step: only the rows' positions so far
        k, v = mla_expand(*cache.read(at.rows, int(at.start.max()) + 1), w, cfg, xp)
        o = decode_attention(q, k, v, xp.asarray(at.start), softmax_scale(cfg), xp)
    return _project_out(o, w, xp, reduce)


def decode_step_attention(a, w, cfg, cache, at, xp=np):
    """A decode step's attention core (MHA/GQA): a [S, 1, H] bf16 normed input; at.rows and
    at.start [S] host or device ints -> [S, 1, nh D] bf16. Nothing here reads the device from
    the host, so a CUDA graph can capture it: the new key goes in by a row copy and the
    attention reads the whole cache, each sequence only up to its own position."""
    # every block's cache has the same positions and RoPE tables: the step's blocks share these
    rows, pos = at.once("rows", lambda: xp.asarray(at.rows)), at.once("start", lambda: xp.asarray(at.start))
    rope_rows = lambda: tuple(t[pos] for t in cache.rope)               # [S, D/2]: each its own position
    cos, sin = rope_rows() if cache.rope_key is None else at.once(cache.rope_key, rope_rows)
    if w.wqkv is not None:      # one GEMM, RoPE in place on its q and k heads (row s at position pos[s])
        qkv = matmul_bf16(a, w.wqkv, xp)                                # [S, 1, (nh + 2 kv) D]
        rope_heads(qkv.reshape(1, a.shape[0], -1), cos, sin, cfg.num_heads + cfg.kv_heads, cfg.head_dim)
        q, k, v = _heads_of(qkv, cfg)
    else:
        q, k, v = project_qkv(a, w, cfg, xp)
        q, k = apply_rope(q, cos[:, None], sin[:, None], xp), apply_rope(k, cos[:, None], sin[:, None], xp)
    cache.put_step(at.once(("flat", cache.shape), lambda: cache.step_index(rows, pos)), (k, v))
    # where the positions are known on the host (an eager step), only those the rows have seen
    parts = cache.parts if not isinstance(at.start, np.ndarray) else \
        tuple(part[:, :int(at.start.max(initial=0)) + 1] for part in cache.parts)
    return decode_attention(q, *parts, pos, softmax_scale(cfg), xp, rows=rows)


def decode_attention(q, k, v, last, scale: float, xp, rows=None):
    """One new position per sequence over its cached keys. q: [S, 1, nh, D], k: [Sc, Lk, kv, D],
    v: [Sc, Lk, kv, Dv] bf16; rows: [S] host ints, the cache row of each sequence (None: row s
    is sequence s); last: [S] ints, sequence s sees keys 0..last[s] -> [S, 1, nh Dv] bf16.
    On the GPU one fused kernel reads each row's cache once where it supports the shapes
    (``kernels_cuda.fused_decode_attention``), cuBLAS GEMMs over the bf16 cache elsewhere
    (``decode_attention_bf16``); the fp32 copies below are the host's (and the reference's) way."""
    if xp is not np:
        from ..device import kernels_cuda
        if kernels_cuda.fused_decode_supports(q, k, v):
            return kernels_cuda.fused_decode_attention(q, k, v, last, scale, rows)
        if rows is not None:
            k, v = k[xp.asarray(rows)], v[xp.asarray(rows)]
        return kernels_cuda.decode_attention_bf16(q, k, v, last, scale)
    n = int(np.max(last)) + 1 if len(last) else 0       # the host reads only the positions seen
    k, v = (k, v) if rows is None else (k[rows], v[rows])
    k, v = k[:, :n], v[:, :n]
    S, _, nh, D = q.shape
    Lk, nkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    q32 = q.astype(F32).reshape(S, nkv, nh // nkv, D) * F32.type(scale)
    s = xp.matmul(q32, k.astype(F32).transpose(0, 2, 3, 1))             # [S, kv, g, Lk]
    seen = (xp.arange(Lk)[None, :] <= last[:, None])[:, None, None, :]
    s = xp.where(seen, s, F32.type(-np.inf))
    p = xp.exp(s - s.max(axis=-1, keepdims=True))
    o = xp.matmul(p, v.astype(F32).transpose(0, 2, 1, 3)) / p.sum(axis=-1, keepdims=True)
    return o.astype(BF16).reshape(S, 1, nh * Dv)


def fused_core_expected(choice: str, backend) -> bool:
    """Whether ``choose_attention`` will take cuDNN's fused core, known before anything loads
    (the memory check runs first): asked for on the GPU, or ``auto`` with the frontend installed."""
    return backend.xp is not np and (choice == "cudnn" or (choice == "auto" and cudnn_frontend_present()))


def choose_attention(choice: str, backend, announce: bool):
    """run.attention -> (the fused kernel or None, "cudnn" | "tiles"). ``auto`` takes cuDNN's on
    the GPU where its frontend loads, and says once (``announce``) why not where it does not;
    ``cudnn`` asks for it and is a config error without it. The CPU always tiles."""
    if choice == "tiles" or backend.xp is np:
        return None, "tiles"
    from ..device.flash_cudnn import flash_attention_or_reason
    flash, why = flash_attention_or_reason(strict=choice == "cudnn")
    if flash is not None:
        return flash, "cudnn"
    if choice == "cudnn":
        raise ConfigError(f"run.attention = 'cudnn': {why}")
    if announce:
        print(f"warning: attention falls back to the tiled core (run.attention = 'tiles' silences this): {why}",
              file=sys.stderr, flush=True)
    return None, "tiles"


def fuse_qkv(layer, xp=np):
    """The layer with one [H, (nh + 2 kv) D] QKV weight, wq/wk/wv left as column views of it (no
    second copy): one GEMM instead of three, and its output is the layout flash attention reads.
    A layer the fused path cannot run yet (q/k/v biases, q/k norms, MLA) comes back as it is and
    attends in tiles."""
    if layer.bq is not None or layer.bk is not None or layer.bv is not None or layer.q_norm is not None \
            or layer.wkv_a is not None:
        return layer
    wqkv = xp.concatenate([layer.wq, layer.wk, layer.wv], axis=1)
    nq, nk = layer.wq.shape[1], layer.wk.shape[1]
    return dataclasses.replace(layer, wqkv=wqkv, wq=wqkv[:, :nq], wk=wqkv[:, nq:nq + nk], wv=wqkv[:, nq + nk:])


def _fused_core(a, w, cfg, flash, xp, keep: bool = False):
    """One QKV GEMM, RoPE in place on its q and k heads (positions 0..L-1), the fused kernel ->
    [S, L, nh D] bf16 (and with ``keep`` the [S, L, (nh + 2 kv) D] q|k|v it read)."""
    S, L, _ = a.shape
    nh, nkv, D = cfg.num_heads, cfg.kv_heads, cfg.head_dim
    qkv = matmul_bf16(a, w.wqkv, xp)
    cos, sin = _rope_tables_cached(L, D, cfg.rope_theta, xp)
    rope_heads(qkv, cos, sin, nh + nkv, D)
    o = xp.empty((S, L, nh * D), BF16)
    flash(qkv, o, nh, nkv, D, softmax_scale(cfg))
    return (o, qkv) if keep else o


@functools.lru_cache(maxsize=16)
def _rope_tables_cached(L: int, D: int, theta: float, xp):
    return rope_tables(xp.arange(L), D, theta, xp)


def _tiled_core(a, w, cfg, block: int, xp):
    """q, k, v by three GEMMs, then online softmax over tiles -> [S, L, nh D] bf16."""
    cos, sin = _rope_tables_cached(a.shape[1], cfg.head_dim, cfg.rope_theta, xp)
    q, k, v = project_qkv(a, w, cfg, xp)
    q, k = apply_rope(q, cos, sin, xp), apply_rope(k, cos, sin, xp)
    return tiled_attention(q, k, v, softmax_scale(cfg), block, xp)


def tiled_attention(q, k, v, scale: float, block: int, xp):
    """Causal attention by query tiles. q: [S, L, nh, D], k: [S, L, kv, D], v: [S, L, kv, Dv]
    bf16 (query head h reads key/value head h // (nh / kv)) -> [S, L, nh Dv] bf16."""
    S, L, nh, D = q.shape
    nkv, Dv = k.shape[2], v.shape[3]
    group = nh // nkv
    q32 = q.astype(F32).transpose(0, 2, 1, 3).reshape(S, nkv, group, L, D)
    k32 = k.astype(F32).transpose(0, 2, 1, 3)[:, :, None]          # [S, kv, 1, L, D]
    v32 = v.astype(F32).transpose(0, 2, 1, 3)[:, :, None]          # [S, kv, 1, L, Dv]
    out = xp.empty((S, nkv, group, L, Dv), dtype=BF16)
    scale = F32.type(scale)
    for q0 in range(0, L, block):
        q1 = min(L, q0 + block)
        out[..., q0:q1, :] = _query_block(q32[..., q0:q1, :] * scale, k32, v32, q0, block, xp)
    return out.reshape(S, nh, L, Dv).transpose(0, 2, 1, 3).reshape(S, L, nh * Dv)


def _query_block(q, k, v, q0: int, block: int, xp):
    """Online softmax over key tiles for queries q0..q0+bq: scores never exceed [.., bq, block].

    q: [S, kv, g, bq, D] fp32 (pre-scaled); k: [S, kv, 1, L, D], v: [S, kv, 1, L, Dv] fp32
    -> [S, kv, g, bq, Dv] bf16.
    """
    bq = q.shape[-2]
    top = xp.full(q.shape[:-1] + (1,), -np.inf, dtype=F32)      # running max
    norm = xp.zeros(q.shape[:-1] + (1,), dtype=F32)             # running sum of exp
    acc = xp.zeros(q.shape[:-1] + v.shape[-1:], dtype=F32)
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


__all__ = ["attention", "cached_attention", "decode_step_attention", "decode_attention", "choose_attention", "fuse_qkv", "tiled_attention"]
