"""The experts a rank hosts, stacked into [slots, ...] weights so one strided-batched GEMM runs
them all over the slot-padded receive buffer.

Slot j holds the j-th of this rank's hosted experts in ascending flat id (m*E + e), the order
every sender uses for its counts, so slots may mix MoE blocks (the cross-layer pipeline).
"""
from __future__ import annotations

import numpy as np


class LocalExperts:
    """Load with ``add`` (one expert at a time, in ascending flat id), then ``stack`` once."""

    def __init__(self, activation: str, xp=np):
        self.activation, self.xp = activation, xp
        self.ids: list[int] = []           # flat id of each slot
        self.experts: list = []            # checkpoint.Expert per slot (views once stacked)
        self.stacked = None                # (w1 [S,H,F], b1 [S,F] | None, w2 [S,F,H])

    @property
    def num_slots(self) -> int:
        return len(self.ids)

    def add(self, flat_id: int, weights) -> None:
        if self.ids and flat_id <= self.ids[-1]:
            raise ValueError("experts must be added in ascending flat id")
        self.ids.append(flat_id)
        self.experts.append(weights)

    def stack(self) -> None:
        if not self.experts:
            return
        xp, ws = self.xp, self.experts
        w1, w2 = xp.stack([w.w1 for w in ws]), xp.stack([w.w2 for w in ws])
        b1 = None if any(w.b1 is None for w in ws) else xp.stack([w.b1 for w in ws])
        self.stacked = (w1, b1, w2)
        for s, w in enumerate(ws):                    # keep views, drop the copies
            w.w1, w.w2 = w1[s], w2[s]
            w.b1 = None if b1 is None else b1[s]

    def forward(self, rows, layout, out, workspace):
        """rows: [extent, H] bf16 in ``layout`` (exchange.expert_slots, one column per slot) ->
        ``out`` [extent, H] (bf16, or fp32 for tensor-parallel partials), without the output
        bias b2 (the combine adds it). ``workspace(name, slot, rows, width)`` lends [extent, F]."""
        from ..kernels import grouped_expert_mlp
        per_slot = layout.counts.sum(axis=0)
        if per_slot[self.num_slots:].any():
            raise RuntimeError("received tokens for a slot this rank does not fill (placement mismatch)")
        if self.num_slots == 0 or layout.extent == 0:
            return out
        w1, b1, w2 = self.stacked
        hidden = workspace("expert-hidden", 0, layout.extent, w1.shape[2])
        return grouped_expert_mlp(rows[:layout.extent], per_slot[:self.num_slots], w1, b1, w2,
                                  self.activation, hidden, out[:layout.extent])


__all__ = ["LocalExperts"]
