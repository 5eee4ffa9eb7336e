"""``moe-hpc scaling-report``: a scaling study's run summaries -> a Markdown table and a PNG.

Each point of a study is one ``moe-hpc run --summary <mode>-<anything>.json`` (see
``jobs/scaling_study.sh``): ``strong`` points share one input, ``weak`` points grow the input
with the rank count.  Repeated runs of a point (same mode and rank count) count once, with
their best throughput: on a shared machine the best run is the one least disturbed by others.
For both modes, against the smallest run of the same mode (n0 ranks, T0 tokens/s), a run on n
ranks with T tokens/s has

    speedup    = T / T0
    efficiency = (T / n) / (T0 / n0)     (1.0: every added GPU adds its full share)

The plot needs matplotlib (the ``[plot]`` extra): a labelled chart is worth that optional
dependency, and the table is written without it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..config.errors import InputError
from ..files.atomic import atomic_path, write_text_atomic

MODES = ("strong", "weak")


@dataclass(frozen=True)
class Point:
    mode: str
    nodes: int
    ranks: int
    sequences: int
    tokens: int
    tokens_per_s: float
    runs: int = 1                 # repeats of this point; tokens_per_s is their best
    speedup: float = 1.0
    efficiency: float = 1.0


def load_points(folder: Path) -> list[Point]:
    """The ``<mode>-*.json`` summaries in ``folder``, one point per (mode, ranks) with the best
    throughput of its repeats, sorted by mode then ranks."""
    if not folder.is_dir():
        raise InputError(f"{folder}: results folder does not exist")
    points = []
    for path in sorted(folder.glob("*.json")):
        mode = path.name.split("-", 1)[0]
        if mode not in MODES:
            continue
        try:
            s = json.loads(path.read_text())["summary"]
            points.append(Point(mode, int(s.get("nodes", 1)), int(s["ranks"]), int(s["sequences"]),
                                int(s["tokens_this_run"]), float(s["tokens_per_s"])))
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{path}: not a moe-hpc run summary ({type(exc).__name__}: {exc})") from None
    if not points:
        raise InputError(f"{folder}: no strong-*.json or weak-*.json run summaries")
    best = {}
    for p in points:
        key = (p.mode, p.ranks)
        runs = best[key].runs + 1 if key in best else 1
        keep = p if key not in best or p.tokens_per_s > best[key].tokens_per_s else best[key]
        best[key] = Point(**{**vars(keep), "runs": runs})
    return sorted(best.values(), key=lambda p: (p.mode, p.ranks))


def with_efficiency(points: list[Point]) -> list[Point]:
    """Speedup and efficiency of each point against the smallest run of its mode."""
    out = []
    for mode in MODES:
        series = [p for p in points if p.mode == mode]
        if not series:
            continue
        base = series[0]
        for p in series:
            speedup = p.tokens_per_s / base.tokens_per_s if base.tokens_per_s else 0.0
            out.append(Point(**{**vars(p), "speedup": speedup, "efficiency": speedup * base.ranks / p.ranks}))
    return out


def markdown_table(points: list[Point]) -> str:
    lines = ["| mode | nodes | GPUs (ranks) | sequences | tokens | runs | tokens/s (best) | speedup | efficiency |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for p in points:
        lines.append(f"| {p.mode} | {p.nodes} | {p.ranks} | {p.sequences} | {p.tokens} | {p.runs} | "
                     f"{p.tokens_per_s:,.0f} | {p.speedup:.2f} | {p.efficiency:.2f} |")
    return "\n".join(lines)


def plot(points: list[Point], path: Path, title: str) -> None:
    """Two panels against GPUs: tokens/s (log-log, with the ideal line) and efficiency."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        raise InputError("--plot needs matplotlib: pip install -e '.[plot]'") from None
    fig, (ax_t, ax_e) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for mode, marker in zip(MODES, "os"):
        series = [p for p in points if p.mode == mode]
        if not series:
            continue
        n = [p.ranks for p in series]
        line, = ax_t.plot(n, [p.tokens_per_s for p in series], marker=marker, label=f"{mode} scaling")
        ideal = [series[0].tokens_per_s * r / series[0].ranks for r in n]
        ax_t.plot(n, ideal, linestyle=":", color=line.get_color(), label=f"{mode}: ideal")
        ax_e.plot(n, [p.efficiency for p in series], marker=marker, color=line.get_color(), label=mode)
    ticks = sorted({p.ranks for p in points})
    for ax in (ax_t, ax_e):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("GPUs (MPI ranks)")
        ax.grid(True, alpha=0.3)
        ax.legend()
    ax_t.set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}")
    ax_t.yaxis.set_major_formatter(plain)
    ax_t.yaxis.set_minor_formatter(plain)     # labelled only when the range is under a decade
    ax_t.set_ylabel("tokens/s")
    ax_e.axhline(1.0, color="grey", linewidth=0.8)
    ax_e.set_ylim(0, 1.15)
    ax_e.set_ylabel("parallel efficiency")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path, durable=False) as tmp:
        fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)


def scaling_report(folder: Path, table: Path | None = None, plot_path: Path | None = None,
                   title: str = "moe_hpc scaling") -> str:
    """Read the summaries, write the table (and the plot); returns the table."""
    points = with_efficiency(load_points(folder))
    text = markdown_table(points)
    if table:
        write_text_atomic(table, text + "\n")
    if plot_path:
        plot(points, plot_path, title)
    return text


__all__ = ["Point", "load_points", "with_efficiency", "markdown_table", "plot", "scaling_report"]
