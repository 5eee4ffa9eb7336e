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
        """Copy the experts into [S, ...] arrays one at a time, dropping each copy as it goes,
        so loading never holds twice the expert weights."""
        if not self.experts:
            return
        xp, ws = self.xp, self.experts
        first = ws[0]
        S = len(ws)
        w1 = xp.empty((S,) + first.w1.shape, first.w1.dtype)
        w2 = xp.empty((S,) + first.w2.shape, first.w2.dtype)
        b1 = None if any(w.b1 is None for w in ws) else xp.empty((S,) + first.b1.shape, first.b1.dtype)
        for s, w in enumerate(ws):
            _copy(w1, s, w.w1)
            _copy(w2, s, w.w2)
            w.w1, w.w2 = w1[s], w2[s]
            if b1 is not None:
                _copy(b1, s, w.b1)
                w.b1 = b1[s]
        self.stacked = (w1, b1, w2)

    @staticmethod
    def active_slots(counts: np.ndarray, num_slots: int) -> np.ndarray:
        """[slots] position of each slot that received rows among those that did, -1 elsewhere.
        Only these get buffer space and GEMM work: a step touches one or a few blocks, while a
        rank may host experts of every block."""
        busy = counts.sum(axis=0)[:num_slots] > 0
        return np.where(busy, np.cumsum(busy) - 1, -1)

    def forward(self, rows, layout, out, workspace):
        """rows: [extent, H] bf16 in ``layout`` (exchange.slot_major over ``active_slots``) ->
        ``out`` [extent, H] (bf16, or fp32 for tensor-parallel partials), without the output
        bias b2 (the combine adds it). ``workspace(name, slot, rows, width)`` lends [extent, F].
        Runs of consecutive busy slots are one strided-batched GEMM each."""
        from ..device.expert_batches import consecutive_runs
        from ..device.kernels import grouped_expert_mlp
        per_slot = layout.counts.sum(axis=0)
        busy = np.nonzero(per_slot > 0)[0]
        self._check_hosted(busy)
        if busy.size == 0 or layout.extent == 0:
            return out
        C = layout.extent // busy.size
        w1, b1, w2 = self.stacked
        hidden = workspace("expert-hidden", 0, layout.extent, w1.shape[2])
        for p0, p1 in consecutive_runs(busy):                    # positions among busy slots
            s0, s1 = int(busy[p0]), int(busy[p1 - 1]) + 1
            rows_ = slice(p0 * C, p1 * C)
            grouped_expert_mlp(rows[rows_], per_slot[s0:s1], w1[s0:s1], None if b1 is None else b1[s0:s1],
                               w2[s0:s1], self.activation, hidden[rows_], out[rows_])
        return out

    def forward_packed(self, rows, packed, out, workspace):
        """``forward`` over rows packed by ``expert_batches.pack_slots`` (one rank, no
        transport): rows, out [packed.extent, H]; the workspace lends [extent, F]."""
        from ..device.kernels import packed_expert_mlp
        self._check_hosted(packed.slots)
        if packed.extent == 0:
            return out
        w1, b1, w2 = self.stacked
        hidden = workspace("expert-hidden", 0, packed.extent, w1.shape[2])
        return packed_expert_mlp(rows, packed, w1, b1, w2, self.activation, hidden, out)


    def _check_hosted(self, busy) -> None:
        """busy: ascending slots that received rows; one past this rank's slots is a placement
        mismatch between the senders and this rank."""
        if len(busy) and busy[-1] >= self.num_slots:
            raise RuntimeError("received tokens for a slot this rank does not fill (placement mismatch)")


def _copy(stack, s: int, array) -> None:
    """stack[s] = array; bf16 as raw 16-bit words, so CuPy needs no bf16 copy kernel."""
    if stack.dtype.itemsize == 2:
        stack.view(np.uint16)[s] = array.view(np.uint16)
    else:
        stack[s] = array


__all__ = ["LocalExperts"]
