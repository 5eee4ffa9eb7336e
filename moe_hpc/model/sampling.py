"""Choosing the next token from a step's logits (SPEC.md, "Generation").

Greedy (temperature 0, the default) is the argmax of the fp32 logits, ties to the lowest id.
Sampling divides by the temperature, keeps the top-k, then the top-p (the smallest set of the
most probable tokens whose mass reaches p), renormalises and draws.  The draw for sequence
``s`` at step ``i`` uses one uniform number that is a pure function of (seed, s, i), and every
row is computed alone, so a token never depends on ranks, roles, chunking, batching or row order.

All of it runs on the host in NumPy over the step's [n, V] fp32 logits, a row at a time where
rows differ in what they keep (docs/sampling.md gives the cost).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config.errors import ConfigError

MASK64 = (1 << 64) - 1
FIRST_CANDIDATES = 256        # top-p alone: the most probable tokens sorted first, doubled if short


@dataclass(frozen=True)
class SamplingParams:
    """``[generate]`` keys temperature, top_k, top_p, seed. temperature 0: greedy (the others
    unused); top_k 0 and top_p 1: off."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


def check_sampling(params: SamplingParams) -> None:
    """Raise ConfigError naming the key for a value outside its range."""
    t, k, p = params.temperature, params.top_k, params.top_p
    if not (isinstance(t, (int, float)) and np.isfinite(t) and t >= 0):
        raise ConfigError(f"generate.temperature = {t!r} must be a finite number >= 0 (0: greedy)")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ConfigError(f"generate.top_k = {k!r} must be an integer >= 0 (0: off)")
    if not (isinstance(p, (int, float)) and 0 < p <= 1):
        raise ConfigError(f"generate.top_p = {p!r} must be in (0, 1] (1: off)")
    if isinstance(params.seed, bool) or not isinstance(params.seed, (int, np.integer)):
        raise ConfigError(f"generate.seed = {params.seed!r} must be an integer")


# ---------------------------------------------------------------- the counter-based generator

def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (Steele, Lea, Flood 2014): a bijection of uint64 whose
    output bits each depend on every input bit; [n] uint64 -> [n] uint64 (wrapping)."""
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def uniforms(seed: int, seq_ids: np.ndarray, step: np.ndarray) -> np.ndarray:
    """One uniform in [0, 1) per row, a pure function of (seed, sequence, step): [n] float64.

    A hash chained over the three keys rather than NumPy's Philox: it is vectorised over the
    rows (Philox would need one Generator object per row), its bits are fixed here for good
    (NumPy does not promise ``Generator.random``'s stream across versions), and it is four
    lines to port to a GPU kernel. Each key passes a full SplitMix64 mix before the next is
    folded in, so neighbouring sequences and steps get unrelated numbers.
    """
    with np.errstate(over="ignore"):
        h = _splitmix64(np.full(len(seq_ids), int(seed) & MASK64, np.uint64))
        h = _splitmix64(h ^ np.asarray(seq_ids, np.int64).astype(np.uint64))
        h = _splitmix64(h ^ np.asarray(step, np.int64).astype(np.uint64))
    return (h >> np.uint64(11)).astype(np.float64) * 2.0 ** -53     # the top 53 bits: exact in a double


# ---------------------------------------------------------------- one row's distribution

def _ranked(x: np.ndarray, m: int) -> np.ndarray:
    """Ids of the ``m`` largest of ``x`` [V] (more when values tie at the m-th), sorted by value
    descending, then by id: one deterministic order whatever the partition's internals. Ranked
    on the fp32 logits themselves: dividing by a temperature keeps the order."""
    if m < len(x):
        cut = np.partition(x, len(x) - m)[len(x) - m]
        ids = np.flatnonzero(x >= cut)
    else:
        ids = np.arange(len(x))
    return ids[np.lexsort((ids, -x[ids]))]


def kept_tokens(logits: np.ndarray, params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """The tokens sampling may draw for one row and their renormalised probabilities.

    logits: [V] float32 -> (ids [m] int64 in the draw's order, probs [m] float64 summing to 1).
    Ties are ranked by id, so at a top-k or top-p boundary the lower id is kept. With neither
    top-k nor top-p every id is kept, in id order (no sort: any fixed order draws the same law).
    Probabilities are float64 of ``logits / temperature``; only the candidates are sorted.
    """
    x, t = np.asarray(logits, np.float32), params.temperature
    V = len(x)
    k = params.top_k if 0 < params.top_k < V else V
    top = np.float64(x.max()) / t
    if k == V and params.top_p >= 1:
        weights = np.exp(x.astype(np.float64) / t - top)
        return np.arange(V), weights / weights.sum()
    m, total = (k if k < V else min(V, FIRST_CANDIDATES)), None
    while True:
        ids = _ranked(x, m)[:k]
        weights = np.exp(x[ids].astype(np.float64) / t - top)
        if params.top_p >= 1:
            return ids, weights / weights.sum()
        # top-p's mass is that of the top-k set (all V when top-k is off), summed in the
        # ranked order: the same prefix sums whatever m was, so growing m changes nothing.
        if total is None:
            total = weights.sum() if k < V else np.exp(x.astype(np.float64) / t - top).sum()
        cumulative = np.cumsum(weights) / total
        reached = np.flatnonzero(cumulative >= params.top_p)
        if len(reached) or len(ids) >= k:
            n = reached[0] + 1 if len(reached) else len(ids)
            return ids[:n], weights[:n] / weights[:n].sum()
        m = min(V, 2 * m)


def _draw(ids: np.ndarray, probs: np.ndarray, u: float) -> int:
    """The inverse CDF over the ranked ids at ``u`` in [0, 1); a zero-probability id is never drawn."""
    cumulative = np.cumsum(probs)
    i = int(np.searchsorted(cumulative, u * cumulative[-1], side="right"))
    return int(ids[min(i, len(ids) - 1)])


def log_softmax_at(logits: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """log-softmax of the unmodified logits [n, V] float32 at ``tokens`` [n]: [n] float32.

    exp in fp32 (the logits' own precision; 20x faster than float64 at V = 129k), summed in float64.
    """
    top = logits.max(axis=1)
    lse = top.astype(np.float64) + np.log(np.exp(logits - top[:, None]).sum(axis=1, dtype=np.float64))
    return (logits[np.arange(len(logits)), tokens].astype(np.float64) - lse).astype(np.float32)


def pick_tokens(logits: np.ndarray, seq_ids: np.ndarray, step: np.ndarray,
                params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """The next token of each row and its log-probability under the unmodified distribution.

    logits: [n, V] float32 (host); seq_ids: [n] int64 global sequence indices; step: [n] int64
    (0 for the first new token) -> (tokens [n] int32, logprobs [n] float32).
    """
    logits = np.asarray(logits, np.float32)
    if params.temperature == 0:
        tokens = np.argmax(logits, axis=1)                  # the first maximum: ties to the lowest id
    else:
        u = uniforms(params.seed, seq_ids, step)
        tokens = np.array([_draw(*kept_tokens(row, params), u[r]) for r, row in enumerate(logits)], np.int64)
    return tokens.astype(np.int32), log_softmax_at(logits, tokens)


__all__ = ["SamplingParams", "check_sampling", "pick_tokens", "kept_tokens", "uniforms", "log_softmax_at"]
