"""The table of docs/placement.md: formula vs greedy vs optimised at 64, 512 and 3,904 GPUs.

    OMP_NUM_THREADS=1 taskset -c 0 .venv/bin/python benchmarks/placement_table.py [--sweep]

Each scale: the 61-layer model (inputs/seed61.toml), inputs/cluster<N>.toml, a synthetic trace
with the default knobs of ``moe-hpc make-trace`` and seed 1, then what ``moe-hpc place``
computes (same code and defaults: a 2,000-attempt local search).  ``--sweep`` adds the
sensitivity table (Zipf exponent x source affinity, same search budget).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from moe_hpc.config.cluster import load_cluster  # noqa: E402
from moe_hpc.config.run_config import load_config  # noqa: E402
from moe_hpc.placement.search import evaluate, place
from moe_hpc.tools.tracegen import make_trace_file
from moe_hpc.placement.search import plan_placements  # noqa: E402
from moe_hpc.config.roles import role_layout  # noqa: E402
from moe_hpc.tools.tracegen import TraceShape, synthetic_trace  # noqa: E402

SCALES = [(64, 0), (512, 0), (3904, 192)]


def scale_rows(gpus: int, dense: int, folder: Path) -> list[str]:
    cfg = load_config(REPO / "inputs" / "seed61.toml", [f"parallel.dense_ranks={dense}"])
    cluster = REPO / "inputs" / f"cluster{gpus}.toml"
    trace = folder / f"trace{gpus}.h5"
    make_trace_file(cfg, cluster, trace, TraceShape(), seed=1, overwrite=True)
    _, report = place(cfg, cluster, trace)
    rows = []
    for name, m in report["metrics"].items():
        gain = 1 - report["metrics"]["optimised"]["max_link_ms"] / m["max_link_ms"]
        rows.append(f"| {gpus} | {name} | {m['max_link_ms']:.2f} | {m['max_link_tokens']:.0f} | "
                    f"{m['gpu_max_over_mean']:.2f} | {m['inter_node_gb']:.1f} | "
                    f"{'' if name == 'optimised' else f'{gain:.1%}'} |")
    rows[-1] += f" {report['seconds']:.1f} s |"
    rows[0] += " |"
    rows[1] += " |"
    return rows


def sweep_rows() -> list[str]:
    model = load_config(REPO / "inputs" / "seed61.toml").model
    rows = []
    for gpus, dense in SCALES:
        cluster = load_cluster(REPO / "inputs" / f"cluster{gpus}.toml")
        for zipf in (0.6, 0.8, 1.0, 1.2):
            for affinity in ((0.0,) if dense else (0.0, 0.3)):
                trace = synthetic_trace(model, gpus, role_layout(gpus, dense).dense_ranks,
                                        TraceShape(zipf=zipf, affinity=affinity), seed=1)
                gain = evaluate(plan_placements(model, cluster, dense, trace), trace, cluster)["optimised_gain"]
                rows.append(f"| {gpus} | {zipf} | {affinity} | {gain['vs_formula']:.1%} | {gain['vs_greedy']:.1%} |")
                print(rows[-1], file=sys.stderr, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", action="store_true", help="also the Zipf x affinity sensitivity table")
    args = ap.parse_args()
    print("| GPUs | placement | max link load (ms) | busiest link (tokens/layer) | max/mean GPU load "
          "| inter-node GB | optimised below it | plan + evaluate |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as folder:
        for gpus, dense in SCALES:
            print("\n".join(scale_rows(gpus, dense, Path(folder))), flush=True)
    if args.sweep:
        print("\n| GPUs | zipf | affinity | optimised below formula | below greedy |")
        print("| ---: | ---: | ---: | ---: | ---: |")
        print("\n".join(sweep_rows()))


if __name__ == "__main__":
    main()
