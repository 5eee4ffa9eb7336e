"""Routing traces (``moe_hpc.trace/1``): what the gate chose, counted, per MoE layer.

A trace is a value (``Trace``) written to one HDF5 file:

| dataset | shape | meaning |
| --- | --- | --- |
| `source_ranks` | [S] int64 | world ranks that routed tokens (the dense ranks) |
| `source_expert` | [M, S, E] int64 | (token, choice) pairs from source rank s to expert e |
| `expert_tokens` | [M, E] int64 | tokens per expert: `source_expert` summed over sources |
| `coactivation` | [M, E, E] int64 | tokens that chose both e and f (symmetric, zero diagonal) |
| `window_tokens` | [W, M, E] int64 | tokens per expert in each time window (a run: a chunk) |

Root attributes: `format`, `config` (JSON of the model table), `world_size`.

``TraceRecorder`` fills one from a run (``moe-hpc run --trace``); ``tracegen`` makes synthetic
ones for scales no machine here has.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ..config.errors import ConfigError, InputError
from ..config.run_config import ModelConfig, model_from_json
from ..device.kernels import choice_counts
from ..files.atomic import atomic_path
from ..files.h5 import check_format, open_h5

TRACE_FORMAT = "moe_hpc.trace/1"


@dataclass(frozen=True)
class Trace:
    """source_ranks [S]; source_expert [M, S, E]; coactivation [M, E, E]; window_tokens
    [W, M, E]; all int64 counts. ``model`` is the model the trace was taken with."""
    model: ModelConfig
    world_size: int
    source_ranks: np.ndarray
    source_expert: np.ndarray
    coactivation: np.ndarray
    window_tokens: np.ndarray

    @property
    def expert_tokens(self) -> np.ndarray:
        """[M, E] tokens per expert."""
        return self.source_expert.sum(axis=1)


def pair_counts(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """experts: [T, k] distinct choices per token -> [E, E] tokens that chose both e and f
    (symmetric: each unordered pair of one token's choices counted both ways)."""
    E, k = num_experts, experts.shape[1]
    out = np.zeros((E, E), np.int64)
    for a in range(k):
        for b in range(a + 1, k):
            out += choice_counts(experts[:, a] * E + experts[:, b], E * E).reshape(E, E)
    return out + out.T


def write_trace(path: str | Path, trace: Trace) -> None:
    """Write the trace whole or not at all (``files/atomic.py``)."""
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = TRACE_FORMAT
            f.attrs["config"] = trace.model.to_json()
            f.attrs["world_size"] = trace.world_size
            f.create_dataset("source_ranks", data=trace.source_ranks.astype(np.int64))
            for name in ("source_expert", "coactivation", "window_tokens"):
                f.create_dataset(name, data=getattr(trace, name).astype(np.int64), compression="gzip")
            f.create_dataset("expert_tokens", data=trace.expert_tokens.astype(np.int64))


def _counts(f: h5py.File, name: str, shape: tuple, where: str) -> np.ndarray:
    """A non-negative integer dataset of exactly ``shape`` (None: any length on that axis)."""
    if name not in f or not isinstance(f[name], h5py.Dataset):
        raise InputError(f"{where}: /{name}: missing dataset")
    dset = f[name]
    if len(dset.shape) != len(shape) or any(a is not None and a != b for a, b in zip(shape, dset.shape)):
        want = "x".join("*" if a is None else str(a) for a in shape)
        raise InputError(f"{where}: /{name}: shape {dset.shape}, expected [{want}] from the model")
    if dset.dtype.kind not in "iu":
        raise InputError(f"{where}: /{name}: dtype {dset.dtype} is not an integer type")
    try:
        data = np.asarray(dset[()], dtype=np.int64)
    except (OSError, ValueError) as exc:
        raise InputError(f"{where}: /{name}: cannot read data ({exc})") from None
    if (data < 0).any():
        raise InputError(f"{where}: /{name}: negative counts")
    return data


def _model_of(f: h5py.File, where: str) -> ModelConfig:
    raw = f.attrs.get("config")
    if raw is None:
        raise InputError(f"{where}: missing root attribute 'config' (JSON of the model table)")
    try:
        return model_from_json(raw.decode() if isinstance(raw, bytes) else str(raw), where)
    except ConfigError as exc:
        raise InputError(str(exc)) from None


def check_trace_model(trace: Trace, model: ModelConfig, where: str) -> None:
    """The trace must come from a model with the run's MoE shape."""
    for key in ("num_layers", "first_dense_layers", "num_experts", "top_k"):
        ours, theirs = getattr(model, key), getattr(trace.model, key)
        if ours != theirs:
            raise InputError(f"{where}: trace has model.{key} = {theirs} but the config has {ours}")


def read_trace(path: str | Path, model: ModelConfig | None = None) -> Trace:
    """Open and validate a trace; with ``model``, also check it matches that model's shape."""
    where = str(path)
    with open_h5(path, "trace") as f:
        check_format(f, TRACE_FORMAT, where)
        traced = _model_of(f, where)
        world = f.attrs.get("world_size")
        if not isinstance(world, (int, np.integer)) or world < 1:
            raise InputError(f"{where}: root attribute world_size must be a positive integer, got {world!r}")
        M, E = traced.num_moe_layers, traced.num_experts
        ranks = _counts(f, "source_ranks", (None,), where)
        S = ranks.shape[0]
        trace = Trace(traced, int(world), ranks, _counts(f, "source_expert", (M, S, E), where),
                      _counts(f, "coactivation", (M, E, E), where),
                      _counts(f, "window_tokens", (None, M, E), where))
        if not np.array_equal(_counts(f, "expert_tokens", (M, E), where), trace.expert_tokens):
            raise InputError(f"{where}: /expert_tokens does not equal /source_expert summed over sources")
    if S == 0 or len(set(ranks.tolist())) != S or ranks.max() >= world:
        raise InputError(f"{where}: /source_ranks must be distinct ranks below world_size = {world}")
    if model is not None:
        check_trace_model(trace, model, where)
    return trace


class TraceRecorder:
    """One rank's counts during a run; ``gather`` joins them on rank 0 at the end.

    A window is one pass over the MoE blocks (a chunk): every rank steps through the same
    chunks, so window w means the same stretch of the run on every rank.
    """

    def __init__(self, model: ModelConfig):
        self.model = model
        M, E = model.num_moe_layers, model.num_experts
        self.own = np.zeros((M, E), np.int64)           # this rank as a source
        self.coactivation = np.zeros((M, E, E), np.int64)
        self.windows: list[np.ndarray] = []

    def record(self, layer: int, experts: np.ndarray) -> None:
        """experts: [T, k] chosen experts of this rank's tokens in block ``layer`` (T may be 0)."""
        m, E = layer - self.model.first_dense_layers, self.model.num_experts
        if m == 0:
            self.windows.append(np.zeros_like(self.own))
        counts = choice_counts(experts, E)
        self.own[m] += counts
        self.windows[-1][m] += counts
        self.coactivation[m] += pair_counts(experts, E)

    def gather(self, world, source_ranks: tuple[int, ...]) -> Trace | None:
        """Collective over ``world``: the whole run's trace on rank 0 (None elsewhere)."""
        rank, size = world.Get_rank(), world.Get_size()
        rows = np.empty((size,) + self.own.shape, np.int64) if rank == 0 else None
        world.Gather(self.own, rows, root=0)
        coact = np.zeros_like(self.coactivation)
        world.Reduce(self.coactivation, coact, root=0)
        windows = np.stack(self.windows) if self.windows else np.zeros((0,) + self.own.shape, np.int64)
        summed = np.zeros_like(windows)
        world.Reduce(windows, summed, root=0)
        if rank != 0:
            return None
        ranks = np.asarray(source_ranks, np.int64)
        return Trace(self.model, size, ranks, rows[ranks].transpose(1, 0, 2).copy(), coact, summed)


__all__ = ["Trace", "TraceRecorder", "pair_counts", "read_trace", "write_trace", "check_trace_model",
           "TRACE_FORMAT"]
