"""Token exchange between ranks: counts first, then rows, through one of three transports.

Layouts.  A micro-batch's traffic is described by a count matrix ``counts[p, e]``: rows for
(peer p, expert e).  The sender packs its rows peer-major (then expert), the receiver wants
them expert-major (then source peer), so each local expert's rows are one contiguous block its
GEMM can read in place; ``Layout`` turns counts into those row offsets.  The combine is the same
exchange with the two layouts swapped.

Transports (``run.transport``):
- ``mpi``: ``Ialltoallv`` on the buffers themselves (host memory on the CPU backend; device
  memory when the MPI is CUDA-aware);
- ``mpi-staged``: device -> pinned host copies on the exchange stream, ``Ialltoallv`` on host
  memory, host -> device copies back;
- ``nccl``: grouped NCCL send/recv, one per (peer, expert) block, so rows land expert-major
  with no extra copy.
MPI transports receive peer-major and scatter to expert-major on the exchange stream.  While
a GPU rank waits for device work before posting, it polls ``Testall`` on the exchanges in
flight, so non-blocking MPI transfers keep moving (MPI has no progress of its own here).

The Exchange owns every buffer (two slots per direction, so one micro-batch travels while the
next is packed and the previous is combined) and returns handles: ``post`` starts a transfer,
``Handle.wait()`` makes the compute stream (or the host) wait for it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .backend import BF16, Backend, words
from .config import TRANSPORTS
from .kernels import put_rows, take_rows
from .errors import ConfigError


def displacements(counts: np.ndarray) -> np.ndarray:
    """Exclusive prefix sum: where each block starts."""
    out = np.zeros_like(counts)
    np.cumsum(counts[:-1], out=out[1:])
    return out


@dataclass(frozen=True)
class Layout:
    """Row offsets of every (peer, expert) block in a buffer. counts, offsets: [P, E] int64;
    extent: rows the buffer spans (more than the rows moved when blocks are padded)."""
    counts: np.ndarray
    offsets: np.ndarray
    extent: int

    @property
    def rows(self) -> int:
        return int(self.counts.sum())

    @property
    def per_peer(self) -> np.ndarray:
        return self.counts.sum(axis=1)

    def peer_major_scatter(self) -> np.ndarray | None:
        """Row index in this layout of each row received peer-major (peer, then expert), or None
        when the two orders coincide and no scatter is needed."""
        c = self.counts.reshape(-1)
        starts = self.offsets.reshape(-1)[c > 0]
        c = c[c > 0]
        index = np.repeat(starts - displacements(c), c) + np.arange(int(c.sum()))
        return None if (index == np.arange(index.size)).all() else index


def peer_major(counts: np.ndarray) -> Layout:
    """Sender's order: all rows for peer 0 (by expert), then peer 1, ..."""
    return Layout(counts, displacements(counts.reshape(-1)).reshape(counts.shape), int(counts.sum()))


def expert_slots(counts: np.ndarray, slot_of_expert: np.ndarray, capacity: int) -> Layout:
    """Receiver's order for grouped GEMMs: local expert slot s owns rows [s*C, s*C + n_s), its
    sources one after another; the rest of each slot is padding that is computed, never sent.

    counts: [P, E]; slot_of_expert: [E] slot of each hosted expert (-1 elsewhere); C = capacity.
    """
    within = np.zeros_like(counts)
    np.cumsum(counts[:-1], axis=0, out=within[1:])
    offsets = np.where(slot_of_expert[None, :] >= 0, slot_of_expert[None, :] * capacity + within, 0)
    slots = int((slot_of_expert >= 0).sum())
    return Layout(counts, offsets.astype(np.int64), slots * capacity)


def slot_capacity(counts: np.ndarray, multiple: int = 8) -> int:
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

    def __init__(self, comm, hidden_size: int, backend: Backend, transport: str = "auto",
                 cuda_aware: str = "auto"):
        self.comm, self.backend, self.xp = comm, backend, backend.xp
        self.hidden_size = hidden_size
        self.transport = make_transport(transport, comm, hidden_size, backend, cuda_aware)
        self._buffers: dict = {}

    @property
    def transport_name(self) -> str:
        return self.transport.name

    def buffer(self, name: str, slot: int, rows: int, width: int | None = None):
        """A reusable [rows, width] bf16 buffer; grows by half again when too small."""
        width = width or self.hidden_size
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

    def post(self, send, send_layout: Layout, recv, recv_layout: Layout) -> Handle:
        """Start moving ``send`` rows (in ``send_layout``) into ``recv`` (in ``recv_layout``).
        On the GPU the send rows must have been written on the current stream."""
        return Handle(self.transport, self.transport.start(send, send_layout, recv, recv_layout), recv)

    def close(self) -> None:
        self.transport.close()


# ------------------------------------------------------------------------------ transports

def make_transport(kind: str, comm, hidden_size: int, backend: Backend, cuda_aware: str = "auto"):
    """``run.transport`` -> a transport object (all ranks call this together)."""
    if kind not in TRANSPORTS:
        raise ConfigError(f"run.transport must be one of {', '.join(TRANSPORTS)}, got {kind!r}")
    if backend.name == "cpu":
        if kind not in ("auto", "mpi"):
            raise ConfigError(f"run.transport = {kind!r} needs the GPU backend (run.device = 'gpu')")
        return MpiTransport(comm, hidden_size, backend, staged=False)
    aware = mpi_is_cuda_aware() if cuda_aware == "auto" else cuda_aware == "yes"
    if kind == "auto":
        kind = "nccl" if nccl_available() else ("mpi" if aware else "mpi-staged")
    if kind == "nccl":
        from .transport_nccl import NcclTransport
        return NcclTransport(comm, hidden_size, backend)
    if kind == "mpi" and not aware:
        raise ConfigError("run.transport = 'mpi' on the GPU needs a CUDA-aware MPI, and this one "
                          "does not report CUDA support; use 'mpi-staged' or 'nccl', or set "
                          "run.cuda_aware_mpi = 'yes' if you know better")
    return MpiTransport(comm, hidden_size, backend, staged=(kind == "mpi-staged"))


def mpi_is_cuda_aware() -> bool:
    """Whether the MPI takes device buffers. Detection is unreliable across MPIs, hence the
    ``run.cuda_aware_mpi`` override; here: mpi4py's query where it has one, Open MPI's build
    flag (ompi_info), and the GPU switches of Cray MPICH and MVAPICH2."""
    import os
    import subprocess
    from mpi4py import MPI
    query = getattr(MPI, "Query_cuda_support", None)
    if query is not None:
        try:
            return bool(query())
        except Exception:
            pass
    if os.environ.get("MPICH_GPU_SUPPORT_ENABLED") == "1" or os.environ.get("MV2_USE_CUDA") == "1":
        return True
    if "Open MPI" in MPI.Get_library_version():
        try:
            info = subprocess.run(["ompi_info", "--parsable", "--all"], capture_output=True, text=True,
                                  timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return False
        return "mpi_built_with_cuda_support:value:true" in info
    return False


def nccl_available() -> bool:
    try:
        from cupy.cuda import nccl
        return nccl.available if hasattr(nccl, "available") else True
    except Exception:
        return False


class MpiTransport:
    """``Ialltoallv`` in a contiguous MPI datatype of H 16-bit words (counts are in rows, far
    below MPI's 2^31 limit).  Host buffers on the CPU; on the GPU either device buffers
    (CUDA-aware MPI) or pinned host staging (``staged``)."""

    def __init__(self, comm, hidden_size: int, backend: Backend, staged: bool):
        from mpi4py import MPI
        self.MPI, self.comm, self.backend, self.xp = MPI, comm, backend, backend.xp
        self.on_gpu = backend.name == "gpu"
        self.staged = staged and self.on_gpu
        self.name = "mpi-staged" if self.staged else "mpi"
        self.row_type = MPI.UINT16_T.Create_contiguous(hidden_size).Commit()
        self.hidden_size = hidden_size
        self.in_flight: list = []
        self._host: dict = {}
        self.stream = backend.new_stream() if self.on_gpu else None

    def _pinned(self, device_buffer, rows: int) -> np.ndarray:
        """Pinned host twin of one device buffer (keyed by its address, so the two slots of each
        direction never share a staging area)."""
        key = device_buffer.data.ptr
        buf = self._host.get(key)
        if buf is None or buf.shape[0] < rows:
            import cupyx
            buf = cupyx.empty_pinned((max(rows, 1), self.hidden_size), dtype=np.uint16)
            self._host[key] = buf
        return buf[:rows]

    def _progress_until(self, event) -> None:
        """Block until GPU ``event`` has happened, driving the MPI transfers in flight meanwhile."""
        while not event.done:
            if self.in_flight:
                self.MPI.Request.Testall(self.in_flight)

    def start(self, send, send_layout: Layout, recv, recv_layout: Layout) -> dict:
        # MPI moves one contiguous block per peer: gather an expert-major send buffer into
        # peer order first, and receive peer order into a landing area to scatter afterwards.
        gather, scatter = send_layout.peer_major_scatter(), recv_layout.peer_major_scatter()
        n_send, n_recv = send_layout.rows, recv_layout.rows
        src, target = (send[:n_send] if gather is None else send), recv
        if self.on_gpu:
            self.stream.wait_event(self.backend.record())         # the send rows are written
            with self.stream:
                if gather is not None:
                    src = take_rows(src, self.xp.asarray(gather))
                if self.staged:
                    host = self._pinned(send, n_send)
                    _d2h(self.xp, src, host, self.stream)
                    src, target = host, self._pinned(recv, n_recv)
                elif scatter is not None:
                    target = self.xp.empty_like(recv[:n_recv])
            self._progress_until(self.backend.record(self.stream))
        else:
            if gather is not None:
                src = src[gather]
            if scatter is not None:
                target = np.empty_like(recv[:n_recv])
        sc, rc = send_layout.per_peer.astype(np.int32), recv_layout.per_peer.astype(np.int32)
        spec = lambda buf, counts: [words(buf), (counts, displacements(counts)), self.row_type]
        request = self.comm.Ialltoallv(spec(src, sc), spec(target, rc))
        self.in_flight.append(request)
        # keep the gathered copy alive until the transfer is done
        return {"request": request, "src": src, "target": target, "recv": recv, "scatter": scatter,
                "rows": n_recv}

    def finish(self, state: dict) -> None:
        request = state["request"]
        request.Wait()
        self.in_flight.remove(request)
        target, recv, scatter, n = state["target"], state["recv"], state["scatter"], state["rows"]
        if not self.on_gpu:
            if scatter is not None:
                recv[scatter] = target
            return
        with self.stream:
            if self.staged:
                landing = recv[:n] if scatter is None else self.xp.empty_like(recv[:n])
                _h2d(self.xp, target, landing, self.stream)
                target = landing
            if scatter is not None:
                put_rows(recv, self.xp.asarray(scatter), target)
        self.backend.current_stream().wait_event(self.backend.record(self.stream))

    def close(self) -> None:
        self.row_type.Free()


def _d2h(xp, device_rows, host_rows, stream) -> None:
    if device_rows.shape[0]:
        xp.cuda.runtime.memcpyAsync(host_rows.ctypes.data, device_rows.data.ptr, device_rows.nbytes,
                                    xp.cuda.runtime.memcpyDeviceToHost, stream.ptr)


def _h2d(xp, host_rows, device_rows, stream) -> None:
    if host_rows.shape[0]:
        xp.cuda.runtime.memcpyAsync(device_rows.data.ptr, host_rows.ctypes.data, host_rows.nbytes,
                                    xp.cuda.runtime.memcpyHostToDevice, stream.ptr)


__all__ = ["Exchange", "Handle", "Layout", "peer_major", "expert_slots",
           "slot_capacity", "displacements",
           "make_transport", "TRANSPORTS"]
