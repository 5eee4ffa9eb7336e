"""Tensor parallelism of the dense side (``parallel.dense_tp = T``): which heads and columns a
member of a dense group holds, and its shard of a block's weights.

Member r of T holds query heads [r nh/T, (r+1) nh/T) with the key/value heads they read (split
when T divides the kv heads, replicated when the kv heads divide T), the matching rows of wo,
and columns [r Fd/T, (r+1) Fd/T) of the dense MLP (w1 and b1 by columns, w2 by rows). Norms, the
gate and the biases added after the sum stay whole on every member. Each member's attention and
MLP produce fp32 partial outputs; their sum over the group, rounded once, is the unsplit block's
output up to the order of an fp32 sum (the dense MLP's b2 is added before that one rounding,
where the unsplit block rounds, adds b2 and rounds again: within one bf16 step of it).
"""
from __future__ import annotations

import dataclasses

from ..config.run_config import ModelConfig


def head_range(m: ModelConfig, tp: int, rank: int) -> range:
    per = m.num_heads // tp
    return range(rank * per, (rank + 1) * per)


def kv_range(m: ModelConfig, tp: int, rank: int) -> range:
    """The key/value heads member ``rank``'s query heads read (query head h reads h // group)."""
    heads, group = head_range(m, tp, rank), m.num_heads // m.kv_heads
    return range(heads.start // group, (heads.stop - 1) // group + 1)


def local_model(m: ModelConfig, tp: int) -> ModelConfig:
    """The model as one member holds it: nh / T query heads, its kv heads, Fd / T dense-MLP
    columns (what the planner sizes a member's weights and activations with)."""
    return dataclasses.replace(m, num_heads=m.num_heads // tp, num_kv_heads=len(kv_range(m, tp, 0)),
                               dense_ffn_hidden_size=m.dense_ffn_hidden_size // tp)


def shard_dense_layer(block, m: ModelConfig, tp: int, rank: int):
    """A block's weights (weights.BlockWeights: attention wq [H, nh D], wk/wv [H, kv D], wo
    [nh D, H]; mlp w1 [H, Fd], b1 [Fd], w2 [Fd, H], ...; under MLA wq or wq_b [.., nh D], wkv_b
    [Rkv, nh (nope + v)], wo [nh v, H]) -> member ``rank``'s shard of them (the gate whole)."""
    mlp = block.mlp
    if mlp is not None:
        per = mlp.w1.shape[1] // tp
        f = slice(rank * per, (rank + 1) * per)
        mlp = dataclasses.replace(mlp, w1=mlp.w1[:, f].copy(), w2=mlp.w2[f, :].copy(),
                                  b1=None if mlp.b1 is None else mlp.b1[f].copy(),
                                  w3=None if mlp.w3 is None else mlp.w3[:, f].copy())
    return dataclasses.replace(block, attention=_shard_attention(block.attention, m, tp, rank), mlp=mlp)


def _shard_attention(layer, m: ModelConfig, tp: int, rank: int):
    D = m.head_dim
    q, kv = head_range(m, tp, rank), kv_range(m, tp, rank)
    cols = lambda r, width=D: slice(r.start * width, r.stop * width)
    if m.mla:           # latents whole on every member; the heads' q, [k_nope | v] and wo rows split
        kv_width = D - m.qk_rope_head_dim + m.v_head_dim
        shard = {"wkv_b": layer.wkv_b[:, cols(q, kv_width)], "wo": layer.wo[cols(q, m.v_head_dim), :],
                 ("wq_b" if layer.wq_b is not None else "wq"): (layer.wq_b if layer.wq_b is not None
                                                                 else layer.wq)[:, cols(q)]}
    else:
        shard = {"wq": layer.wq[:, cols(q)], "wk": layer.wk[:, cols(kv)], "wv": layer.wv[:, cols(kv)],
                 "wo": layer.wo[cols(q), :]}
    for name, heads in (("bq", q), ("bk", kv), ("bv", kv)):      # q/k/v biases go with their heads
        if getattr(layer, name) is not None:
            shard[name] = getattr(layer, name)[cols(heads)]
    return dataclasses.replace(layer, **{k: v.copy() for k, v in shard.items() if v is not None})


__all__ = ["head_range", "kv_range", "local_model", "shard_dense_layer"]
