"""The one array-module seam: model code is written once against ``xp`` (NumPy or CuPy).

Every product follows the SPEC precision rule: bf16 operands, fp32 accumulation,
one rounding back to bf16.  On the CPU streams and events are no-ops, so the engine's schedule
is the same code on both devices.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from ..config.errors import ConfigError
from .dtypes import BF16, F32


@dataclass(frozen=True)
class Backend:
    """Array module plus the few device operations the engine needs."""
    name: str                 # "cpu" | "gpu"
    xp: ModuleType            # numpy or cupy

    def asarray(self, host_array):
        return self.xp.asarray(host_array)

    def to_host(self, array) -> np.ndarray:
        return array if self.xp is np else self.xp.asnumpy(array)

    @property
    def weight_dtype(self) -> np.dtype:
        """How bf16 weights are held: as fp32 copies of their exact bf16 values on the CPU, so
        BLAS needs no per-call upcast; as bf16 on the GPU, where cuBLAS takes them directly."""
        return F32 if self.xp is np else BF16

    def device_name(self) -> str:
        """What CUDA calls this rank's GPU ("NVIDIA H100 80GB HBM3"), or "cpu"."""
        if self.xp is np:
            return "cpu"
        return self.xp.cuda.runtime.getDeviceProperties(self.xp.cuda.Device().id)["name"].decode()

    # Streams and events exist on the GPU only; the CPU code paths never call these.
    def new_stream(self, high_priority: bool = False):
        """A stream that never waits on the legacy default stream. Communication streams take the
        device's highest priority: the block scheduler then starts their (few, short) kernels
        between the CTAs of a running GEMM instead of after it, which is what lets a transfer
        overlap the expert GEMMs at all."""
        # CUDA clamps a priority outside the device's range to the nearest end: -1000 is "highest"
        if high_priority:
            return self.xp.cuda.Stream(non_blocking=True, priority=-1000)
        return self.xp.cuda.Stream(non_blocking=True)

    def current_stream(self):
        return self.xp.cuda.get_current_stream()

    def record(self, stream=None):
        """An event marking all work queued so far on ``stream`` (default: the current one)."""
        event = self.xp.cuda.Event(disable_timing=True)
        event.record(stream or self.current_stream())
        return event


def cupy_or_none():
    try:
        import cupy
        cupy.cuda.runtime.getDeviceCount()
        return cupy
    except Exception:  # no CuPy, no driver or no GPU: all mean "not available"
        return None


def make_backend(device: str, local_rank: int = 0, memory_limit_gib: float = 0.0) -> Backend:
    """Pick NumPy or CuPy for ``run.device`` (cpu | gpu | auto) and bind this rank's GPU.

    local_rank: this rank's index among the ranks of its node (MPI's shared-memory
    communicator). Not SLURM_LOCALID: under mpiexec inside an allocation every rank of a node
    inherits its proxy's SLURM_LOCALID (0), and under srun the two agree.
    memory_limit_gib: ``run.memory_limit_gib``; > 0 caps CuPy's pool on the GPU
    (``cap_memory_pool``).
    """
    if device == "cpu":
        return Backend("cpu", np)
    cupy = cupy_or_none()
    if cupy is None:
        if device == "gpu":
            raise ConfigError("run.device = 'gpu' but CuPy or a CUDA GPU is not available "
                              "(install the [gpu] extra, or use run.device = 'cpu')")
        return Backend("cpu", np)
    ngpu = cupy.cuda.runtime.getDeviceCount()
    cupy.cuda.Device(local_rank % ngpu).use()
    if memory_limit_gib > 0:
        cap_memory_pool(cupy, int(memory_limit_gib * 2 ** 30))
    return Backend("gpu", cupy)


def cap_memory_pool(cupy, limit_bytes: int) -> None:
    """Hold CuPy's device pool to ``limit_bytes`` (on a GPU shared with other jobs, or to prove a
    run fits a smaller GPU). CuPy refuses an allocation past its limit at once, without first
    handing its cached free blocks back; freed blocks of other sizes (and those cached per
    stream) would then fail a run whose live arrays fit. So an allocation refused at the limit
    frees the cached blocks and tries once more: the pool stays under the limit and a run that
    fits runs, paying a device synchronisation only when it touches the limit. Blocks split for
    smaller arrays stay cached until whole again, so a fragmented pool can still refuse; and
    memory outside this pool (the decode graphs' own pool, cuBLAS, cuDNN and NCCL workspaces,
    the CUDA context) is not counted."""
    pool = cupy.get_default_memory_pool()
    pool.set_limit(size=limit_bytes)

    def malloc(size: int):
        try:
            return pool.malloc(size)
        except cupy.cuda.memory.OutOfMemoryError:
            pool.free_all_blocks()
            return pool.malloc(size)
    cupy.cuda.set_allocator(malloc)


def free_memory_bytes(backend: Backend) -> int | None:
    """Bytes this rank's device can still allocate: CUDA's free memory plus what CuPy's pool
    holds unused; None on the CPU (no limit known)."""
    if backend.name != "gpu":
        return None
    free, _ = backend.xp.cuda.runtime.memGetInfo()
    return int(free) + int(backend.xp.get_default_memory_pool().free_bytes())


def words(array):
    """The raw 16-bit words of a bf16 (or uint16) array: copies, MPI and NCCL need no bf16 type."""
    return array.view(np.uint16)


def matmul_bf16(a, b, xp=np):
    """[..., K] @ [K, N] with bf16 operands, fp32 accumulation, bf16 result.

    NumPy has no bf16 GEMM: upcast (exact), fp32 BLAS, one rounding. cuBLAS takes bf16 directly
    and accumulates in fp32.
    """
    if xp is np:
        return np.matmul(a.astype(F32, copy=False), b.astype(F32, copy=False)).astype(BF16)
    # one GEMM over the folded leading axes (CuPy's own matmul sends batched bf16 products down
    # an integer path, and refuses cuBLAS inside a captured graph: kernels_cuda.gemm does neither)
    from .kernels_cuda import gemm
    return gemm(a.reshape(-1, a.shape[-1]), b).reshape(*a.shape[:-1], b.shape[-1])


def cudnn_frontend_present() -> bool:
    """Whether cuDNN's Python frontend (the fused attention core) is installed: found, not
    loaded, so it costs no GPU work (``model.attention.choose_attention`` loads it)."""
    return importlib.util.find_spec("cudnn") is not None


__all__ = ["Backend", "words", "make_backend", "matmul_bf16", "cudnn_frontend_present"]
