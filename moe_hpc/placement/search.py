"""``moe-hpc place``: plan the formula, greedy and optimised placements for a trace on a cluster,
evaluate all three on the link model (``links.py``), and save the optimised one.

The saved file is what ``--set parallel.placement=PLACEMENT.h5`` reads; it is written whole or
not at all (``files/atomic.py``).
"""
from __future__ import annotations

import time

from ..config.cluster import Cluster, load_cluster
from ..config.errors import InputError
from ..config.roles import dense_gpus, role_layout
from ..config.run_config import Config, ModelConfig, config_files
from ..files.atomic import check_output
from .file import make_placement, save_placement
from .greedy import SEARCH_STEPS, greedy_placement, slot_budget
from .links import placement_metrics
from .optimise import optimise_placement
from .table import Placement
from .traces import Trace, read_trace

BUILTIN = ("auto", "shared", "disjoint")


def check_trace_fits(trace: Trace, cluster: Cluster, dense_ranks: tuple[int, ...], where: str) -> None:
    """The trace must come from a run of this cluster's size, its sources being dense ranks."""
    if trace.world_size != cluster.num_gpus:
        raise InputError(f"{where}: trace has world_size = {trace.world_size} but {cluster.source} "
                         f"describes {cluster.num_gpus} GPUs")
    stray = sorted(set(trace.source_ranks.tolist()) - set(dense_ranks))
    if stray:
        raise InputError(f"{where}: /source_ranks has rank {stray[0]}, which is not a dense rank "
                         f"of this layout (parallel.dense_ranks)")


def plan_placements(model: ModelConfig, cluster: Cluster, dense_ranks: int, trace: Trace,
                    formula_kind: str = "auto", steps: int = SEARCH_STEPS, seconds: float = 120.0,
                    where: str = "<trace>") -> dict[str, Placement]:
    """The formula, greedy and optimised placements of ``model`` on ``cluster``.

    Parameters:
        dense_ranks: ``parallel.dense_ranks`` (0: every GPU hosts experts and routes tokens)
        trace: routing counts with source_expert [M, S, E]
        steps: relocation attempts of the optimiser's local search (reproducible budget)
        seconds: wall-clock safety net for the search
    Returns:
        {"formula": ..., "greedy": ..., "optimised": ...}, each a Placement over the expert GPUs
    """
    roles = role_layout(cluster.num_gpus, dense_ranks)
    check_trace_fits(trace, cluster, roles.dense_ranks, where)
    formula = make_placement(model, len(roles.expert_ranks), formula_kind)
    slots = slot_budget(formula, cluster, model)
    greedy = greedy_placement(formula, trace, cluster.gpus_per_node)
    optimised = optimise_placement(greedy, trace, cluster, slots, steps, seconds)
    return {"formula": formula, "greedy": greedy, "optimised": optimised}


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
    dense = dense_gpus(cluster, cfg.parallel.dense_ranks)
    placements = plan_placements(cfg.model, cluster, dense, trace, kind, steps, seconds,
                                 where=str(trace_path))
    report = evaluate(placements, trace, cluster)
    report["seconds"] = time.perf_counter() - t0
    report["gpus"], report["dense_ranks"] = cluster.num_gpus, dense
    report["replicated_experts"] = sum(len(h) > 1 for row in placements["optimised"].ranks for h in row)
    return placements, report


def place_to_file(cfg: Config, cluster_path, trace_path, output, steps: int, seconds: float,
                  overwrite: bool) -> dict:
    """``moe-hpc place``: the report, with the optimised placement saved at ``output``."""
    check_output(output, overwrite, (*config_files(cfg), cluster_path, trace_path))
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


__all__ = ["check_trace_fits", "plan_placements", "evaluate", "place", "place_to_file", "format_report"]
