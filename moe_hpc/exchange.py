"""Token exchange between ranks: counts first, then payload by non-blocking ``Ialltoallv``.

The Exchange owns every communication buffer (two slots per direction, so one micro-batch can
travel while the next is packed and the previous is combined) and returns handles: ``post_*``
starts the transfer, ``Handle.wait()`` finishes it.  Rows travel as raw 16-bit words of bf16
in a contiguous MPI datatype of H words, so counts are in tokens, not elements, and stay far
below the 2^31 limit of MPI counts.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .backend import BF16


def displacements(counts: np.ndarray) -> np.ndarray:
    """Exclusive prefix sum: where each peer's block starts."""
    out = np.zeros_like(counts)
    np.cumsum(counts[:-1], out=out[1:])
    return out


@dataclass
class Handle:
    """An exchange in flight. ``wait()`` returns its received arrays (views into owned buffers,
    valid until the same slot is posted again, two posts later)."""
    requests: list
    result: tuple
    done: bool = field(default=False)

    def wait(self):
        if not self.done:
            from mpi4py import MPI
            MPI.Request.Waitall(self.requests)
            self.done = True
        return self.result


class Exchange:
    """Dispatch and combine of token rows [n, H] bf16 over communicator ``comm``."""

    def __init__(self, comm, hidden_size: int):
        from mpi4py import MPI
        self.comm = comm
        self.size = comm.Get_size()
        self.hidden_size = hidden_size
        self.row_type = MPI.UINT16_T.Create_contiguous(hidden_size).Commit()
        self.index_type = MPI.INT32_T
        self._buffers: dict[tuple[str, int], np.ndarray] = {}
        self.bytes_sent = 0

    def close(self) -> None:
        self.row_type.Free()

    def _buffer(self, name: str, slot: int, rows: int, width: int, dtype) -> np.ndarray:
        """A reusable buffer of at least ``rows`` rows; grows (x1.5) only when too small."""
        key = (name, slot)
        buf = self._buffers.get(key)
        if buf is None or buf.shape[0] < rows:
            cap = max(rows, int(1.5 * (0 if buf is None else buf.shape[0])), 1)
            buf = np.empty((cap, width), dtype=dtype) if width else np.empty(cap, dtype=dtype)
            self._buffers[key] = buf
        return buf[:rows]

    def exchange_counts(self, send_counts: np.ndarray) -> np.ndarray:
        """send_counts: [micro_batches, P] int -> recv_counts [micro_batches, P], in one Alltoall
        for the whole layer (so each payload exchange can be posted without a blocking step)."""
        nmb = send_counts.shape[0]
        send = np.ascontiguousarray(send_counts.T, dtype=np.int64)        # [P, nmb]
        recv = np.empty_like(send)
        self.comm.Alltoall(send, recv)
        return recv.T.copy()

    def _post(self, tag: str, slot: int, rows, send_counts, recv_counts, extra=None) -> Handle:
        H = self.hidden_size
        n_recv = int(recv_counts.sum())
        send = self._buffer(f"{tag}-send", slot, rows.shape[0], H, BF16)
        send[...] = rows
        recv = self._buffer(f"{tag}-recv", slot, n_recv, H, BF16)
        sc, rc = send_counts.astype(np.int32), recv_counts.astype(np.int32)
        sd, rd = displacements(sc), displacements(rc)
        requests = [self.comm.Ialltoallv([send.view(np.uint16), (sc, sd), self.row_type],
                                         [recv.view(np.uint16), (rc, rd), self.row_type])]
        result = (recv,)
        if extra is not None:
            xs = self._buffer(f"{tag}-xsend", slot, extra.shape[0], 0, np.int32)
            xs[...] = extra
            xr = self._buffer(f"{tag}-xrecv", slot, n_recv, 0, np.int32)
            requests.append(self.comm.Ialltoallv([xs, (sc, sd), self.index_type],
                                                 [xr, (rc, rd), self.index_type]))
            result = (recv, xr)
        self.bytes_sent += int(sc.sum()) * H * 2
        return Handle(requests, result)

    def post_dispatch(self, slot: int, rows, expert_ids, send_counts, recv_counts) -> Handle:
        """rows: [n, H] bf16 grouped by destination rank; expert_ids: [n] int32.
        wait() -> (recv_rows [r, H] bf16, recv_expert_ids [r] int32), grouped by source rank."""
        return self._post("dispatch", slot, rows, send_counts, recv_counts, extra=expert_ids)

    def post_combine(self, slot: int, rows, send_counts, recv_counts) -> Handle:
        """Send expert outputs back in the order they arrived (the inverse exchange).
        wait() -> (rows [n, H] bf16,) in the dispatch's send order."""
        return self._post("combine", slot, rows, send_counts, recv_counts)


__all__ = ["Exchange", "Handle", "displacements"]
