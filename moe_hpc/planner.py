"""``moe-hpc place`` and ``moe-hpc make-trace``: files in, placement or trace out, one process.

``place`` reads a run config, a cluster description and a trace, plans the formula, greedy and
optimised placements (``place.plan_placements``), evaluates all three on the link model
(``linkload``), prints the comparison and saves the optimised placement for
``--set parallel.placement=PLACEMENT.h5``.  Outputs are written to ``<name>.tmp`` and renamed.
"""
from __future__ import annotations

import time

from .cluster import Cluster, load_cluster
from .config import Config
from .io import check_output_path
from .linkload import placement_metrics
from .place import SEARCH_STEPS, plan_placements
from .placement_file import save_placement
from .topology import role_layout
from .trace import read_trace, write_trace
from .tracegen import TraceShape, synthetic_trace

BUILTIN = ("auto", "shared", "disjoint")


def evaluate(placements: dict, trace, cluster: Cluster) -> dict:
    """-> {name: metrics dict} plus the optimiser's gains over the other two (fractions)."""
    rows = {name: placement_metrics(p, trace, cluster).as_dict() for name, p in placements.items()}
    best = rows["optimised"]["max_link_ms"]
    gains = {f"vs_{name}": 1 - best / rows[name]["max_link_ms"] if rows[name]["max_link_ms"] else 0.0
             for name in ("formula", "greedy")}
    return {"metrics": rows, "optimised_gain": gains}


def place(cfg: Config, cluster_path, trace_path, steps: int = SEARCH_STEPS,
          seconds: float = 120.0) -> tuple[dict, dict]:
    """Plan and evaluate; -> (placements by name, report). Raises on bad inputs, naming them."""
    cluster = load_cluster(cluster_path)
    trace = read_trace(trace_path, cfg.model)
    kind = cfg.parallel.placement if cfg.parallel.placement in BUILTIN else "auto"
    t0 = time.perf_counter()
    placements = plan_placements(cfg.model, cluster, cfg.parallel.dense_ranks, trace, kind, steps, seconds,
                                 where=str(trace_path))
    report = evaluate(placements, trace, cluster)
    report["seconds"] = time.perf_counter() - t0
    report["gpus"], report["dense_ranks"] = cluster.num_gpus, cfg.parallel.dense_ranks
    report["replicated_experts"] = sum(len(h) > 1 for row in placements["optimised"].ranks for h in row)
    return placements, report


def place_to_file(cfg: Config, cluster_path, trace_path, output, steps: int, seconds: float,
                  overwrite: bool) -> dict:
    """``moe-hpc place``: the report, with the optimised placement saved at ``output``."""
    check_output_path(output, overwrite)
    placements, report = place(cfg, cluster_path, trace_path, steps, seconds)
    save_placement(output, placements["optimised"], cfg.model, report)
    return report


def format_report(report: dict) -> str:
    """A markdown table of the three placements."""
    lines = [f"{report['gpus']} GPUs ({report['dense_ranks']} dense), planned and evaluated in "
             f"{report['seconds']:.1f} s; optimised has {report['replicated_experts']} replicated experts",
             "", "| placement | max link load (ms) | busiest link (tokens/layer) | max/mean GPU load "
             "| inter-node GB |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, m in report["metrics"].items():
        lines.append(f"| {name} | {m['max_link_ms']:.4g} | {m['max_link_tokens']:.0f} | "
                     f"{m['gpu_max_over_mean']:.2f} | {m['inter_node_gb']:.1f} |")
    g = report["optimised_gain"]
    lines += ["", f"optimised max link load: {g['vs_formula']:.1%} below formula, "
                  f"{g['vs_greedy']:.1%} below greedy"]
    return "\n".join(lines)


def make_trace_file(cfg: Config, cluster_path, output, shape: TraceShape, seed: int, overwrite: bool) -> None:
    """``moe-hpc make-trace``: a synthetic trace whose sources are the layout's dense ranks."""
    check_output_path(output, overwrite)
    cluster = load_cluster(cluster_path)
    roles = role_layout(cluster.num_gpus, cfg.parallel.dense_ranks)
    write_trace(output, synthetic_trace(cfg.model, cluster.num_gpus, roles.dense_ranks, shape, seed))


__all__ = ["place", "place_to_file", "evaluate", "format_report", "make_trace_file"]
