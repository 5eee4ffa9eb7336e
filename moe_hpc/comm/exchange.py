"""Token exchange between ranks: counts first, then rows, over a transport (``transports.py``).

Row layouts.  A micro-batch's traffic is described by a count matrix ``counts[p, e]``: rows for
(peer p, expert slot e).  The sender packs its rows peer-major (then slot), the receiver wants
them slot-major (then source peer), so each local expert's rows are one contiguous block its
GEMM can read in place; ``RowLayout`` turns counts into those row offsets.  The combine is the
same exchange with the two layouts swapped.  Each slot spans the busiest hosted expert's rows
rounded up to ``SLOT_ROUND`` (the expert GEMMs' row quantum, ``device/expert_batches.py``); the
planner sizes buffers with the same rule.

The Exchange owns every buffer (two slots per direction, so one micro-batch travels while the
next is packed and the previous is combined) and returns handles: ``post`` starts a transfer,
``Handle.wait()`` makes the compute stream (or the host) wait for it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from ..device.backend import Backend
from ..device.dtypes import BF16
from ..device.expert_batches import SLOT_ROUND


def displacements(counts: np.ndarray) -> np.ndarray:
    """Exclusive prefix sum: where each block starts."""
    out = np.zeros_like(counts)
    np.cumsum(counts[:-1], out=out[1:])
    return out


@dataclass(frozen=True)
class RowLayout:
    """Row offsets of every (peer, expert) block in a buffer. counts, offsets: [P, E] int64;
    extent: rows the buffer spans (more than the rows moved when blocks are padded)."""
    counts: np.ndarray
    offsets: np.ndarray
    extent: int

    @cached_property
    def rows(self) -> int:
        return int(self.counts.sum())

    @cached_property
    def per_peer(self) -> np.ndarray:
        return self.counts.sum(axis=1)

    @cached_property
    def is_peer_major(self) -> bool:
        """Whether the rows already lie peer by peer (then slot), as one message per peer needs."""
        c = self.counts.reshape(-1)
        return bool((self.offsets.reshape(-1)[c > 0] == displacements(c)[c > 0]).all())

    def blocks_from_peer_major(self) -> np.ndarray:
        """[3, n] int64 (source row, destination row, rows) of each non-empty (peer, slot) block,
        moving rows that lie peer-major into this layout; swap the first two rows of the table
        for the way back. What ``kernels.permute_blocks`` takes."""
        c = self.counts.reshape(-1)
        nz = c > 0
        return np.stack([displacements(c)[nz], self.offsets.reshape(-1)[nz], c[nz]]).astype(np.int64)

    def peer_major_scatter(self) -> np.ndarray | None:
        """Row index in this layout of each row received peer-major (peer, then expert), or None
        when the two orders coincide and no scatter is needed."""
        c = self.counts.reshape(-1)
        starts = self.offsets.reshape(-1)[c > 0]
        c = c[c > 0]
        index = np.repeat(starts - displacements(c), c) + np.arange(int(c.sum()))
        return None if (index == np.arange(index.size)).all() else index


def peer_major(counts: np.ndarray) -> RowLayout:
    """Sender's order: all rows for peer 0 (by expert), then peer 1, ..."""
    return RowLayout(counts, displacements(counts.reshape(-1)).reshape(counts.shape), int(counts.sum()))


def slot_major(counts: np.ndarray, slot_of_expert: np.ndarray, capacity: int) -> RowLayout:
    """Receiver's order for grouped GEMMs: local expert slot s owns rows [s*C, s*C + n_s), its
    sources one after another; the rest of each slot is padding that is computed, never sent.

    counts: [P, E]; slot_of_expert: [E] slot of each hosted expert (-1 elsewhere); C = capacity.
    """
    within = np.zeros_like(counts)
    np.cumsum(counts[:-1], axis=0, out=within[1:])
    offsets = np.where(slot_of_expert[None, :] >= 0, slot_of_expert[None, :] * capacity + within, 0)
    slots = int((slot_of_expert >= 0).sum())
    return RowLayout(counts, offsets.astype(np.int64), slots * capacity)


def slot_capacity(counts: np.ndarray, multiple: int = SLOT_ROUND) -> int:
    """Rows per slot: the busiest hosted expert's, rounded up (tensor-core friendly)."""
    busiest = int(counts.sum(axis=0).max()) if counts.size else 0
    return max(multiple, -(-busiest // multiple) * multiple)


@dataclass
class Handle:
    """An exchange in flight; ``wait()`` orders the consumer after it and returns the rows."""
    transport: object
    state: dict
    result: object
    done: bool = field(default=False)

    def wait(self):
        if not self.done:
            self.transport.finish(self.state)
            self.done = True
        return self.result


class Exchange:
    """Owns the buffers; dispatch and combine of token rows [n, H] bf16 over ``comm``."""

    def __init__(self, comm, hidden_size: int, backend: Backend, transport):
        """transport: what ``transports.make_transport`` made for ``comm`` (it owns the wire)."""
        self.comm, self.backend, self.xp = comm, backend, backend.xp
        self.hidden_size = hidden_size
        self.transport = transport
        self._buffers: dict = {}

    @property
    def transport_name(self) -> str:
        return self.transport.name

    def buffer(self, name: str, slot: int, rows: int, width: int | None = None):
        """A reusable [rows, width] bf16 buffer; grows by half again when too small. A transport
        that maps receive buffers for its peers (``ipc``) hands out its own for the names it
        maps (``receive_area``), so rows land where the experts and the combine read them."""
        width = width or self.hidden_size
        mapped = getattr(self.transport, "receive_area", None)
        view = mapped(name, slot, rows, width) if mapped is not None else None
        if view is not None:
            return view
        key = (name, slot, width)
        buf = self._buffers.get(key)
        if buf is None or buf.shape[0] < rows:
            cap = max(rows, int(1.5 * (0 if buf is None else buf.shape[0])), 1)
            buf = self.xp.empty((cap, width), dtype=BF16)
            self._buffers[key] = buf
        return buf[:rows]

    def exchange_counts(self, counts: np.ndarray) -> np.ndarray:
        """counts: [micro_batches, P, E] rows this rank sends -> [micro_batches, P, E] rows it
        receives (from each source), in one Alltoall for the whole block."""
        nmb, P, E = counts.shape
        send = np.ascontiguousarray(counts.transpose(1, 0, 2), dtype=np.int64)   # [P, nmb, E]
        recv = np.empty_like(send)
        self.comm.Alltoall(send, recv)
        return recv.transpose(1, 0, 2).copy()

    def prepare(self, pairs: list[tuple[RowLayout, RowLayout]]) -> list:
        """Everything a step's transfers need that the host can know up front, done once:
        pairs: one (peer-major layout, slot layout) per micro-batch -> one route per pair for
        ``post`` (the transport's, e.g. its block tables on the device in one copy; None where
        a transport has nothing to prepare). Called while the device is idle (right after the
        counts came back), so nothing in the micro-batch loop waits for the host."""
        return self.transport.prepare(pairs)

    def post(self, send, send_layout: RowLayout, recv, recv_layout: RowLayout, route=None) -> Handle:
        """Start moving ``send`` rows (in ``send_layout``) into ``recv`` (in ``recv_layout``);
        ``route``: what ``prepare`` returned for this micro-batch, if it was called.
        On the GPU the send rows must have been written on the current stream."""
        return Handle(self.transport, self.transport.start(send, send_layout, recv, recv_layout, route), recv)

    def close(self) -> None:
        self.transport.close()


# ------------------------------------------------------------------------------ transports


def slot_rows(rows, experts, padding: float):
    """Rows an expert rank's receive buffer spans: each hosted expert's slot holds the busiest
    expert's rows (mean x (1 + padding)), rounded up to SLOT_ROUND.  Scalars or arrays."""
    experts = np.asarray(experts)
    per_slot = np.asarray(rows, dtype=float) / np.maximum(experts, 1) * (1 + padding)
    out = np.where((experts > 0) & (per_slot > 0),
                   experts * SLOT_ROUND * np.ceil(per_slot / SLOT_ROUND), 0).astype(np.int64)
    return int(out) if out.ndim == 0 else out


__all__ = ["Exchange", "Handle", "RowLayout", "peer_major", "slot_major", "slot_capacity",
           "slot_rows", "displacements", "SLOT_ROUND"]
