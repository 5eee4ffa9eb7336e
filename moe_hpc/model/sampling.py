"""Picking each generated token from the logits (SPEC, "Generation").

Placeholder of the agreed interface: greedy only. The sampling helper's module (temperature,
top-k, top-p, a counter-based generator keyed by (seed, sequence, step)) replaces this file.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


def pick_tokens(logits: np.ndarray, seq_ids: np.ndarray, step: np.ndarray,
                params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """logits: [n, V] float32 host; seq_ids, step: [n] int64 -> (tokens [n] int32, log-probs [n]
    float32 of the chosen tokens under the unmodified logits). Greedy: argmax, ties to the lowest id."""
    if params.temperature != 0.0:
        raise NotImplementedError("sampling arrives with the sampling module")
    logits = np.asarray(logits, dtype=np.float32)
    tokens = np.argmax(logits, axis=-1).astype(np.int32)
    top = logits.max(axis=-1, keepdims=True)
    logz = top[:, 0] + np.log(np.exp(logits - top).sum(axis=-1))
    return tokens, (logits[np.arange(len(tokens)), tokens] - logz).astype(np.float32)


__all__ = ["SamplingParams", "pick_tokens"]
