"""The experts a rank hosts: per MoE block, stacked into [slots, ...] weights so one
strided-batched GEMM runs them all over the slot-padded receive buffer."""
from __future__ import annotations

import numpy as np


class LocalExperts:
    """Weights of the (layer, expert) pairs hosted here.

    Load with ``add`` (one expert at a time), then ``stack`` once: slot s of block l holds the
    s-th hosted expert of l in ascending expert order, matching ``exchange.expert_slots``.
    """

    def __init__(self, num_experts: int, activation: str, xp=np):
        self.num_experts, self.activation, self.xp = num_experts, activation, xp
        self.experts: dict = {}            # (layer, expert) -> checkpoint.Expert (views once stacked)
        self.stacked: dict = {}            # layer -> (w1 [S,H,F], b1 [S,F] | None, w2 [S,F,H])
        self.slots: dict = {}              # layer -> [E] int slot of each expert, -1 if not here

    def add(self, layer: int, expert: int, weights) -> None:
        self.experts[(layer, expert)] = weights

    def stack(self) -> None:
        xp = self.xp
        for layer in sorted({l for l, _ in self.experts}):
            hosted = sorted(e for l, e in self.experts if l == layer)
            ws = [self.experts[(layer, e)] for e in hosted]
            w1, w2 = xp.stack([w.w1 for w in ws]), xp.stack([w.w2 for w in ws])
            b1 = None if any(w.b1 is None for w in ws) else xp.stack([w.b1 for w in ws])
            self.stacked[layer] = (w1, b1, w2)
            slots = np.full(self.num_experts, -1, dtype=np.int64)
            slots[hosted] = np.arange(len(hosted))
            self.slots[layer] = slots
            for s, (e, w) in enumerate(zip(hosted, ws)):    # keep views, drop the copies
                w.w1, w.w2 = w1[s], w2[s]
                w.b1 = None if b1 is None else b1[s]

    def slot_of(self, layer: int) -> np.ndarray:
        return self.slots.get(layer, np.full(self.num_experts, -1, dtype=np.int64))

    def forward(self, layer: int, rows, layout, out, workspace):
        """rows: [extent, H] bf16 in ``layout`` (exchange.expert_slots) -> ``out`` [extent, H],
        without the output bias b2 (the combine adds it). ``workspace(name, slot, rows, width)``
        lends the [extent, F] hidden buffer."""
        from ..kernels import grouped_expert_mlp
        slots = self.slot_of(layer)
        hosted = np.nonzero(slots >= 0)[0]
        per_expert = layout.counts.sum(axis=0)
        stray = np.nonzero((per_expert > 0) & (slots < 0))[0]
        if stray.size:
            raise RuntimeError(f"received tokens for expert {int(stray[0])} of layer {layer}, which "
                               "this rank does not host (placement mismatch)")
        if hosted.size == 0 or layout.extent == 0:
            return out
        w1, b1, w2 = self.stacked[layer]
        hidden = workspace("expert-hidden", 0, layout.extent, w1.shape[2])
        return grouped_expert_mlp(rows[:layout.extent], per_expert[hosted], w1, b1, w2,
                                  self.activation, hidden, out[:layout.extent])


__all__ = ["LocalExperts"]
