"""Calibration: the bench's own run, modelled exactly, next to what it measured,
and the model's constants fitted from it.

``moe-hpc bench`` times one MoE layer on R ranks (one per GPU, co-located roles, ``shared``
placement over all R ranks, T tokens per GPU in n micro-batches), each local step alone, and
optionally a depth-shrunk whole model.  The planner builds that same configuration (same
shapes, same GPU count, same placement function) and predicts every figure with the same
functions it uses for a deployment.

Fit: the phase times are piecewise linear in theta = (1 / mfu, 1 / memory_util, 1 / copy_util,
launch_us, sync_us), so a few Gauss-Newton steps on the relative errors of the measured phases
(gate, plan, pack, weighted sum, experts, exchange) find theta; the whole layer is then a
prediction, never fitted.  attention_mfu is the fused flash core's rate the bench measured
(``model.dense.attention_core_tflops``) where a file has it; otherwise, when the JSON has the
whole-model figure (of the tiled core, whose score traffic makes it most of a forward), it is
fitted last (one unknown, bisection) from the forward time.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config.cluster import Cluster, DeploymentSpec, GpuSpec
from ..config.errors import InputError
from ..config.jsonfile import read_json_object
from ..config.run_config import Config, load_config
from ..device.datasheet import datasheet_for
from .deployment import Deployment, make_layout
from .time_model import (experts, gate, moe_block, pack, plan, rates_of, seconds, self_copy, step_time,
                         transfer, weighted_sum)
from .workload import Workload

# Datasheet figures of the GPUs the bench has run on: dense bf16 TFLOP/s, HBM TB/s (SXM parts).
PHASES = ("gate_topk", "plan_and_counts_d2h", "pack_rows", "weighted_combine", "t_experts_ms", "t_exchange_ms")
FITTED = ("mfu", "memory_util", "copy_util", "launch_us", "sync_us")


@dataclass(frozen=True)
class Measured:
    """One bench JSON: where it came from, the model it ran, the device's datasheet figures,
    and its figures (ms)."""
    path: str
    cfg: Config
    device: str
    peak_tflops: float
    memory_tb_s: float
    bench: dict


def bench_config(bench: dict, config: str | Path) -> Config:
    """The model the bench ran: the preset it names when one of that file name sits beside
    ``config`` (its recorded path belongs to the machine it ran on), else ``config`` itself."""
    beside = Path(config).parent / Path(str(bench.get("config", ""))).name
    return load_config(beside if beside.is_file() else config)


def load_measured(path: str | Path, cluster: Cluster, config: str | Path) -> Measured:
    """Read a ``moe-hpc bench --json`` file; errors name the file and the missing key."""
    path = Path(path)
    bench = read_json_object(path, "bench JSON", InputError)
    for key in ("ranks", "device", "transport", "layer"):
        if not isinstance(bench, dict) or key not in bench:
            raise InputError(f"{path}: missing key {key!r} (not a moe-hpc bench JSON?)")
    for key in PHASES[4:] + ("t_layer_ms", "tokens_per_gpu", "micro_batches", "slot_padding", "local_phases_ms"):
        if key not in bench["layer"]:
            raise InputError(f"{path}: missing key layer.{key}")
    if bench["transport"] != "nccl":
        raise InputError(f"{path}: transport {bench['transport']!r}: the planner models the nccl transport only")
    peak, bw = datasheet_for(str(bench["device"])) or (cluster.gpu.peak_tflops, cluster.gpu.memory_tb_s)
    return Measured(str(path), bench_config(bench, config), str(bench["device"]), peak, bw, bench)


def bench_setup(cluster: Cluster, meas: Measured, gpu: GpuSpec,
                layers: int | None = None) -> tuple[Config, Cluster, Deployment, Workload]:
    """The bench's configuration: its ranks on one node, co-located, shared placement over all
    ranks, its tokens per GPU (as one chunk) and micro-batch size, on the measured device."""
    cfg, L = meas.cfg, meas.bench["layer"]
    ranks, tokens = int(meas.bench["ranks"]), int(L["tokens_per_gpu"])
    run = dataclasses.replace(cfg.run, micro_batch_tokens=math.ceil(tokens / int(L["micro_batches"])))
    model = cfg.model
    seq_len, sequences = tokens, 1
    if layers is not None:              # the whole-model figure: shrunk in depth, its own batch
        M = meas.bench["model"]
        model = dataclasses.replace(model, num_layers=layers,
                                    first_dense_layers=min(model.first_dense_layers, layers - 1))
        seq_len, sequences = int(M["seq_len"]), int(M["sequences_per_gpu"])
        run = dataclasses.replace(run, chunk_sequences=sequences)
    parallel = dataclasses.replace(cfg.parallel, dense_ranks=0, placement="shared")
    cfg = dataclasses.replace(cfg, model=model, parallel=parallel, run=run)
    gpu = dataclasses.replace(gpu, peak_tflops=meas.peak_tflops, memory_tb_s=meas.memory_tb_s)
    bench_cluster = Cluster(f"bench:{meas.device}", 1, ranks, gpu, cluster.network,
                            DeploymentSpec(dense_gpus=0, data_parallel=1, seq_len=seq_len), meas.path)
    w = Workload(sequences, seq_len, run.micro_batch_tokens, float(L["slot_padding"]), measured_flash(meas))
    return cfg, bench_cluster, make_layout(cfg, bench_cluster, "shared"), w


def measured_flash(meas: Measured) -> bool:
    """Whether the bench's whole model attended through the fused flash core, as its file says
    (``model.dense.attention_core``). A file without that figure was written before the fused
    core existed (both came in f9125da): its model attended in tiles."""
    dense = meas.bench.get("model", {}).get("dense") or {}
    return dense.get("attention_core") == "cudnn"


def predict_layer(cluster: Cluster, meas: Measured, gpu: GpuSpec) -> dict[str, float]:
    """Every layer figure the bench measures, predicted in ms (same keys as the JSON)."""
    cfg, bc, layout, w = bench_setup(cluster, meas, gpu)
    m, r, T, n = cfg.model, rates_of(bc.gpu), w.tokens, w.micro_batches
    share, count = layout.routing
    rows = float(share[0].max()) * len(layout.roles.dense_ranks) * w.mb_tokens * m.top_k
    ex_c, ex_o = experts(m, rows, int(count[0].max()), w.slot_padding, r)
    network, own = transfer(layout, bc, w, 0)
    block = moe_block(cfg, bc, layout, w, m.first_dense_layers, r)
    ms = {"gate_topk": seconds(gate(m, T, r)), "plan_and_counts_d2h": seconds(plan(m, T, r)),
          "pack_rows": seconds(pack(m, T, r)), "weighted_combine": seconds(weighted_sum(m, T, r)),
          "t_experts_ms": n * float(ex_c + ex_o),
          "t_exchange_ms": n * 2 * (network + (seconds(self_copy(m, own, r)) if own else 0.0)),
          "t_layer_ms": block.seconds - block.phases["attention"]}        # the bench times the MoE block only
    return {k: v * 1e3 for k, v in ms.items()}


def measured_layer(meas: Measured) -> dict[str, float]:
    L = meas.bench["layer"]
    return {**{k: float(L["local_phases_ms"][k]) for k in PHASES[:4]},
            **{k: float(L[k]) for k in PHASES[4:] + ("t_layer_ms",)}}


def predict_forward(cluster: Cluster, meas: Measured, gpu: GpuSpec) -> float:
    """The bench's depth-shrunk whole model: seconds per forward of its chunk."""
    layers = int(meas.bench["model"]["layers"])
    cfg, bc, layout, w = bench_setup(cluster, meas, gpu, layers)
    return step_time(cfg, bc, layout, w).seconds


def _theta(gpu: GpuSpec) -> np.ndarray:
    return np.array([1 / gpu.mfu, 1 / gpu.memory_util, 1 / gpu.copy_util, gpu.launch_us, gpu.sync_us])


def _gpu(gpu: GpuSpec, theta: np.ndarray) -> GpuSpec:
    t = np.maximum(theta, [1.0, 1.0, 1.0, 0.0, 0.0])      # fractions at most 1, costs at least 0
    return dataclasses.replace(gpu, mfu=1 / t[0], memory_util=1 / t[1], copy_util=1 / t[2],
                               launch_us=float(t[3]), sync_us=float(t[4]))


def fit(cluster: Cluster, measured: list[Measured], steps: int = 8) -> GpuSpec:
    """Gauss-Newton on the relative errors of every measured phase of every file -> GpuSpec
    with the fitted constants (attention_mfu too when a file has the whole-model figure)."""
    gpu = cluster.gpu
    target = np.concatenate([[measured_layer(x)[k] for k in PHASES] for x in measured])

    def predicted(g: GpuSpec) -> np.ndarray:
        figures = [predict_layer(cluster, x, g) for x in measured]
        return np.concatenate([[f[k] for k in PHASES] for f in figures])

    theta = _theta(gpu)
    for _ in range(steps):
        base = predicted(_gpu(gpu, theta))
        jac = np.empty((len(target), len(theta)))
        for j in range(len(theta)):
            bumped = theta.copy()
            bumped[j] += max(1e-3, 1e-3 * abs(theta[j]))
            jac[:, j] = (predicted(_gpu(gpu, bumped)) - base) / (bumped[j] - theta[j])
        step, *_ = np.linalg.lstsq(jac / target[:, None], (target - base) / target, rcond=None)
        theta = np.maximum(theta + step, [1.0, 1.0, 1.0, 0.0, 0.0])
    gpu = _gpu(gpu, theta)
    core = attention_fitted_on(measured)
    if core:        # the fused core's own rate, as measured: a few % of a forward it could not be fitted from
        rates = [_core_tflops(x) / x.peak_tflops for x in measured if _core_tflops(x)]
        return dataclasses.replace(gpu, attention_mfu=float(np.mean(rates)))
    if core is False:
        return _fit_attention(cluster, [x for x in measured if "model" in x.bench], gpu)
    return gpu


def _core_tflops(meas: Measured) -> float | None:
    """The fused attention core's measured TFLOP/s (``model.dense``), or None."""
    return meas.bench["model"]["dense"].get("attention_core_tflops") if measured_flash(meas) else None


def _fit_attention(cluster: Cluster, measured: list[Measured], gpu: GpuSpec) -> GpuSpec:
    """attention_mfu such that the predicted forward matches the measured one (mean over files);
    the forward time falls as attention_mfu grows, so bisect on its logarithm."""
    want = np.mean([float(x.bench["model"]["t_forward_s"]) for x in measured])

    def forward(a: float) -> float:
        g = dataclasses.replace(gpu, attention_mfu=a)
        return float(np.mean([predict_forward(cluster, x, g) for x in measured]))

    lo, hi = -6.0, 0.0                  # log10 of attention_mfu
    if forward(10 ** hi) >= want:
        return dataclasses.replace(gpu, attention_mfu=1.0)
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if forward(10 ** mid) > want else (lo, mid)
    return dataclasses.replace(gpu, attention_mfu=10 ** hi)


@dataclass(frozen=True)
class Comparison:
    """One bench file: default and calibrated predictions next to the measurement (ms)."""
    measured: Measured
    default: dict
    calibrated: dict
    actual: dict
    fitted_on: bool


def compare(cluster: Cluster, measured: list[Measured], gpu: GpuSpec, fitted_on: bool) -> list[Comparison]:
    out = []
    for x in measured:
        default, calibrated, actual = (predict_layer(cluster, x, cluster.gpu),
                                       predict_layer(cluster, x, gpu), measured_layer(x))
        if "model" in x.bench:
            default["t_forward_ms"] = predict_forward(cluster, x, cluster.gpu) * 1e3
            calibrated["t_forward_ms"] = predict_forward(cluster, x, gpu) * 1e3
            actual["t_forward_ms"] = float(x.bench["model"]["t_forward_s"]) * 1e3
        out.append(Comparison(x, default, calibrated, actual, fitted_on))
    return out


def attention_fitted_on(measured: list[Measured]) -> bool | None:
    """The core ``fit`` takes attention_mfu from: True the fused core (its measured rate), False
    the tiled core (fitted from a forward), None neither (no whole-model figure)."""
    if any(_core_tflops(x) for x in measured):
        return True
    return False if any("model" in x.bench for x in measured) else None


def calibrated_cluster(cluster: Cluster, gpu: GpuSpec, keep_attention: bool = False) -> Cluster:
    """The deployment's cluster with the fitted fractions and overheads (its own peaks kept;
    its own attention_mfu too with ``keep_attention``: the rate was fitted on the other core)."""
    keep = {k: getattr(cluster.gpu, k) for k in ("memory_gib", "peak_tflops", "memory_tb_s", "reserved_gib")
            + (("attention_mfu",) if keep_attention else ())}
    return dataclasses.replace(cluster, gpu=dataclasses.replace(gpu, **keep))


__all__ = ["Measured", "load_measured", "bench_setup", "predict_layer", "measured_layer", "measured_flash",
           "predict_forward", "fit", "Comparison", "compare", "calibrated_cluster", "attention_fitted_on"]
