"""Checkpoints (``moe_hpc.checkpoint/1``): the dataset table, validation and reading.

Each rank reads only what its role needs: dense ranks the attention, norm, dense-MLP and gate
weights; expert ranks the slices ``experts/w1[e]`` ... of the experts they host.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ..config.errors import ConfigError, InputError
from ..config.run_config import ModelConfig, model_from_json
from .h5 import check_format, open_h5, read_float

CHECKPOINT_FORMAT = "moe_hpc.checkpoint/1"
OPTIONAL = ("b1", "b2", "experts/b1", "experts/b2", "gate_bias")


def layer_shapes(m: ModelConfig, layer: int) -> dict[str, tuple[int, ...]]:
    """Dataset name (relative to /layers/<l>/) -> shape, optional ones included."""
    H, D = m.hidden_size, m.head_dim
    shapes = {"attn_norm": (H,), "wq": (H, m.num_heads * D), "wk": (H, m.kv_heads * D),
              "wv": (H, m.kv_heads * D), "wo": (m.num_heads * D, H), "mlp_norm": (H,)}
    if m.is_moe(layer):
        E, F = m.num_experts, m.moe_ffn_hidden_size
        shapes.update({"gate": (H, E), "gate_bias": (E,), "experts/w1": (E, H, F),
                       "experts/b1": (E, F), "experts/w2": (E, F, H), "experts/b2": (E, H)})
    else:
        Fd = m.dense_ffn_hidden_size
        shapes.update({"w1": (H, Fd), "b1": (Fd,), "w2": (Fd, H), "b2": (H,)})
    return shapes


def global_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    shapes = {"final_norm": (m.hidden_size,)}
    if m.vocab_size:
        shapes.update({"embed": (m.vocab_size, m.hidden_size), "lm_head": (m.hidden_size, m.vocab_size)})
    return shapes


@dataclass
class DenseLayer:
    """Weights of one block that a dense rank needs. Arrays bf16-valued (see Backend.weight_dtype)."""
    attn_norm: np.ndarray
    wq: np.ndarray
    wk: np.ndarray
    wv: np.ndarray
    wo: np.ndarray
    mlp_norm: np.ndarray
    w1: np.ndarray | None = None      # dense MLP
    b1: np.ndarray | None = None
    w2: np.ndarray | None = None
    b2: np.ndarray | None = None
    gate: np.ndarray | None = None    # MoE gate [H, E]
    gate_bias: np.ndarray | None = None   # [E] fp32 selection offsets (never weights)
    expert_b2: np.ndarray | None = None   # [E, H] the experts' output biases, added at the combine
    wqkv: np.ndarray | None = None    # [H, (nh + 2 kv) D] wq|wk|wv fused (GPU flash path; see fuse_qkv)


@dataclass
class Expert:
    """One expert MLP: w1 [H, F], b1 [F] | None, w2 [F, H], b2 [H] | None."""
    w1: np.ndarray
    b1: np.ndarray | None
    w2: np.ndarray
    b2: np.ndarray | None


class Checkpoint:
    """An open, validated checkpoint. Use as a context manager."""

    def __init__(self, path: str | Path, model: ModelConfig):
        self.path = Path(path)
        self.file = open_h5(self.path, "weights")
        try:
            check_format(self.file, CHECKPOINT_FORMAT, str(self.path))
            check_config_matches(self.file, model, str(self.path))
            self.model = model
            self._check_shapes()
        except Exception:
            self.file.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()

    def _dataset(self, name: str, shape: tuple[int, ...], optional: bool = False) -> h5py.Dataset | None:
        where = f"{self.path}: /{name}"
        if name not in self.file:
            if optional:
                return None
            raise InputError(f"{where}: missing dataset")
        dset = self.file[name]
        if not isinstance(dset, h5py.Dataset):
            raise InputError(f"{where}: is a group, expected a dataset")
        if dset.shape != shape:
            raise InputError(f"{where}: shape {dset.shape}, expected {shape} from the config")
        return dset

    def _check_shapes(self) -> None:
        """Metadata only: every required dataset exists with the shape the config implies."""
        for name, shape in global_shapes(self.model).items():
            self._dataset(name, shape)
        for layer in range(self.model.num_layers):
            for name, shape in layer_shapes(self.model, layer).items():
                self._dataset(f"layers/{layer}/{name}", shape, optional=name in OPTIONAL)

    def _read(self, name: str, shape, optional=False, index=(), dtype=None):
        dset = self._dataset(name, shape, optional)
        if dset is None:
            return None
        where = f"{self.path}: /{name}"
        array = read_float(dset, where, index)
        if not np.isfinite(array.astype(np.float32)).all():
            raise InputError(f"{where}: contains NaN or Inf")
        return array if dtype is None else array.astype(dtype)

    def read_dense_layer(self, layer: int, dtype) -> DenseLayer:
        shapes = layer_shapes(self.model, layer)
        get = lambda n: self._read(f"layers/{layer}/{n}", shapes[n], n in OPTIONAL, dtype=dtype)
        out = DenseLayer(**{n: get(n) for n in ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm")})
        if self.model.is_moe(layer):
            out.gate = get("gate")
            bias = get("gate_bias")
            out.gate_bias = None if bias is None else bias.astype(np.float32)
        else:
            out.w1, out.b1, out.w2, out.b2 = get("w1"), get("b1"), get("w2"), get("b2")
        return out

    def read_expert(self, layer: int, expert: int, dtype, shard: int = 0, shards: int = 1) -> Expert:
        """One expert, or its ``shard``-th of ``shards`` tensor-parallel pieces: w1 and b1 by
        columns, w2 by rows, so act(x @ w1_s + b1_s) @ w2_s summed over shards is the expert."""
        shapes = layer_shapes(self.model, layer)
        F = self.model.moe_ffn_hidden_size
        cols = slice(shard * F // shards, (shard + 1) * F // shards)
        index = {"w1": np.s_[expert, :, cols], "b1": np.s_[expert, cols], "w2": np.s_[expert, cols, :],
                 "b2": np.s_[expert]}
        get = lambda n: self._read(f"layers/{layer}/experts/{n}", shapes[f"experts/{n}"],
                                   n.startswith("b"), index=index[n], dtype=dtype)
        return Expert(get("w1"), get("b1"), get("w2"), get("b2"))

    def read_expert_b2(self, layer: int, dtype):
        """[E, H] output biases of every expert of a block (None when absent): small, and the
        combine on the dense rank adds them, so expert ranks send bias-free outputs."""
        return self._read(f"layers/{layer}/experts/b2", layer_shapes(self.model, layer)["experts/b2"],
                          optional=True, dtype=dtype)

    def read_global(self, name: str, dtype):
        return self._read(name, global_shapes(self.model)[name], dtype=dtype)


def check_config_matches(f: h5py.File, model: ModelConfig, where: str) -> None:
    """The checkpoint's own model table must equal the run config's, key by key."""
    if "config" not in f.attrs:
        raise InputError(f"{where}: missing root attribute 'config' (JSON of the model table)")
    raw = f.attrs["config"]
    try:
        stored = model_from_json(raw.decode() if isinstance(raw, bytes) else str(raw), where)
    except ConfigError as exc:
        raise InputError(str(exc)) from None
    for key, value in vars(model).items():
        ours, theirs = (value, getattr(stored, key)) if key != "num_kv_heads" else (model.kv_heads, stored.kv_heads)
        if ours != theirs:
            raise InputError(f"{where}: checkpoint has model.{key} = {theirs!r} but "
                             f"the run config has {ours!r}")


__all__ = ["Checkpoint", "DenseLayer", "Expert", "layer_shapes", "global_shapes",
           "check_config_matches", "CHECKPOINT_FORMAT"]
