"""``moe-hpc import-hf``: a Hugging Face checkpoint directory -> a run config and an HDF5 checkpoint.

Tensors are copied one at a time (an expert block's E tensors one expert at a time), in their
own dtype (bf16 as tagged uint16, f16 and f32 as they are), so memory stays bounded by the
largest single tensor. Both outputs are written under ``<name>.tmp`` and renamed when complete
(weights first, then the config), so an interrupted import leaves no output under its name.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import h5py
import numpy as np

from ..config.run_config import ModelConfig, build_config
from ..device.dtypes import BF16
from ..files.atomic import atomic_path, check_output, write_text_atomic
from ..files.checkpoint import CHECKPOINT_FORMAT, OPTIONAL, Checkpoint, global_shapes, layer_shapes
from ..files.h5 import write_float


def _log(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def toml_table(name: str, table: dict) -> str:
    """A flat TOML table (ints, floats, bools, strings) as text."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)          # a JSON string is a valid TOML basic string
        return repr(v)
    return f"[{name}]\n" + "".join(f"{k} = {value(v)}\n" for k, v in table.items())


def _datasets(m: ModelConfig):
    """(dataset name, shape, optional) of every dataset a checkpoint of ``m`` may hold."""
    for name, shape in global_shapes(m).items():
        yield name, shape, False
    for layer in range(m.num_layers):
        for name, shape in layer_shapes(m, layer).items():
            yield f"layers/{layer}/{name}", shape, name in OPTIONAL


def _copy(ckpt: Checkpoint, out: h5py.File, name: str, shape) -> int:
    """One dataset from the source into ``out``; -> bytes written."""
    tensors = ckpt.tensors
    if "/experts/" not in name:
        array = np.ascontiguousarray(tensors.read(name))
        write_float(out, name, array)
        return array.nbytes
    first = tensors.read(name, (0,))
    bf16 = first.dtype == BF16
    dset = out.create_dataset(name, shape=shape, dtype=np.uint16 if bf16 else first.dtype)
    if bf16:
        dset.attrs["dtype"] = "bfloat16"
    for e in range(shape[0]):        # one expert's tensor at a time
        array = first if e == 0 else tensors.read(name, (e,))
        dset[e] = array.view(np.uint16) if bf16 else array
    return first.nbytes * shape[0]



def import_hf(folder: str | Path, config_out: str | Path, weights_out: str | Path, overwrite: bool = False,
              log=_log, every_s: float = 5.0) -> ModelConfig:
    """Convert checkpoint directory ``folder``; -> its model. Progress lines go to ``log``."""
    folder, config_out, weights_out = Path(folder), Path(config_out), Path(weights_out)
    for path in (config_out, weights_out):
        check_output(path, overwrite, inputs=(folder,))
    from ..files.hf_tensors import HFTensors
    model = HFTensors(folder).stored_model()
    build_config({"model": vars(model)}, where=str(folder / "config.json"))      # the run would check it so
    names = [(n, s) for n, s, optional in _datasets(model)]
    done = written = 0
    t0 = last = time.monotonic()
    with Checkpoint(folder, model) as ckpt, atomic_path(weights_out) as tmp:
        with h5py.File(tmp, "w") as out:
            out.attrs["format"] = CHECKPOINT_FORMAT
            out.attrs["config"] = model.to_json()
            for name, shape in names:
                if ckpt.tensors.shape(name) is None:        # an optional dataset the family lacks
                    continue
                written += _copy(ckpt, out, name, shape)
                done += 1
                if time.monotonic() - last >= every_s:
                    last = time.monotonic()
                    log(f"import-hf: {name} ({written / 1e6:.1f} MB so far)")
    write_text_atomic(config_out, f"# moe-hpc import-hf {folder}\n" + toml_table("model", vars(model)), durable=True)
    log(f"import-hf: {done} datasets, {written / 1e6:.1f} MB in {time.monotonic() - t0:.1f} s -> "
        f"{weights_out}, {config_out}")
    return model


__all__ = ["import_hf", "toml_table"]
