"""The few fused operations the MoE block needs, for NumPy and CuPy arrays alike.

Each function dispatches on where its input lives: NumPy code here, CUDA kernels in
``kernels_cuda`` (imported only when a CuPy array arrives).  Both follow the same precision
rule: bf16 in and out, fp32 arithmetic inside.
"""
from __future__ import annotations

import math

import numpy as np

from ..config.run_config import split_kind
from .dtypes import BF16, F32


def _on_host(array) -> bool:
    return isinstance(array, np.ndarray)


def _cuda():
    from ..device import kernels_cuda
    return kernels_cuda


def take_rows(src, rows, out=None):
    """src: [N, W], rows: [n] int -> [n, W] (into ``out`` when given). Any 2-byte dtype."""
    if not _on_host(src):
        if out is None:
            out = _cuda().cp.empty((len(rows), src.shape[1]), dtype=src.dtype)
        _cuda().move_rows(src, out, src_rows=rows)
        return out
    picked = src.view(np.uint16)[rows].view(src.dtype)
    if out is None:
        return picked
    out[...] = picked
    return out


def put_rows(dst, rows, values) -> None:
    """dst[rows] = values, whole rows, in place."""
    if not _on_host(dst):
        return _cuda().move_rows(values, dst, dst_rows=rows)
    dst.view(np.uint16)[rows] = values.view(np.uint16)


def gather_scatter_rows(src, src_rows, dst, dst_rows) -> None:
    """dst[dst_rows[i]] = src[src_rows[i]], whole rows, in place: ``take_rows`` then ``put_rows``
    in one pass, with no [n, W] copy between them (one kernel on the GPU). Any 2-byte dtype."""
    if not _on_host(dst):
        return _cuda().move_rows(src, dst, src_rows=src_rows, dst_rows=dst_rows)
    dst.view(np.uint16)[dst_rows] = src.view(np.uint16)[src_rows]


def topk(score, probs, k: int, normalize: bool):
    """score, probs: [T, E] fp32 host arrays -> experts [T, k] int32 (highest score first, ties
    to the lower index), weights [T, k] fp32 (probs of the chosen, renormalised if
    ``normalize``). On the GPU ``gate_topk`` does the softmax and this choice in one kernel."""
    experts = np.argsort(-score, axis=-1, kind="stable")[:, :k].astype(np.int32)
    weights = np.take_along_axis(probs, experts, axis=-1)
    if normalize:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return experts, weights.astype(F32)


def gate_topk(logits, bias, k: int, normalize: bool, score: str = "softmax", groups: int = 1,
              keep_groups: int = 1, scale: float = 1.0):
    """The gate after its GEMM. logits: [T, E] fp32; bias: [E] fp32 | None -> experts [T, k]
    int32 (highest p + bias first, ties to the lower index), weights [T, k] fp32: the scores p
    of the chosen, renormalised if ``normalize``, times ``scale``. The bias chooses, never weighs.

    ``score``: p = softmax (SPEC) or sigmoid of the logits. ``groups`` > 1: the experts form
    that many equal groups, each scored by the sum of its two best p + bias; only the experts of
    the best ``keep_groups`` groups can be chosen (DeepSeek-V3's group-limited routing)."""
    if score == "softmax" and groups == 1 and scale == 1.0:     # SPEC's gate: one kernel on the GPU
        if not _on_host(logits):
            return _cuda().gate_topk(logits, bias, k, normalize)
        p = np.exp(logits - logits.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        return topk(p if bias is None else p + np.asarray(bias, dtype=F32), p, k, normalize)
    return _grouped_gate(logits, bias, k, normalize, score, groups, keep_groups, scale,
                         np if _on_host(logits) else _cuda().cp)


def _descending(x, xp):
    """Indices sorting each row of x from high to low, ties to the lower index (a stable sort)."""
    return xp.argsort(-x, axis=-1, kind="stable")


def _grouped_gate(logits, bias, k, normalize, score, groups, keep_groups, scale, xp):
    """gate_topk's general path, in array operations of ``xp`` (NumPy or CuPy), all fp32."""
    if score == "sigmoid":
        p = 1.0 / (1.0 + xp.exp(-logits))
    else:
        p = xp.exp(logits - logits.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
    choice = p if bias is None else p + xp.asarray(bias, dtype=F32)
    T, E = choice.shape
    if groups > 1:
        per = E // groups
        best2 = xp.sort(choice.reshape(T, groups, per), axis=-1)[..., -min(2, per):].sum(axis=-1)   # [T, groups]
        kept = _descending(best2, xp)[:, :keep_groups]
        mask = xp.zeros((T, groups), dtype=bool)
        mask[xp.arange(T)[:, None], kept] = True
        choice = xp.where(xp.repeat(mask, per, axis=1), choice, F32.type(-np.inf))
    experts = _descending(choice, xp)[:, :k].astype(np.int32)
    weights = xp.take_along_axis(p, experts.astype(np.int64), axis=-1)
    if normalize:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + F32.type(1e-20))
    return experts, (weights * F32.type(scale)).astype(F32)


def choice_counts(choices, n: int) -> np.ndarray:
    """choices: integer ids in [0, n) of any shape (e.g. [T, k] experts), on the host -> [n] int64
    counts: the routing count the trace recorder and the balancer keep."""
    return np.bincount(np.asarray(choices).reshape(-1), minlength=n).astype(np.int64)


def count_into(counts, ids) -> None:
    """counts: [n] int64, ids: integer ids in [0, n) of any shape: counts[id] += 1 for each, in
    place, where the arrays live (nothing comes back to the host)."""
    if not _on_host(counts):
        return _cuda().count_into(counts, ids)
    counts += choice_counts(ids, counts.shape[0]).astype(counts.dtype, copy=False)


def set_expert_gemm_carveout(sms: int, xp=np) -> bool:
    """GPU: make the expert GEMMs leave ``sms`` SMs to other streams (the exchange's), so the two
    overlap; the CPU has nothing to leave. Returns whether it took effect (or was not needed)."""
    if xp is np:
        return True
    return _cuda().set_expert_gemm_carveout(sms)


def add_bias(y, bias):
    """y [..., N] bf16 + bias [N] bf16, summed in fp32 and rounded once (SPEC's rule) -> bf16,
    in place in y on both devices (on the GPU one kernel instead of three fp32 passes): the
    caller hands y over."""
    if not _on_host(y):
        return _cuda().add_bias(y, bias)
    y[...] = (y.astype(F32) + bias.astype(F32)).astype(BF16)
    return y


def matmul_f32out(a, b):
    """[T, H] bf16 @ [H, N] -> [T, N] fp32 (the gate: fp32 logits, no bf16 rounding)."""
    if not _on_host(a):
        return _cuda().matmul_f32out(a, b)
    return np.matmul(a.astype(F32, copy=False), b.astype(F32, copy=False))


def expert_mlp(x, w1, b1, w2, kind: str, hidden=None, out=None):
    """act(x @ w1 + b1) @ w2 for one expert (its b2 is added at the combine).

    x: [n, H] bf16, w1: [H, F] ([H, 2F] for a gated ``kind``: [gate | up]), b1: [F] ([2F]) | None,
    w2: [F, H] -> [n, H] bf16. ``hidden``/``out`` are optional preallocated [n, F] ([n, 2F] gated)
    / [n, H] bf16 buffers. Rounding: here x @ w1 (+ b1) stays fp32 through the activation and is
    rounded once; on the GPU cuBLAS rounds x @ w1 to bf16 first (one more bf16 step, inside the
    SPEC tolerance).
    """
    if not _on_host(x):
        return _cuda().expert_mlp(x, w1, b1, w2, kind, hidden, out)
    h = np.matmul(x.astype(F32, copy=False), w1.astype(F32, copy=False))
    if b1 is not None:
        h += b1.astype(F32, copy=False)
    h = activation(h, kind).astype(BF16)
    y = np.matmul(h.astype(F32), w2.astype(F32, copy=False))
    if out is None:
        return y.astype(BF16)
    out[...] = y if out.dtype == F32 else y.astype(BF16)    # fp32 out: a TP partial, unrounded
    return out


def grouped_expert_mlp(x, counts, w1, b1, w2, kind: str, hidden, out):
    """All of a rank's experts for one micro-batch: slot s's rows are x[s*C : s*C + counts[s]].

    x: [S*C, H] bf16; counts: [S] host ints; w1: [S, H, F]; b1: [S, F] | None; w2: [S, F, H];
    hidden: [S*C, F] bf16 and out: [S*C, H] bf16 buffers (out fp32 for tensor-parallel partial
    sums, rounded only after the reduction). Padding rows of a slot are left undefined.
    On the GPU each product is one strided-batched GEMM over the slots' first m rows, plus the
    heavy slots' tails grouped by window size (``expert_batches``).
    """
    if not _on_host(x):
        return _cuda().grouped_expert_mlp(x, counts, w1, b1, w2, kind, hidden, out)
    S = len(counts)
    C = x.shape[0] // S if S else 0
    for s, n in enumerate(np.asarray(counts).tolist()):
        if n:
            rows = slice(s * C, s * C + n)
            expert_mlp(x[rows], w1[s], None if b1 is None else b1[s], w2[s], kind, out=out[rows])
    return out


def packed_expert_mlp(x, packed, w1, b1, w2, kind: str, hidden, out):
    """``grouped_expert_mlp`` over rows packed by ``expert_batches.pack_slots`` (a rank that
    places the rows itself): busy slot p's rows are x[packed.slot_rows(p)], its weights those of
    slot packed.slots[p]. x, hidden, out: [packed.extent, ...]. On the GPU one strided-batched GEMM
    pair per run of consecutive slots over their first m rows, and the tails by window size."""
    if not _on_host(x):
        return _cuda().packed_expert_mlp(x, packed, w1, b1, w2, kind, hidden, out)
    for p, s in enumerate(packed.slots.tolist()):
        rows = packed.slot_rows(p)
        out[rows] = expert_mlp(x[rows], w1[s], None if b1 is None else b1[s], w2[s], kind,
                               out=np.empty((rows.size, out.shape[1]), out.dtype))
    return out


def static_dispatch(experts, capacity: int, num_experts: int):
    """Fixed-shape routing of one small step (a decode step's tokens), with no count on the
    host: experts [T, k] int ids < num_experts -> (dst [T, k] int64: choice (t, j)'s row
    e * capacity + (its rank among e's choices, in (t, j) order), src [T k] int64: its token t).
    Needs capacity >= T (no expert gets more than T choices)."""
    if not _on_host(experts):
        return _cuda().static_dispatch(experts, capacity, num_experts)
    flat = np.asarray(experts, np.int64).reshape(-1)
    seen = np.zeros(num_experts, np.int64)
    dst = np.empty_like(flat)
    for i, e in enumerate(flat.tolist()):
        dst[i], seen[e] = e * capacity + seen[e], seen[e] + 1
    return dst.reshape(experts.shape), np.arange(flat.size) // experts.shape[1]


def padded_expert_mlp(x, w1, b1, w2, kind: str):
    """Every slot's expert over all its C = x.shape[0] / S rows, used or not (fixed shapes: one
    strided-batched GEMM pair on the GPU). x: [S*C, H] bf16; w1 [S, H, F]; b1 [S, F] | None;
    w2 [S, F, H] -> [S*C, H] bf16, no output bias."""
    if not _on_host(x):
        return _cuda().padded_expert_mlp(x, w1, b1, w2, kind)
    S = w1.shape[0]
    C = x.shape[0] // S
    out = np.empty((x.shape[0], w2.shape[2]), BF16)
    for s in range(S):
        rows = slice(s * C, (s + 1) * C)
        expert_mlp(x[rows], w1[s], None if b1 is None else b1[s], w2[s], kind, out=out[rows])
    return out


def combine(rows, positions, weights, experts=None, b2=None, out=None):
    """Weighted sum of each token's k expert outputs, in choice order (split-independent).

    rows: [n, H] bf16 returned expert outputs; positions: [T, k] row of each (token, choice);
    weights: [T, k] fp32; experts: [T, k] and b2: [E, H] add each expert's output bias.
    -> [T, H] bf16.
    """
    if not _on_host(rows):
        return _cuda().combine(rows, positions, weights, experts, b2, out)
    T, k = positions.shape
    acc = np.zeros((T, rows.shape[1]), dtype=F32)
    for j in range(k):
        v = rows[positions[:, j]].astype(F32)
        if b2 is not None:
            v += b2[experts[:, j]].astype(F32, copy=False)
        acc += weights[:, j:j + 1] * v
    if out is None:
        return acc.astype(BF16)
    out[...] = acc.astype(BF16)
    return out


def dispatch_plan(experts, token_ids, holders, replicas, slot, micro_batch_tokens: int,
                  micro_batches: int, world_size: int, num_slots: int, replica=None):
    """Group a step's (token, choice) pairs by (micro-batch, destination rank, slot there).

    experts: [T, k] int64 flat expert ids; token_ids: [T] int64; holders, slot: [F, R] int64
    (rank and slot of each replica of each flat expert); replicas: [F]; replica: [T, k] or None
    (default: replica token_id mod replicas). -> order [T*k] (flat indices in key order,
    stable), positions [T, k] (row of each pair in its micro-batch's send order), counts
    [micro_batches * world_size * num_slots] int64 (on the same device as the inputs).
    """
    NK = micro_batches * world_size * num_slots
    on_host = _on_host(experts)
    if not on_host and _cuda().counting_sort_fits(experts.size, NK):
        return _cuda().dispatch_plan(experts, token_ids, holders, replicas, slot, micro_batch_tokens,
                                     micro_batches, world_size, num_slots, replica)
    # a stable sort of the keys: NumPy's, or CuPy's radix sort for steps too large for the
    # counting sort's per-tile histograms
    xp = np if on_host else _cuda().cp
    T, k = experts.shape
    flat = experts.reshape(-1).astype(np.int64)
    pick = (xp.repeat(token_ids, k) % replicas[flat]) if replica is None else xp.asarray(replica).reshape(-1)
    micro_batch = xp.repeat(xp.arange(T, dtype=np.int64) // micro_batch_tokens, k)
    keys = (micro_batch * world_size + holders[flat, pick]) * num_slots + slot[flat, pick]
    order = np.argsort(keys, kind="stable") if on_host else xp.argsort(keys)
    counts = xp.zeros(NK, np.int64)
    count_into(counts, keys)
    key_start = xp.cumsum(counts) - counts
    rank_in_order = xp.empty_like(order)
    rank_in_order[order] = xp.arange(order.size, dtype=order.dtype)
    positions = rank_in_order - key_start[micro_batch * (world_size * num_slots)]
    return order, positions.reshape(T, k), counts


def permute_blocks(src, dst, table, blocks: int) -> None:
    """For each b < blocks copy rows [s_b, s_b + n_b) of ``src`` to rows [d_b, d_b + n_b) of
    ``dst``; ``table`` is [3, blocks] int64 (s, d, n) on the arrays' device. Any 2-byte dtype."""
    if not _on_host(src):
        return _cuda().permute_blocks(src, dst, table, blocks)
    s, d, n = (np.asarray(row[:blocks]) for row in table)
    words_src, words_dst = src.view(np.uint16), dst.view(np.uint16)
    for a, b, c in zip(s.tolist(), d.tolist(), n.tolist()):
        if c:
            words_dst[b:b + c] = words_src[a:a + c]


def add_rmsnorm(x, y, weight, eps: float):
    """x: [..., H] bf16; y: like x or None; weight: [H] -> rmsnorm(x) bf16, statistics in fp32.
    With ``y``, first x += y in place, rounded to bf16 (the residual stream), then the norm of
    the sum: one pass over the row on the GPU."""
    if not _on_host(x):
        from ..device import dense_cuda
        return dense_cuda.add_rmsnorm(x, y, weight, eps)
    if y is not None:
        x.view(np.uint16)[...] = (x.astype(F32) + y.astype(F32)).astype(BF16).view(np.uint16)
    x32 = x.astype(F32)
    inv = 1.0 / np.sqrt(np.mean(x32 * x32, axis=-1, keepdims=True) + F32.type(eps))
    return (x32 * inv * weight.astype(F32, copy=False)).astype(BF16)


def add_rows(x, rows, f) -> None:
    """x: [N, H] bf16, rows: [n] ints, f: [n, H] bf16 -> x[rows] += f in place (fp32 sum, one
    rounding): the residual add of a block's output at the valid positions."""
    if not _on_host(x):
        from ..device import dense_cuda
        return dense_cuda.add_rows(x, rows, f)
    put_rows(x, rows, (take_rows(x, rows).astype(F32) + f.astype(F32)).astype(BF16))


def rope_heads(qkv, cos, sin, heads: int, head_dim: int) -> None:
    """qkv: [S, L, W] bf16; rotate (half-split RoPE) the first ``heads`` heads of width
    ``head_dim`` of every row in place, at position l. cos, sin: [L, head_dim/2] fp32."""
    if not _on_host(qkv):
        from ..device import dense_cuda
        return dense_cuda.rope_heads(qkv, cos, sin, heads, head_dim)
    S, L, _ = qkv.shape
    half = head_dim // 2
    part = qkv[..., :heads * head_dim].reshape(S, L, heads, head_dim)
    x32 = part.astype(F32)
    c, s = cos[:, None, :], sin[:, None, :]
    lo, hi = x32[..., :half], x32[..., half:]
    part[..., :half] = (lo * c - hi * s).astype(BF16)
    part[..., half:] = (hi * c + lo * s).astype(BF16)


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
    """Activation of an fp32 array: exact-erf gelu, tanh gelu or silu, elementwise; a kind
    "gated-<act>" takes h32 [.., 2F] as [gate | up] and returns act(gate) * up [.., F]."""
    gated, act = split_kind(kind)
    if gated:
        F = h32.shape[-1] // 2
        return activation(h32[..., :F], act, xp) * h32[..., F:]
    if kind == "gelu":
        return 0.5 * h32 * (1.0 + _erf(h32 * F32.type(1 / math.sqrt(2.0)), xp))
    if kind == "gelu_tanh":
        c = F32.type(math.sqrt(2.0 / math.pi))
        return 0.5 * h32 * (1.0 + xp.tanh(c * (h32 + F32.type(0.044715) * h32 * h32 * h32)))
    if kind == "silu":
        return h32 / (1.0 + xp.exp(-h32))
    raise ValueError(f"unknown activation {kind!r}")


__all__ = ["take_rows", "put_rows", "gather_scatter_rows", "topk", "matmul_f32out", "expert_mlp", "grouped_expert_mlp", "combine",
           "static_dispatch", "padded_expert_mlp",
           "dispatch_plan", "permute_blocks", "gate_topk", "count_into", "choice_counts", "set_expert_gemm_carveout", "add_bias",
           "activation", "add_rmsnorm", "rope_heads", "add_rows"]
