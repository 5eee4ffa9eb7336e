"""Placement files (``moe_hpc.placement/1``): a computed Placement, saved and read back.

| item | meaning |
| --- | --- |
| `/ranks` [M, E, R] int32 | expert GPUs holding expert e of MoE layer m, -1 padded at the end |
| attr `kind` | how it was made (`optimised`, `greedy`, ...) |
| attr `num_expert_ranks` | X, the expert GPUs it is for |
| attr `first_moe_layer` | block index of MoE layer 0 |
| attr `config` | JSON of the model table it was planned for |
| attr `report` | JSON of the planner's comparison (optional, informative) |

``parallel.placement = "PLACEMENT.h5"`` makes the runner read it here, into the same
``Placement`` value the formulas give, so the runner cannot tell the two apart.
"""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from ..config.errors import ConfigError, InputError
from ..config.run_config import ModelConfig
from ..files.atomic import atomic_path
from ..files.h5 import check_format, open_h5
from .table import Placement, disjoint_placement, shared_placement

PLACEMENT_FORMAT = "moe_hpc.placement/1"


def save_placement(path: str | Path, placement: Placement, model: ModelConfig, report: dict | None = None) -> None:
    """Write the file whole or not at all (``files/atomic.py``)."""
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = PLACEMENT_FORMAT
            f.attrs["kind"] = placement.kind
            f.attrs["num_expert_ranks"] = placement.num_expert_ranks
            f.attrs["first_moe_layer"] = placement.first_moe_layer
            f.attrs["config"] = model.to_json()
            f.attrs["report"] = json.dumps(report or {})
            f.create_dataset("ranks", data=placement.rank_table().astype(np.int32))


def _int_attr(f: h5py.File, name: str, where: str) -> int:
    value = f.attrs.get(name)
    if not isinstance(value, (int, np.integer)):
        raise InputError(f"{where}: root attribute {name} must be an integer, got {value!r}")
    return int(value)


def check_table(table: np.ndarray, num_expert_ranks: int, where: str) -> None:
    """Every expert has a holder, holders are expert GPUs, distinct, and -1 only pads the end."""
    valid = table >= 0
    if not valid[..., 0].all():
        m, e = np.argwhere(~valid[..., 0])[0]
        raise InputError(f"{where}: /ranks: MoE layer {m} expert {e} has no GPU")
    if (valid[..., 1:] & ~valid[..., :-1]).any():
        raise InputError(f"{where}: /ranks: -1 may only pad the end of a replica list")
    if (table < -1).any() or (table >= num_expert_ranks).any():
        raise InputError(f"{where}: /ranks: GPU ids must be in [0, {num_expert_ranks}) "
                         f"(the run's expert ranks), or -1 for padding")
    ordered = np.sort(np.where(valid, table, -1 - np.arange(table.shape[-1])), axis=-1)
    if (ordered[..., 1:] == ordered[..., :-1]).any():
        raise InputError(f"{where}: /ranks: an expert lists the same GPU twice")


def load_placement(path: str | Path, model: ModelConfig, num_expert_ranks: int) -> Placement:
    """Read and validate a placement file for ``model`` on ``num_expert_ranks`` expert GPUs."""
    where = str(path)
    with open_h5(path, "placement") as f:
        check_format(f, PLACEMENT_FORMAT, where)
        planned = _int_attr(f, "num_expert_ranks", where)
        if planned != num_expert_ranks:
            raise InputError(f"{where}: planned for {planned} expert GPUs, but this run has "
                             f"{num_expert_ranks} (placement slots: each data-parallel group's expert ranks over parallel.expert_tp)")
        first = _int_attr(f, "first_moe_layer", where)
        if first != model.first_dense_layers:
            raise InputError(f"{where}: first_moe_layer = {first}, but model.first_dense_layers = "
                             f"{model.first_dense_layers}")
        if "ranks" not in f or not isinstance(f["ranks"], h5py.Dataset):
            raise InputError(f"{where}: /ranks: missing dataset")
        dset = f["ranks"]
        M, E = model.num_moe_layers, model.num_experts
        if len(dset.shape) != 3 or dset.shape[:2] != (M, E) or dset.shape[2] < 1:
            raise InputError(f"{where}: /ranks: shape {dset.shape}, expected [{M}, {E}, replicas] from the model")
        if dset.dtype.kind not in "iu":
            raise InputError(f"{where}: /ranks: dtype {dset.dtype} is not an integer type")
        table = np.asarray(dset[()], dtype=np.int64)
        kind = f.attrs.get("kind", "file")
    check_table(table, num_expert_ranks, where)
    ranks = tuple(tuple(tuple(int(g) for g in h if g >= 0) for h in row) for row in table)
    kind = kind.decode() if isinstance(kind, bytes) else str(kind)
    return Placement(ranks, num_expert_ranks, first, f"{kind} ({Path(path).name})")


def make_placement(model: ModelConfig, num_expert_ranks: int, kind: str = "auto") -> Placement:
    """The placement a run uses: ``parallel.placement`` (auto | shared | disjoint | a placement
    file) -> Placement. The runner, the dry run, the bench and the planner all call this."""
    if num_expert_ranks < 1:
        raise ConfigError("placement needs at least one expert rank")
    if kind.endswith(".h5"):    # computed by ``moe-hpc place``; read into the same value
        return load_placement(kind, model, num_expert_ranks)
    if model.num_moe_layers == 0:
        return Placement((), num_expert_ranks, model.first_dense_layers, kind)
    if kind == "auto":
        kind = "disjoint" if num_expert_ranks >= model.num_moe_layers * model.num_experts else "shared"
    if kind == "disjoint":
        return disjoint_placement(model, num_expert_ranks)
    if kind == "shared":
        return shared_placement(model, num_expert_ranks)
    raise ConfigError(f"parallel.placement: unknown placement {kind!r}")


__all__ = ["make_placement", "save_placement", "load_placement", "check_table", "PLACEMENT_FORMAT"]
