"""A Hugging Face checkpoint directory read as the project's checkpoint datasets.

``config.json`` gives the model table (``config/hf.py``); the tensors live in ``*.safetensors``
shards, named in ``model.safetensors.index.json`` (or one ``model.safetensors``). They are read
through the ``safetensors`` package, which memory-maps each shard and hands bf16 to NumPy as
ml_dtypes' bfloat16, so a rank touches only the bytes of the tensors it asks for. Only headers
are read up front (shapes, for the checks); a truncated shard fails there, naming the shard.

Names: ``layers/3/wq`` is ``model.layers.3.self_attn.q_proj.weight`` transposed (HF stores
[out, in], the project [in, out]); ``layers/3/experts/w1`` [E, H, F] is the E tensors
``...experts.<e>.gate_proj.weight`` (Mixtral: ``block_sparse_moe.experts.<e>.w1.weight``),
of which a read takes only the expert in its index. Biases the families do not have (MLP biases,
gate_bias) are absent, which the checkpoint reads as zero.

DeepSeek-V3 adds its MLA projections, ``gate_bias`` (``e_score_correction_bias``) and
``shared_experts``; with ``rope_interleave`` the RoPE columns of q and of the shared RoPE key are
permuted (evens, then odds) as they are read, which turns the interleaved pairs into the
half-split layout the engine rotates (the scores are unchanged: q and k move alike). FP8 tensors
(float8 e4m3 with a ``weight_scale_inv`` per block) are dequantised to bf16 as they are read
(``fp8.py``); the multi-token-prediction block (layer ``num_hidden_layers``) is never read.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..config.errors import ConfigError, InputError
from ..config.hf import fp8_block, hf_model_table, read_hf_config, rope_interleave
from ..config.run_config import ModelConfig, build_table
from ..device.dtypes import BF16
from .fp8 import F8_DTYPE, dequantize, read_raw

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
FLOATS = {np.dtype(np.float32), np.dtype(np.float16), BF16}
# project name inside a block -> (HF name after "model.layers.<l>.", transposed)
ATTENTION = {"attn_norm": ("input_layernorm.weight", False), "mlp_norm": ("post_attention_layernorm.weight", False),
             "wq": ("self_attn.q_proj.weight", True), "wk": ("self_attn.k_proj.weight", True),
             "wv": ("self_attn.v_proj.weight", True), "wo": ("self_attn.o_proj.weight", True),
             "bq": ("self_attn.q_proj.bias", False), "bk": ("self_attn.k_proj.bias", False),
             "bv": ("self_attn.v_proj.bias", False), "q_norm": ("self_attn.q_norm.weight", False),
             "k_norm": ("self_attn.k_norm.weight", False)}
MLA = {"wq_a": ("self_attn.q_a_proj.weight", True), "q_a_norm": ("self_attn.q_a_layernorm.weight", False),
       "wq_b": ("self_attn.q_b_proj.weight", True), "wkv_a": ("self_attn.kv_a_proj_with_mqa.weight", True),
       "kv_a_norm": ("self_attn.kv_a_layernorm.weight", False), "wkv_b": ("self_attn.kv_b_proj.weight", True),
       "gate_bias": ("mlp.gate.e_score_correction_bias", False)}
PROJECTIONS = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
MIXTRAL_EXPERT = {"w1": "w1", "w3": "w3", "w2": "w2"}
GLOBALS = {"embed": ("model.embed_tokens.weight", False), "final_norm": ("model.norm.weight", False),
           "lm_head": ("lm_head.weight", True)}


def hf_name(name: str, family: str, expert: int | None = None) -> tuple[str, bool] | None:
    """Project dataset name (and expert, for ``experts/*``) -> (HF tensor name, transposed), or
    None for a dataset the family never has."""
    if name in GLOBALS:
        return GLOBALS[name]
    _, layer, rest = name.split("/", 2)
    block = f"model.layers.{layer}."
    moe = "block_sparse_moe" if family == "mixtral" else "mlp"
    if rest in ATTENTION:
        local, transposed = ATTENTION[rest]
        return block + local, transposed
    if family == "deepseek_v3" and rest in MLA:
        local, transposed = MLA[rest]
        return block + local, transposed
    if rest in PROJECTIONS:
        return f"{block}mlp.{PROJECTIONS[rest]}.weight", True
    if rest == "gate":
        return f"{block}{moe}.gate.weight", True
    if rest.startswith("experts/") and rest[8:] in PROJECTIONS:
        proj = (MIXTRAL_EXPERT if family == "mixtral" else PROJECTIONS)[rest[8:]]
        return f"{block}{moe}.experts.{expert}.{proj}.weight", True
    if rest.startswith("shared/") and rest[7:] in PROJECTIONS:
        shared = "shared_experts" if family == "deepseek_v3" else "shared_expert"
        return f"{block}mlp.{shared}.{PROJECTIONS[rest[7:]]}.weight", True
    if rest == "shared_gate":
        return f"{block}mlp.shared_expert_gate.weight", True       # [1, H] -> [H, 1] -> [H]
    return None


def _weight_map(folder: Path) -> dict[str, str]:
    """HF tensor name -> shard file name (each checked by ``_inside``)."""
    index = folder / INDEX
    if index.exists():
        try:
            weight_map = dict(json.loads(index.read_text())["weight_map"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{index}: not a readable safetensors index ({exc})") from None
        roots, checked = _allowed_roots(folder), set()
        for tensor, shard in weight_map.items():
            if not (isinstance(shard, str) and shard in checked):   # thousands of tensors, a few shards
                _inside(folder, shard, roots, f"{index}: weight_map[{tensor!r}]")
                checked.add(shard)
        return weight_map
    if not (folder / SINGLE).exists():
        raise InputError(f"{folder}: neither {INDEX} nor {SINGLE} (not a safetensors checkpoint)")
    _inside(folder, SINGLE, _allowed_roots(folder), f"{folder}: {SINGLE}")
    return {name: SINGLE for name in _open_shard(folder / SINGLE).keys()}


def _allowed_roots(folder: Path) -> list[Path]:
    """Where a shard of ``folder`` may really live: the folder itself, and for a Hugging Face
    hub-cache snapshot (``<repo>/snapshots/<rev>``, whose files are links into ``<repo>/blobs``)
    that repository's ``blobs`` folder."""
    real = folder.resolve()
    roots = [real]
    if real.parent.name == "snapshots" and (real.parent.parent / "blobs").is_dir():
        roots.append(real.parent.parent / "blobs")
    return roots


def _inside(folder: Path, shard, roots: list[Path], where: str) -> Path:
    """A shard entry -> its path; an InputError when it is not a relative name or resolves
    (through ``..`` or links) outside the checkpoint folder: an index is data, and may not make
    the reader open ``/etc/passwd`` or another checkpoint's file."""
    if not isinstance(shard, str) or not shard:
        raise InputError(f"{where}: shard {shard!r} is not a file name")
    path = folder / shard
    real = path.resolve()
    if Path(shard).is_absolute() or not any(real.is_relative_to(root) for root in roots):
        raise InputError(f"{where}: shard {shard!r} lies outside the checkpoint folder {folder} (refused)")
    return path


def _open_shard(path: Path):
    from safetensors import safe_open
    try:
        return safe_open(str(path), framework="numpy")
    except Exception as exc:          # SafetensorError or OSError: both mean "cannot use this file"
        raise InputError(f"{path}: not a readable safetensors file ({exc}); is it truncated?") from None


class HFTensors:
    """The project's checkpoint datasets, read from a Hugging Face directory (see module doc)."""

    def __init__(self, folder: Path):
        self.folder = folder
        try:
            table, self.family, self.config_path = hf_model_table(folder)
            self.model = build_table("model", table, self.config_path, ModelConfig)
        except ConfigError as exc:
            raise InputError(str(exc)) from None
        values, _ = read_hf_config(folder)
        self.interleaved, self.block = rope_interleave(values), fp8_block(values)
        self.weight_map = _weight_map(folder)
        self.shards = {file: _open_shard(folder / file) for file in sorted(set(self.weight_map.values()))}

    def stored_model(self) -> ModelConfig:
        return self.model

    def _experts(self, name: str) -> int:
        return self.model.num_experts if name.split("/")[2:3] == ["experts"] else 0

    def where(self, name: str) -> str:
        mapped = hf_name(name, self.family, 0 if self._experts(name) else None)
        tensor = "(no such tensor)" if mapped is None else mapped[0].replace(".experts.0.", ".experts.<e>.")
        return f"{self.folder}: tensor {tensor} (dataset /{name})"

    def _slice(self, tensor: str, name: str):
        if tensor not in self.weight_map:
            raise InputError(f"{self.folder}: missing tensor {tensor} (dataset /{name})")
        return self.shards[self.weight_map[tensor]].get_slice(tensor)

    def _shape_of(self, tensor: str, transposed: bool, name: str) -> tuple[int, ...]:
        shape = tuple(self._slice(tensor, name).get_shape())
        return shape[::-1] if transposed else shape

    def shape(self, name: str) -> tuple[int, ...] | None:
        """Shape as the project sees it ([in, out]; experts stacked), None when absent."""
        E = self._experts(name)
        mapped = hf_name(name, self.family, 0)
        if mapped is None or (not E and mapped[0] not in self.weight_map):
            return None
        if not E:
            shape = self._shape_of(*mapped, name)
            return (shape[0],) if name.endswith("shared_gate") and shape[1:] == (1,) else shape
        shapes = {self._shape_of(*hf_name(name, self.family, e), name) for e in range(E)}
        if len(shapes) > 1:
            raise InputError(f"{self.where(name)}: experts have different shapes {sorted(shapes)}")
        return (E,) + shapes.pop()

    def read(self, name: str, index=()) -> np.ndarray:
        """(A slice of) a dataset, in the tensor's own float dtype; ``experts/*`` reads only the
        expert ``index[0]``."""
        expert, rest = (index[0], index[1:]) if self._experts(name) else (None, index)
        tensor, transposed = hf_name(name, self.family, expert)
        array = self._tensor(tensor)
        if array.dtype == F8_DTYPE and self.block is not None:
            array = dequantize(array, self._tensor(tensor + "_scale_inv"), self.block)
        if array.dtype not in FLOATS:
            raise InputError(f"{self.folder}: tensor {tensor}: dtype {array.dtype} is not supported "
                             "(bfloat16, float16, float32; float8_e4m3fn with block scales)")
        array = array.T if transposed else array
        if name.endswith("shared_gate"):
            array = array.reshape(-1)
        if self.interleaved:
            array = self._deinterleave(name.rsplit("/", 1)[-1], array)
        return array[rest]

    def _tensor(self, tensor: str) -> np.ndarray:
        """One whole tensor of a shard as NumPy (float8 through our own reader: safetensors'
        NumPy side has no float8 type)."""
        if tensor not in self.weight_map:
            raise InputError(f"{self.folder}: missing tensor {tensor}")
        shard = self.shards[self.weight_map[tensor]]
        try:
            if shard.get_slice(tensor).get_dtype() == "F8_E4M3":
                return read_raw(self.folder / self.weight_map[tensor], tensor)
            return shard.get_tensor(tensor)
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"{self.folder}: tensor {tensor}: cannot read data ({exc})") from None

    def _deinterleave(self, short: str, array: np.ndarray) -> np.ndarray:
        """The RoPE columns of q (each head's last rope dims) and of wkv_a (its last rope
        columns) from pairs (x0, x1), (x2, x3) ... to halves [x0, x2, ... | x1, x3, ...]."""
        m = self.model
        R = m.qk_rope_head_dim
        order = np.concatenate([np.arange(0, R, 2), np.arange(1, R, 2)])
        if short in ("wq", "wq_b"):
            heads = array.reshape(array.shape[0], m.num_heads, m.head_dim)
            heads = np.concatenate([heads[..., :-R], heads[..., -R:][..., order]], axis=-1)
            return heads.reshape(array.shape)
        if short == "wkv_a":
            return np.concatenate([array[:, :-R], array[:, -R:][:, order]], axis=1)
        return array

    def close(self) -> None:
        self.shards = {}


__all__ = ["HFTensors", "hf_name", "INDEX", "SINGLE"]
