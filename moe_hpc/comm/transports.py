"""The wires under the exchange (``run.transport``), all with the same ``start``/``finish`` pair:

- ``mpi``: ``Ialltoallv`` on the buffers themselves (host memory on the CPU backend; device
  memory when the MPI is CUDA-aware);
- ``mpi-staged``: device -> pinned host copies on the exchange stream, ``Ialltoallv`` on host
  memory, host -> device copies back;
- ``nccl`` (``nccl.py``): grouped NCCL send/recv, one per peer, and one block permute on each
  side between peer order and the expert slots;
- ``ipc`` (``ipc.py``): rows written straight into the peers' receive slots through GPU memory
  mapped with CUDA IPC (intranode only), no permute on either side.

MPI transports receive peer-major and scatter to slot-major on the exchange stream.  While a
GPU rank waits for device work before posting, it polls ``Testall`` on the exchanges in flight,
so non-blocking MPI transfers keep moving (MPI has no progress of its own here).
"""
from __future__ import annotations

import numpy as np

from ..config.errors import ConfigError
from ..config.run_config import TRANSPORTS
from ..device.backend import Backend, words
from ..device.kernels import put_rows, take_rows
from .exchange import RowLayout, displacements


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
        from .nccl import NcclTransport
        return NcclTransport(comm, hidden_size, backend)
    if kind == "ipc":
        from .ipc import IpcTransport
        return IpcTransport(comm, hidden_size, backend)
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
        self.stream = backend.new_stream(high_priority=True) if self.on_gpu else None

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

    def prepare(self, pairs) -> list:
        return [None] * len(pairs)          # MPI moves peer-major blocks; nothing to precompute

    def start(self, send, send_layout: RowLayout, recv, recv_layout: RowLayout, route=None) -> dict:
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


__all__ = ["make_transport", "MpiTransport", "mpi_is_cuda_aware", "nccl_available"]
