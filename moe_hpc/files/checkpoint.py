"""Checkpoints (``moe_hpc.checkpoint/1``): the dataset table, validation and reading.

Each rank reads only what its role needs: dense ranks the attention, norm, dense-MLP and gate
weights; expert ranks the slices ``experts/w1[e]`` ... of the experts they host.
"""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from ..config.errors import ConfigError, InputError
from ..config.run_config import ModelConfig, model_from_json
from ..device.dtypes import BF16
from ..model.weights import AttentionWeights, BlockWeights, Expert, GateWeights, MlpWeights, fuse_gate_up
from .h5 import check_format, open_h5, read_float

CHECKPOINT_FORMAT = "moe_hpc.checkpoint/1"
OPTIONAL = ("b1", "b2", "experts/b1", "experts/b2", "gate_bias")


def _mla_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Multi-head latent attention: q directly (wq) or through its latent (wq_a, q_a_norm, wq_b);
    k and v from one latent (wkv_a gives [latent | shared RoPE key], kv_a_norm, wkv_b gives each
    head's [k_nope | v]); wo reads the heads' values."""
    H, nh, D, R = m.hidden_size, m.num_heads, m.head_dim, m.kv_lora_rank
    shapes = {"attn_norm": (H,), "wkv_a": (H, R + m.qk_rope_head_dim), "kv_a_norm": (R,),
              "wkv_b": (R, nh * (D - m.qk_rope_head_dim + m.v_head_dim)), "wo": (nh * m.v_head_dim, H),
              "mlp_norm": (H,)}
    if m.q_lora_rank:
        shapes.update(wq_a=(H, m.q_lora_rank), q_a_norm=(m.q_lora_rank,), wq_b=(m.q_lora_rank, nh * D))
    else:
        shapes["wq"] = (H, nh * D)
    return shapes


def _attention_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    if m.mla:
        return _mla_shapes(m)
    H, D = m.hidden_size, m.head_dim
    Q, K = m.num_heads * D, m.kv_heads * D
    shapes = {"attn_norm": (H,), "wq": (H, Q), "wk": (H, K), "wv": (H, K), "wo": (Q, H), "mlp_norm": (H,)}
    if m.attention_bias:
        shapes.update(bq=(Q,), bk=(K,), bv=(K,))
    if m.qk_norm != "none":          # per head: one [D] weight for all heads; full: [Q] and [K]
        shapes.update(q_norm=(D,) if m.qk_norm == "head" else (Q,), k_norm=(D,) if m.qk_norm == "head" else (K,))
    return shapes


def _mlp_shapes(prefix: str, H: int, F: int, gated: bool, lead: tuple = ()) -> dict[str, tuple[int, ...]]:
    """One MLP's datasets: w1 [.., H, F], w2 [.., F, H], then w3 [.., H, F] (gated) or the
    optional biases b1 [.., F], b2 [.., H] (plain); ``lead`` is (E,) for a block's experts."""
    shapes = {f"{prefix}w1": lead + (H, F), f"{prefix}w2": lead + (F, H)}
    if gated:
        shapes[f"{prefix}w3"] = lead + (H, F)
    else:
        shapes.update({f"{prefix}b1": lead + (F,), f"{prefix}b2": lead + (H,)})
    return shapes


def layer_shapes(m: ModelConfig, layer: int) -> dict[str, tuple[int, ...]]:
    """Dataset name (relative to /layers/<l>/) -> shape, optional ones included."""
    H, gated = m.hidden_size, m.mlp == "gated"
    shapes = _attention_shapes(m)
    if not m.is_moe(layer):
        shapes.update(_mlp_shapes("", H, m.dense_ffn_hidden_size, gated))
        return shapes
    E = m.num_experts
    shapes.update({"gate": (H, E), "gate_bias": (E,)})
    shapes.update(_mlp_shapes("experts/", H, m.moe_ffn_hidden_size, gated, (E,)))
    if gated:                    # the experts' output bias is what the combine adds: keep it optional
        shapes["experts/b2"] = (E, H)
    if m.shared_expert_ffn_hidden_size:
        shapes.update(_mlp_shapes("shared/", H, m.shared_expert_ffn_hidden_size, gated))
        shapes = {k: v for k, v in shapes.items() if not k.startswith("shared/b")}
        if m.shared_expert_gate:
            shapes["shared_gate"] = (H,)
    return shapes


def global_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    shapes = {"final_norm": (m.hidden_size,)}
    if m.vocab_size:
        shapes["embed"] = (m.vocab_size, m.hidden_size)
        if not m.tie_embeddings:                 # tied: the head is embed transposed
            shapes["lm_head"] = (m.hidden_size, m.vocab_size)
    return shapes


class H5Tensors:
    """The tensors of a ``moe_hpc.checkpoint/1`` file, by dataset name."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open_h5(path, "weights")
        try:
            check_format(self.file, CHECKPOINT_FORMAT, str(path))
        except Exception:
            self.file.close()
            raise

    def where(self, name: str) -> str:
        return f"{self.path}: /{name}"

    def stored_model(self) -> ModelConfig:
        """The checkpoint's own model table (root attribute ``config``)."""
        if "config" not in self.file.attrs:
            raise InputError(f"{self.path}: missing root attribute 'config' (JSON of the model table)")
        raw = self.file.attrs["config"]
        try:
            return model_from_json(raw.decode() if isinstance(raw, bytes) else str(raw), str(self.path))
        except ConfigError as exc:
            raise InputError(str(exc)) from None

    def shape(self, name: str) -> tuple[int, ...] | None:
        """Shape of a dataset, None when absent."""
        if name not in self.file:
            return None
        dset = self.file[name]
        if not isinstance(dset, h5py.Dataset):
            raise InputError(f"{self.where(name)}: is a group, expected a dataset")
        return dset.shape

    def read(self, name: str, index=()) -> np.ndarray:
        """(A slice of) a dataset, bf16 (or wider) floats."""
        return read_float(self.file[name], self.where(name), index)

    def close(self) -> None:
        self.file.close()


def open_tensors(path: str | Path):
    """The tensors of a checkpoint: an HDF5 file, or a Hugging Face directory (hf_tensors)."""
    path = Path(path)
    if path.is_dir():
        from .hf_tensors import HFTensors
        return HFTensors(path)
    return H5Tensors(path)


class Checkpoint:
    """An open, validated checkpoint (HDF5 file or Hugging Face directory). A context manager."""

    def __init__(self, path: str | Path, model: ModelConfig):
        self.path = Path(path)
        self.tensors = open_tensors(self.path)
        try:
            check_models_match(self.tensors.stored_model(), model, str(self.path))
            self.model = model
            self._check_shapes()
        except Exception:
            self.tensors.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.tensors.close()

    def _present(self, name: str, shape: tuple[int, ...], optional: bool = False) -> bool:
        found = self.tensors.shape(name)
        if found is None:
            if optional:
                return False
            raise InputError(f"{self.tensors.where(name)}: missing dataset")
        if tuple(found) != shape:
            raise InputError(f"{self.tensors.where(name)}: shape {tuple(found)}, expected {shape} from the config")
        return True

    def _check_shapes(self) -> None:
        """Metadata only: every required dataset exists with the shape the config implies."""
        for name, shape in global_shapes(self.model).items():
            self._present(name, shape)
        for layer in range(self.model.num_layers):
            for name, shape in layer_shapes(self.model, layer).items():
                self._present(f"layers/{layer}/{name}", shape, optional=name in OPTIONAL)

    def _read(self, name: str, shape, optional=False, index=(), dtype=None, keep=False):
        """(A slice of) a dataset as bf16 values (in ``dtype`` if given), or fp32 with ``keep``."""
        if not self._present(name, shape, optional):
            return None
        array = self.tensors.read(name, index)
        if not np.isfinite(array.astype(np.float32)).all():
            raise InputError(f"{self.tensors.where(name)}: contains NaN or Inf")
        if keep:
            return array.astype(np.float32)
        array = array.astype(BF16, copy=False)           # the engine's weights are bf16 values
        return array if dtype is None else array.astype(dtype)

    def read_dense_layer(self, layer: int, dtype) -> BlockWeights:
        shapes = layer_shapes(self.model, layer)
        get = lambda n: self._read(f"layers/{layer}/{n}", shapes[n], n in OPTIONAL, dtype=dtype) \
            if n in shapes else None
        attention = AttentionWeights(**{n: get(n) for n in (
            "attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "bq", "bk", "bv", "q_norm", "k_norm", "wq_a", "q_a_norm",
            "wq_b", "wkv_a", "kv_a_norm", "wkv_b")})
        if not self.model.is_moe(layer):
            return BlockWeights(attention, mlp=MlpWeights(get("w1"), get("b1"), get("w2"), get("b2"), get("w3")))
        gate = get("gate")
        # selection offsets keep their stored precision (DeepSeek-V3's correction bias is fp32)
        gate_bias = self._read(f"layers/{layer}/gate_bias", shapes["gate_bias"], True, keep=True)
        return BlockWeights(attention, gate=GateWeights(gate, gate_bias, get("shared/w1"), get("shared/w3"),
                                                        get("shared/w2"), get("shared_gate")))

    def read_expert(self, layer: int, expert: int, dtype, shard: int = 0, shards: int = 1) -> Expert:
        """One expert, or its ``shard``-th of ``shards`` tensor-parallel pieces: w1 (and w3) and
        b1 by columns, w2 by rows, so the pieces' outputs summed over shards are the expert's.
        A gated expert's w1 comes back fused with its w3: [H, 2 F/shards]."""
        shapes = layer_shapes(self.model, layer)
        F = self.model.moe_ffn_hidden_size
        cols = slice(shard * F // shards, (shard + 1) * F // shards)
        index = {"w1": np.s_[expert, :, cols], "w3": np.s_[expert, :, cols], "b1": np.s_[expert, cols],
                 "w2": np.s_[expert, cols, :], "b2": np.s_[expert]}
        get = lambda n: self._read(f"layers/{layer}/experts/{n}", shapes[f"experts/{n}"], n.startswith("b"),
                                   index=index[n], dtype=dtype) if f"experts/{n}" in shapes else None
        return Expert(fuse_gate_up(get("w1"), get("w3")), get("b1"), get("w2"), get("b2"))

    def read_expert_b2(self, layer: int, dtype):
        """[E, H] output biases of every expert of a block (None when absent): small, and the
        combine on the dense rank adds them, so expert ranks send bias-free outputs."""
        return self._read(f"layers/{layer}/experts/b2", layer_shapes(self.model, layer)["experts/b2"],
                          optional=True, dtype=dtype)

    def read_global(self, name: str, dtype):
        """embed [V, H], final_norm [H] or lm_head [H, V] (embed transposed when tied)."""
        if name == "lm_head" and self.model.tie_embeddings:
            return np.ascontiguousarray(self.read_global("embed", dtype).T)
        return self._read(name, global_shapes(self.model)[name], dtype=dtype)


def check_models_match(stored: ModelConfig, model: ModelConfig, where: str) -> None:
    """The checkpoint's own model table must equal the run config's, key by key."""
    for key, value in vars(model).items():
        if key == "max_position_embeddings" and 0 in (value, stored.max_position_embeddings):
            continue      # a limit on the input, not the math: one side not knowing it is no mismatch
        ours, theirs = (value, getattr(stored, key)) if key != "num_kv_heads" else (model.kv_heads, stored.kv_heads)
        if ours != theirs:
            raise InputError(f"{where}: checkpoint has model.{key} = {theirs!r} but "
                             f"the run config has {ours!r}")


__all__ = ["Checkpoint", "H5Tensors", "open_tensors", "layer_shapes", "global_shapes", "check_models_match",
           "CHECKPOINT_FORMAT", "OPTIONAL"]
