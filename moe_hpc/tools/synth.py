"""Synthetic checkpoints and input batches (``moe-hpc init-weights`` / ``make-inputs``).

Weights are drawn with scales that keep activations O(1) through every block of a pre-norm
stack: projections ~ N(0, 1/fan_in), output projections further damped by 1/sqrt(2 * layers)
so the residual stream grows slowly, gate logits with unit spread so routing is neither uniform
nor degenerate.  Files are written one layer (and one expert) at a time, so a checkpoint larger
than memory can be made; both go to a temporary name and are renamed when complete.
"""
from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np

from ..config.errors import ConfigError, OutputError
from ..config.run_config import ModelConfig
from ..device.dtypes import BF16
from ..files.atomic import atomic_path, check_output
from ..files.batches import INPUT_FORMAT
from ..files.checkpoint import CHECKPOINT_FORMAT, global_shapes, layer_shapes
from ..files.h5 import write_float


def _normal(rng, shape, std):
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(BF16)


def _norm_weight(rng, n):
    return (1.0 + 0.1 * rng.standard_normal(n, dtype=np.float32)).astype(BF16)


def _layer_arrays(m: ModelConfig, layer: int, rng):
    """Yield (name, array) for one block; experts one at a time to bound memory."""
    shapes = layer_shapes(m, layer)
    H = m.hidden_size
    resid = 1.0 / math.sqrt(2.0 * m.num_layers)
    yield "attn_norm", _norm_weight(rng, H)
    for name in ("wq", "wk", "wv"):
        yield name, _normal(rng, shapes[name], 1.0 / math.sqrt(H))
    yield "wo", _normal(rng, shapes["wo"], resid / math.sqrt(shapes["wo"][0]))
    yield "mlp_norm", _norm_weight(rng, H)
    if not m.is_moe(layer):
        Fd = m.dense_ffn_hidden_size
        yield "w1", _normal(rng, (H, Fd), 1.0 / math.sqrt(H))
        yield "b1", _normal(rng, (Fd,), 0.02)
        yield "w2", _normal(rng, (Fd, H), resid / math.sqrt(Fd))
        yield "b2", _normal(rng, (H,), 0.02)
        return
    yield "gate", _normal(rng, shapes["gate"], 1.0 / math.sqrt(H))


def _expert_arrays(m: ModelConfig, rng):
    H, F = m.hidden_size, m.moe_ffn_hidden_size
    resid = 1.0 / math.sqrt(2.0 * m.num_layers)
    return {"w1": _normal(rng, (H, F), 1.0 / math.sqrt(H)), "b1": _normal(rng, (F,), 0.02),
            "w2": _normal(rng, (F, H), resid / math.sqrt(F)), "b2": _normal(rng, (H,), 0.02)}


def _variant_arrays(m: ModelConfig, layer: int, rng):
    """Yield (name, array) for the datasets of the model variants (q/k norms, gated MLPs' w3,
    shared experts), from their own generator so SPEC models keep their seeds' weights."""
    shapes = layer_shapes(m, layer)
    H = m.hidden_size
    for name in ("q_norm", "k_norm"):
        if name in shapes:
            yield name, _norm_weight(rng, shapes[name][0])
    for name in ("bq", "bk", "bv"):
        if name in shapes:
            yield name, _normal(rng, shapes[name], 0.1)
    if "w3" in shapes:
        yield "w3", _normal(rng, shapes["w3"], 1.0 / math.sqrt(H))
    if "shared/w1" in shapes:
        Fs, resid = m.shared_expert_ffn_hidden_size, 1.0 / math.sqrt(2.0 * m.num_layers)
        yield "shared/w1", _normal(rng, (H, Fs), 1.0 / math.sqrt(H))
        if "shared/w3" in shapes:
            yield "shared/w3", _normal(rng, (H, Fs), 1.0 / math.sqrt(H))
        yield "shared/w2", _normal(rng, (Fs, H), resid / math.sqrt(Fs))
    if "shared_gate" in shapes:
        yield "shared_gate", _normal(rng, (H,), 1.0 / math.sqrt(H))


def _bf16_dataset(group, name, shape):
    dset = group.create_dataset(name, shape=shape, dtype=np.uint16)
    dset.attrs["dtype"] = "bfloat16"
    return dset



def write_checkpoint(path: str | Path, m: ModelConfig, seed: int = 0, overwrite: bool = False,
                     inputs: tuple = ()) -> None:
    """Write a synthetic ``moe_hpc.checkpoint/1`` file for model ``m`` (never over one of ``inputs``)."""
    if m.mla:
        raise ConfigError("init-weights does not make MLA (DeepSeek-V3) checkpoints yet; run a Hugging Face "
                          "checkpoint of the family (docs/models.md)")
    path = Path(path)
    check_output(path, overwrite, inputs)
    rng, extra = np.random.default_rng(seed), np.random.default_rng([seed, 1])
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = CHECKPOINT_FORMAT
            f.attrs["config"] = m.to_json()
            H = m.hidden_size
            if m.vocab_size:
                write_float(f, "embed", _normal(rng, (m.vocab_size, H), 1.0))
            for layer in range(m.num_layers):
                g = f.create_group(f"layers/{layer}")
                shapes = layer_shapes(m, layer)
                for name, array in [*_layer_arrays(m, layer, rng), *_variant_arrays(m, layer, extra)]:
                    if name in shapes:          # a gated MLP has no b1, b2: drawn, not written
                        write_float(g, name, array)
                if m.is_moe(layer):
                    names = [n for n in ("w1", "b1", "w2", "b2", "w3") if f"experts/{n}" in shapes]
                    dsets = {n: _bf16_dataset(g, f"experts/{n}", shapes[f"experts/{n}"]) for n in names}
                    for e in range(m.num_experts):
                        arrays = _expert_arrays(m, rng)
                        if "w3" in dsets:
                            arrays["w3"] = _normal(extra, shapes["experts/w3"][1:], 1.0 / math.sqrt(m.hidden_size))
                        for n in names:
                            dsets[n][e] = arrays[n].view(np.uint16)
            write_float(f, "final_norm", _norm_weight(rng, H))
            if "lm_head" in global_shapes(m):
                write_float(f, "lm_head", _normal(rng, global_shapes(m)["lm_head"], 1.0 / math.sqrt(H)))


def write_inputs(path: str | Path, m: ModelConfig, sequences: int, seq_len: int, seed: int = 0,
                 ragged: bool = False, overwrite: bool = False, inputs: tuple = ()) -> None:
    """Write a synthetic ``moe_hpc.input/1`` batch: /hidden ~ N(0, 1) (or /tokens when the
    model has a vocabulary), and /lengths in [1, seq_len] when ``ragged``."""
    path = Path(path)
    check_output(path, overwrite, inputs)
    if sequences < 1 or seq_len < 1:
        raise OutputError(f"{path}: --sequences and --seq-len must be >= 1")
    rng = np.random.default_rng(seed)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = INPUT_FORMAT
            if m.vocab_size:
                f.create_dataset("tokens", data=rng.integers(0, m.vocab_size, (sequences, seq_len)))
            else:
                dset = _bf16_dataset(f, "hidden", (sequences, seq_len, m.hidden_size))
                for s in range(sequences):  # one sequence at a time: inputs may exceed memory
                    dset[s] = _normal(rng, (seq_len, m.hidden_size), 1.0).view(np.uint16)
            if ragged:
                f.create_dataset("lengths", data=rng.integers(1, seq_len + 1, sequences))


__all__ = ["write_checkpoint", "write_inputs"]
