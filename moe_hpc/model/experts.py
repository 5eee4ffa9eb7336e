"""The experts a rank hosts, run back to back over the expert-major receive buffer."""
from __future__ import annotations

import numpy as np


class LocalExperts:
    """Weights of the (layer, expert) pairs hosted here."""

    def __init__(self, experts: dict, activation: str, hidden_size: int, xp=np):
        self.experts = experts            # (layer, expert) -> checkpoint.Expert
        self.activation = activation
        self.hidden_size = hidden_size
        self.xp = xp

    def forward(self, layer: int, rows, layout, out, workspace):
        """rows: [r, H] bf16 received expert-major (``layout``: exchange.Layout) -> ``out``
        [r, H] bf16, same order, without the output bias b2 (the combine adds it).

        Each expert's rows are one contiguous block, so each expert is two GEMMs in place;
        ``workspace(name, slot, rows, width)`` lends the [n, F] hidden buffer.
        """
        from ..kernels import expert_mlp
        per_expert = layout.counts.sum(axis=0)
        start = 0
        for e in np.nonzero(per_expert)[0].tolist():
            n = int(per_expert[e])
            w = self.experts.get((layer, e))
            if w is None:
                raise RuntimeError(f"received tokens for expert {e} of layer {layer}, which this "
                                   "rank does not host (placement mismatch)")
            hidden = workspace("expert-hidden", 0, n, w.w1.shape[1])
            expert_mlp(rows[start:start + n], w.w1, w.b1, w.w2, self.activation, hidden, out[start:start + n])
            start += n
        return out


__all__ = ["LocalExperts"]
