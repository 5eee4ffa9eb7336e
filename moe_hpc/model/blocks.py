"""Block objects per kind, each holding its weights (``weights.py``): the engine composes them.

nanoGPT's ``Block`` in pieces that fit the wavefront: ``AttentionBlock`` adds attention to the
residual stream and returns the block's normed MLP input at the valid positions; a dense block's
``MlpBlock`` or the MoE layer (``moe/layer.py``) turns that into the block's output, which the
engine adds back.  ``Embedding`` starts the stream, ``OutputHead`` ends it (final norm, logits,
log-probs).  For generation the attention block holds its ``KvCache``, allocated once per
group of sequences (``allocate``) and filled by the prefill, then read by every decode step.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..device.backend import matmul_bf16, words
from ..device.dtypes import BF16
from ..device.kernels import add_rmsnorm, matmul_f32out, put_rows, take_rows
from .attention import attention, cached_attention
from .layers import mlp, rope_tables, token_logprobs
from .mla import rope_table


@dataclass(frozen=True)
class CacheAt:
    """Where a forward pass meets the KV cache: its sequences' cache rows [s] and the position of
    each one's first input position [s] (int64: 0 in the prefill, the sequence's length so far
    in a decode step). Host arrays, or device arrays for a decode step (one position each) that
    must not touch the host (a captured CUDA graph's)."""
    rows: np.ndarray
    start: np.ndarray
    # what every block of the pass derives alike from rows and start (the device copies, the
    # cache index, the RoPE rows), made by the first block that asks: a decode step's blocks
    # then share it instead of each repeating the same few small kernels
    shared: dict = field(default_factory=dict, compare=False, repr=False)

    def once(self, key, make):
        """``make()`` the first time ``key`` is asked for in this pass, the same value after."""
        if key not in self.shared:
            self.shared[key] = make()
        return self.shared[key]


class KvCache:
    """One attention block's keys for ``sequences`` sequences of up to ``positions`` positions,
    bf16, allocated once: MHA/GQA k and v [S, P, kv, D] (this dense-TP member's kv heads); MLA the
    normed latent [S, P, kv_lora_rank] and the shared RoPE key [S, P, qk_rope_head_dim], never the
    expanded k and v. ``rope`` holds the cos/sin tables of positions 0..P-1."""

    def __init__(self, local, sequences: int, positions: int, xp):
        self.shape, self.xp = (sequences, positions), xp
        if local.mla:
            widths = [(local.kv_lora_rank,), (local.qk_rope_head_dim,)]
            self.rope = rope_table(local, positions, xp)
            self.rope_key = None
        else:
            widths = [(local.kv_heads, local.head_dim)] * 2
            self.rope = rope_tables(xp.arange(positions), local.head_dim, local.rope_theta, xp)
            # what the tables are a function of: caches with the same key hold the same tables
            self.rope_key = ("rope", positions, local.head_dim, local.rope_theta)
        # zeros: positions a shorter sequence never wrote are masked, and 0 * NaN would not be
        self.parts = [xp.zeros((sequences, positions, *w), BF16) for w in widths]

    @property
    def nbytes(self) -> int:
        return sum(int(p.nbytes) for p in self.parts)

    def put(self, rows: np.ndarray, start: np.ndarray, values) -> None:
        """values: per part [s, L, ...] -> the cache at rows x positions start..start+L-1 (host
        ints), by whole-row copies (an advanced-index scatter of a prefill's keys is slow)."""
        P, L = self.shape[1], values[0].shape[1]
        self._write(self.xp.asarray(((rows * P + start)[:, None] + np.arange(L)).reshape(-1)), values)

    def put_step(self, flat, values) -> None:
        """A decode step's keys: values per part [s, 1, ...] -> the cache at flat positions
        ``flat`` [s] (``step_index``), ints where the cache lives (a row copy, no host work:
        the step may be a captured graph)."""
        self._write(flat, values)

    def step_index(self, rows, positions):
        """[s] flat cache position (row x positions + position) of a decode step's keys."""
        return rows * self.shape[1] + positions

    def _write(self, at, values) -> None:
        """values: per part [s, L, ...] -> flat cache positions ``at`` [s L] (row x P + position,
        where the cache lives), one whole-row copy per part."""
        S, P = self.shape
        for part, value in zip(self.parts, values):
            # a view of the fused projection's columns is read in place (strided rows), no copy
            put_rows(part.reshape(S * P, -1), at, value.reshape(at.shape[0], -1))

    def read(self, rows: np.ndarray, length: int):
        """The parts of cache rows ``rows`` (ascending) at positions 0..length-1: [s, length, ...]
        each; views while the rows are consecutive (every sequence of the group still active),
        a gathered copy once some have finished."""
        if len(rows) and rows[-1] - rows[0] + 1 == len(rows):
            return tuple(part[rows[0]:rows[-1] + 1, :length] for part in self.parts)
        r = self.xp.asarray(rows)
        return tuple(part[r, :length] for part in self.parts)


class AttentionBlock:
    """weights: AttentionWeights (this dense-TP member's shard); model: the whole model; local:
    the model as this member holds it (``dense_tp.local_model``); block: the tiled core's tile;
    reduce: the dense-TP group's sum or None; flash: the fused core or None."""

    def __init__(self, weights, model, local, block: int, xp, reduce=None, flash=None):
        self.weights, self.model, self.local, self.block = weights, model, local, block
        self.xp, self.reduce, self.flash = xp, reduce, flash
        self.cache = None

    def allocate(self, sequences: int, positions: int) -> KvCache:
        """The KV cache for a group of ``sequences`` of up to ``positions`` positions, made once
        (kept while the next group has the same shape)."""
        if self.cache is None or self.cache.shape != (sequences, positions):
            self.cache = None               # free the old one before making the new
            self.cache = KvCache(self.local, sequences, positions, self.xp)
        return self.cache

    def __call__(self, x, rows, at: CacheAt | None = None):
        """x: [s, L, H] bf16 residual stream (updated in place); rows: [T] valid flat positions;
        at: where x meets the KV cache (generation) or None -> the normed MLP input there [T, H]
        bf16 (padding is never routed)."""
        w, eps = self.weights, self.model.norm_eps
        a = add_rmsnorm(x, None, w.attn_norm, eps)
        if at is None:
            y = attention(a, w, self.local, self.block, self.xp, self.reduce, self.flash)
        else:
            y = cached_attention(a, w, self.local, self.cache, at, self.block, self.xp, self.reduce, self.flash)
        h = add_rmsnorm(x, y, w.mlp_norm, eps)      # the residual add, then the MLP's norm
        return take_rows(h.reshape(-1, self.model.hidden_size), rows)


class MlpBlock:
    """A dense block's MLP. weights: MlpWeights (w1 fused [gate | up] when gated)."""

    def __init__(self, weights, ffn_kind: str, xp, reduce=None):
        self.weights, self.ffn_kind, self.xp, self.reduce = weights, ffn_kind, xp, reduce

    def __call__(self, h):
        """h: [T, H] bf16 normed MLP input -> [T, H] bf16."""
        w = self.weights
        return mlp(h, w.w1, w.b1, w.w2, w.b2, self.ffn_kind, self.xp, self.reduce)


class Embedding:
    """embed: [V, H] bf16 on the device."""

    def __init__(self, embed, xp):
        self.embed, self.xp = embed, xp

    def __call__(self, tokens):
        """tokens: [s, L] ints -> [s, L, H] bf16."""
        H = self.embed.shape[1]
        return take_rows(self.embed, self.xp.asarray(tokens.reshape(-1))).reshape(*tokens.shape, H)


class OutputHead:
    """The last stage's end of the stream. final_norm: [H]; lm_head: [H, V] or None."""

    def __init__(self, final_norm, lm_head, model, backend):
        self.final_norm, self.lm_head, self.model = final_norm, lm_head, model
        self.backend, self.xp = backend, backend.xp

    def __call__(self, x, valid: np.ndarray, logits: bool):
        """x: [s, L, H] bf16; valid: [s, L] bool -> (hidden [s, L, H] bf16 with padding zeroed,
        logits [s, L, V] bf16 (padding zeroed) or None)."""
        s, L = valid.shape
        out = add_rmsnorm(x, None, self.final_norm, self.model.norm_eps)
        pad = self.xp.asarray(np.flatnonzero(~valid.reshape(-1)))
        words(out.reshape(-1, self.model.hidden_size))[pad] = 0
        if not logits:
            return out, None
        scores = matmul_bf16(out, self.lm_head, self.xp)
        words(scores.reshape(s * L, self.model.vocab_size))[pad] = 0   # by V: a rank may hold no sequence (s = 0)
        return out, scores

    def last_logits(self, x, positions: np.ndarray):
        """x: [s, L, H] bf16 residual stream; positions: [s] host ints -> fp32 logits [s, V] on the
        host at each sequence's ``positions`` (final norm, then the LM head, never rounded to bf16)."""
        s, L, H = x.shape
        return self.backend.to_host(self.logits_of(take_rows(x.reshape(-1, H),
                                                             self.xp.asarray(np.arange(s) * L + positions))))

    def logits_of(self, rows):
        """rows: [n, H] bf16 of the residual stream -> fp32 logits [n, V] where they live."""
        return matmul_f32out(add_rmsnorm(rows, None, self.final_norm, self.model.norm_eps), self.lm_head)

    def logprobs(self, out, tokens: np.ndarray, lengths: np.ndarray, rows_per_step: int = 1024):
        """out: [s, L, H] bf16 final hidden states; tokens: [s, L] host ints -> [s, L] float32
        host: log p(tokens[:, t+1]) at position t, NaN at each sequence's last position and at
        padding. ``rows_per_step`` positions at a time, so [rows, V] fp32 logits are the most
        this ever holds, whatever the chunk."""
        xp = self.xp
        s, L, H = out.shape
        has_next = np.arange(L)[None, :] < lengths[:, None] - 1
        rows = np.flatnonzero(has_next)                   # flat positions; row + 1 is the next token
        targets = tokens.reshape(-1)[rows + 1]
        result = np.full(s * L, np.nan, np.float32)
        flat = out.reshape(-1, H)
        for a in range(0, rows.size, rows_per_step):
            r = rows[a:a + rows_per_step]
            lp = token_logprobs(take_rows(flat, xp.asarray(r)), self.lm_head, xp.asarray(targets[a:a + r.size]), xp)
            result[r] = self.backend.to_host(lp)
        return result.reshape(s, L)


__all__ = ["CacheAt", "KvCache", "AttentionBlock", "MlpBlock", "Embedding", "OutputHead"]
