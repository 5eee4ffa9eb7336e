"""Progress lines and bar, the summary's reductions, and the scaling report (no MPI)."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest

from moe_hpc.config.errors import InputError
from moe_hpc.runtime.progress import ProgressLog, expert_load, hms, phase_summary
from moe_hpc.tools.scaling import load_points, scaling_report, with_efficiency


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_progress_lines_cadence_rate_and_eta():
    clock, out = FakeClock(), io.StringIO()
    log = ProgressLog([100, 100, 100, 100], first=0, mode="lines", every=10.0, stream=out, clock=clock)
    for c, t in enumerate((1, 2, 12, 13)):      # chunks end at t = 101, 102, 112, 113 s
        clock.now = 100.0 + t
        log.chunk_done(c)
    lines = out.getvalue().splitlines()
    # the first chunk, then one line per 10 s, and always the last chunk
    assert [line.split(",")[0] for line in lines] == ["progress: chunk 1/4 (25.0%)",
                                                      "progress: chunk 3/4 (75.0%)",
                                                      "progress: chunk 4/4 (100.0%)"]
    assert "300/400 tokens, 25 tokens/s" in lines[1] and "ETA 0:00:04" in lines[1]
    assert "ETA 0:00:00" in lines[2]


def test_progress_resumed_counts_only_this_runs_rate():
    clock, out = FakeClock(), io.StringIO()
    log = ProgressLog([50, 50, 50, 50], first=2, mode="lines", every=0, stream=out, clock=clock)
    clock.now += 5
    log.chunk_done(2)
    assert "chunk 3/4 (75.0%), 150/200 tokens, 10 tokens/s" in out.getvalue()


def test_progress_bar_redraws_in_place():
    clock, out = FakeClock(), io.StringIO()
    log = ProgressLog([100, 10], first=0, mode="bar", stream=out, clock=clock)
    clock.now += 1
    log.chunk_done(0)
    clock.now += 11
    log.chunk_done(1)
    text = out.getvalue()
    assert text.startswith("\r[###########################...]  90.9% chunk 1/2 100 tok/s ETA 0:00:00")
    assert text.rstrip().endswith("100.0% chunk 2/2 9 tok/s ETA 0:00:00") and text.count("\r") == 2
    first, second = text.split("\r")[1:]
    assert len(second.rstrip("\n")) == len(first)    # the shorter redraw covers the old bar


def test_off_mode_and_hms():
    out = io.StringIO()
    ProgressLog([1], first=0, mode="off", stream=out).chunk_done(0)
    assert out.getvalue() == ""
    assert hms(3725) == "1:02:05" and hms(float("inf")) == "?"


def test_phase_summary_and_expert_load():
    phases = phase_summary([{"attention": 2.0, "io": 1.0}, {"attention": 4.0, "experts": 3.0}, {}])
    assert phases["attention"] == {"mean": 3.0, "max": 4.0, "ranks": 2}
    assert phases["experts"]["ranks"] == 1 and list(phases) == ["attention", "experts", "io"]
    load = expert_load(np.array([[10, 10, 10, 10], [40, 0, 0, 0]]))
    assert load["tokens_routed"] == 80 and load["per_layer_max_over_mean"] == [1.0, 4.0]
    assert load["max_over_mean"] == 4.0 and load["hottest"] == {"moe_layer": 1, "expert": 0, "tokens": 40}


def _summary(folder, name, ranks, tokens_per_s, sequences=64):
    s = {"summary": {"ranks": ranks, "nodes": 1, "sequences": sequences, "tokens_this_run": 1000,
                     "tokens_per_s": tokens_per_s}}
    (folder / name).write_text(json.dumps(s))


def test_scaling_report_table_and_plot(tmp_path):
    for ranks, tps in ((1, 100.0), (2, 180.0), (4, 300.0)):
        _summary(tmp_path, f"strong-n{ranks}.json", ranks, tps)
        _summary(tmp_path, f"weak-n{ranks}.json", ranks, 100.0 * ranks * 0.9 ** (ranks - 1), 64 * ranks)
    (tmp_path / "notes.json").write_text("{}")                 # not a study point: ignored
    points = with_efficiency(load_points(tmp_path))
    strong = {p.ranks: p for p in points if p.mode == "strong"}
    assert strong[2].speedup == pytest.approx(1.8) and strong[4].efficiency == pytest.approx(0.75)
    weak = {p.ranks: p for p in points if p.mode == "weak"}
    assert weak[2].efficiency == pytest.approx(0.9)
    png = tmp_path / "scaling.png"
    table = scaling_report(tmp_path, tmp_path / "scaling.md", png)
    assert "| strong | 1 | 4 | 64 | 1000 | 1 | 300 | 3.00 | 0.75 |" in table
    assert (tmp_path / "scaling.md").read_text().strip() == table
    header = png.read_bytes()[:24]
    width, height = int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and (width, height) == (1000, 400)


def test_repeats_count_once_with_their_best(tmp_path):
    for name, ranks, tps in (("strong-n1-r1", 1, 90.0), ("strong-n1-r2", 1, 100.0), ("strong-n2-r1", 2, 150.0),
                             ("strong-n2-r2", 2, 190.0), ("strong-n2-r3", 2, 170.0)):
        _summary(tmp_path, f"{name}.json", ranks, tps)
    points = with_efficiency(load_points(tmp_path))
    assert [(p.ranks, p.runs, p.tokens_per_s) for p in points] == [(1, 2, 100.0), (2, 3, 190.0)]
    assert points[1].efficiency == pytest.approx(0.95)


def test_scaling_report_errors(tmp_path):
    with pytest.raises(InputError, match="no strong"):
        load_points(tmp_path)
    (tmp_path / "strong-n1.json").write_text('{"summary": {"ranks": 1}}')
    with pytest.raises(InputError, match="strong-n1.json: not a moe-hpc run summary"):
        load_points(tmp_path)


def test_scaling_report_command(tmp_path):
    from helpers import moe_hpc
    for ranks, tps in ((1, 100.0), (2, 150.0)):
        _summary(tmp_path, f"strong-n{ranks}.json", ranks, tps)
    r = moe_hpc("scaling-report", tmp_path, "--plot", tmp_path / "plot.png")
    assert r.returncode == 0, r.stderr
    assert "| strong | 1 | 2 | 64 | 1000 | 1 | 150 | 1.50 | 0.75 |" in r.stdout and (tmp_path / "plot.png").exists()
    r = moe_hpc("scaling-report", tmp_path / "missing")
    assert r.returncode == 1 and r.error_lines == [f"error: {tmp_path / 'missing'}: results folder does not exist"]
