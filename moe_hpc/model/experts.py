"""The experts a rank hosts, run back to back over one buffer sorted by expert."""
from __future__ import annotations

import numpy as np

from ..backend import BF16
from .layers import mlp


class LocalExperts:
    """Weights of the (layer, expert) pairs hosted here; ``forward`` computes received rows."""

    def __init__(self, experts: dict, activation: str, hidden_size: int, xp=np):
        self.experts = experts            # (layer, expert) -> checkpoint.Expert
        self.activation = activation
        self.hidden_size = hidden_size
        self.xp = xp

    def forward(self, layer: int, rows, expert_ids):
        """rows: [r, H] bf16, expert_ids: [r] int -> [r, H] bf16, in the same order."""
        xp = self.xp
        out = xp.empty((rows.shape[0], self.hidden_size), dtype=BF16)
        if rows.shape[0] == 0:
            return out
        order = xp.argsort(expert_ids, kind="stable")
        sorted_ids = expert_ids[order]
        present, starts = np.unique(np.asarray(sorted_ids), return_index=True)
        ends = list(starts[1:]) + [rows.shape[0]]
        for e, a, b in zip(present.tolist(), starts.tolist(), ends):
            w = self.experts.get((layer, e))
            if w is None:
                raise RuntimeError(f"rank received tokens for expert {e} of layer {layer}, "
                                   "which it does not host (placement mismatch)")
            idx = order[a:b]
            out[idx] = mlp(rows[idx], w.w1, w.b1, w.w2, w.b2, self.activation, xp)
        return out


__all__ = ["LocalExperts"]
