"""Bad placement, trace and cluster inputs fail by the same contract as test_bad_input.py:
one ``error:`` line naming the file or key, every rank non-zero, no output and no ``.tmp``."""
import shutil

import pytest

from moe_hpc.config.run_config import build_config
from moe_hpc.placement.file import make_placement, save_placement
from moe_hpc.placement.traces import write_trace
from moe_hpc.tools.tracegen import TraceShape, synthetic_trace

from helpers import TINY, assert_clean_failure, edited, needs_mpiexec, run_ranks, transform_dataset

pytestmark = needs_mpiexec
MODEL = build_config({}).model
GOOD_CLUSTER = "[cluster]\nnodes = 2\ngpus_per_node = 2\n"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A trace of 4 co-located ranks and a placement for 2 expert ranks (the 2-rank runs)."""
    d = tmp_path_factory.mktemp("good")
    write_trace(d / "trace.h5", synthetic_trace(MODEL, 4, range(4), TraceShape(tokens_per_source=64), seed=0))
    save_placement(d / "placement.h5", make_placement(MODEL, 2), MODEL)
    (d / "cluster.toml").write_text(GOOD_CLUSTER)
    return d


def place_args(cluster, trace, out, *extra):
    return ("place", TINY, "--cluster", cluster, "--trace", trace, "-o", out, *extra)


def _bad_cluster(text):
    """-> make(good dir, tmp) -> (cluster, trace, the file the error must name)."""
    def make(d, tmp):
        path = tmp / "bad_cluster.toml"
        path.write_text(text)
        return path, d / "trace.h5", path
    return make


def _bad_trace(edit):
    def make(d, tmp):
        bad = edited(d / "trace.h5", tmp / "bad_trace.h5", edit)
        return d / "cluster.toml", bad, bad
    return make


PLACE_CASES = [
    pytest.param(_bad_cluster("[cluster]\nnodes = 2\ngpus_per_node = 2\nrials = 8\n"), ("cluster.rials",),
                 id="cluster-unknown-key"),
    pytest.param(_bad_cluster("[cluster]\nnodes = -2\n"), ("cluster.nodes",), id="cluster-bad-value"),
    pytest.param(_bad_cluster("[cluster\n"), ("not valid TOML",), id="cluster-not-toml"),
    pytest.param(_bad_cluster("[cluster]\nnodes = 3\ngpus_per_node = 2\n"), ("world_size",),
                 id="cluster-size-differs-from-trace"),
    pytest.param(_bad_cluster(GOOD_CLUSTER + "[intra_node]\nbandwidth_gb_per_s = 450.0\n"),
                 ("[intra_node]", "network.intra_node_gb_s"), id="cluster-retired-form"),
    pytest.param(_bad_cluster(GOOD_CLUSTER + "[gpu]\nmemory_gib = 0.0001\n"), ("gpu.memory_gib",),
                 id="cluster-memory-too-small"),
    pytest.param(_bad_trace(lambda f: f.__delitem__("source_expert")), ("/source_expert",),
                 id="trace-missing-dataset"),
    pytest.param(_bad_trace(transform_dataset("coactivation", lambda a: a[:, :4, :4])), ("/coactivation",),
                 id="trace-shape-vs-model"),
    pytest.param(_bad_trace(transform_dataset("window_tokens", lambda a: -a)), ("/window_tokens",),
                 id="trace-negative"),
    pytest.param(_bad_trace(lambda f: f.attrs.__setitem__("format", "moe_hpc.output/1")), ("format",),
                 id="trace-format"),
]


@pytest.mark.parametrize("make, needles", PLACE_CASES)
def test_place_with_bad_input_fails_cleanly(make, needles, good, tmp_path):
    cluster, trace, bad = make(good, tmp_path)
    out = tmp_path / "placement.h5"
    outcome = run_ranks(*place_args(cluster, trace, out), ranks=2)
    assert_clean_failure(outcome, 2, (bad, *needles), out)


def test_place_trace_from_other_layout_is_refused(good, tmp_path):
    out = tmp_path / "placement.h5"
    outcome = run_ranks(*place_args(good / "cluster.toml", good / "trace.h5", out,
                                    "--set", "parallel.dense_ranks=1"), ranks=2)
    assert_clean_failure(outcome, 2, (good / "trace.h5", "/source_ranks", "not a dense rank"), out)


def test_place_refuses_to_overwrite(good, tmp_path):
    out = tmp_path / "placement.h5"
    out.write_bytes(b"keep me")
    outcome = run_ranks(*place_args(good / "cluster.toml", good / "trace.h5", out), ranks=2)
    assert outcome.result.returncode != 0 and len(outcome.error_lines) == 1
    assert str(out) in outcome.error_lines[0] and out.read_bytes() == b"keep me"


def test_make_trace_bad_knob(good, tmp_path):
    out = tmp_path / "t.h5"
    outcome = run_ranks("make-trace", TINY, "--cluster", good / "cluster.toml", "-o", out, "--clusters", "3",
                        ranks=2)
    assert_clean_failure(outcome, 2, ("--clusters",), out)


RUN_CASES = [
    pytest.param(lambda f: f.attrs.__setitem__("num_expert_ranks", 3), ("planned for 3 expert GPUs",),
                 id="placement-other-rank-count"),
    pytest.param(transform_dataset("ranks", lambda t: t + 5), ("/ranks",), id="placement-gpu-out-of-range"),
    pytest.param(transform_dataset("ranks", lambda t: t[:, :4]), ("/ranks", "shape"), id="placement-shape-vs-model"),
    pytest.param(lambda f: f.__delitem__("ranks"), ("/ranks",), id="placement-no-ranks"),
]


@pytest.mark.parametrize("edit, needles", RUN_CASES)
def test_run_with_bad_placement_file_fails_cleanly(edit, needles, good, tiny_files, tmp_path):
    weights, inputs = tiny_files
    bad = edited(good / "placement.h5", tmp_path / "bad_placement.h5", edit)
    out = tmp_path / "out.h5"
    outcome = run_ranks("run", TINY, "--weights", weights, "--input", inputs, "--output", out,
                        "--set", f"parallel.placement={bad}", ranks=2)
    assert_clean_failure(outcome, 2, (bad, *needles), out)


@pytest.mark.parametrize("setting, needle", [
    ("parallel.placement=somewhere", "parallel.placement"),
    ("parallel.placement=no_such_placement.h5", "no_such_placement.h5"),
    ("run.balance_threshold=0.9", "run.balance_threshold"),
    ("run.balance_gamma=0", "run.balance_gamma"),
    ("run.balance=yes", "run.balance"),
])
def test_run_with_bad_balance_or_placement_key(setting, needle, tiny_files, tmp_path):
    weights, inputs = tiny_files
    out = tmp_path / "out.h5"
    outcome = run_ranks("run", TINY, "--weights", weights, "--input", inputs, "--output", out,
                        "--set", setting, ranks=2)
    assert_clean_failure(outcome, 2, (needle,), out)


def test_run_trace_path_exists(tiny_files, tmp_path):
    weights, inputs = tiny_files
    out, trace = tmp_path / "out.h5", tmp_path / "trace.h5"
    trace.write_bytes(b"an older trace")
    outcome = run_ranks("run", TINY, "--weights", weights, "--input", inputs, "--output", out,
                        "--trace", trace, ranks=2)
    assert_clean_failure(outcome, 2, (trace,), out)
    assert trace.read_bytes() == b"an older trace"


@pytest.mark.parametrize("which", ["trace", "cluster", "config"])
def test_place_never_writes_over_its_inputs(which, good, tmp_path):
    """``place -o`` naming its own trace, cluster file or config TOML is refused even with
    --overwrite (before issue 21's review it replaced the trace)."""
    for name in ("trace.h5", "cluster.toml"):
        shutil.copy(good / name, tmp_path / name)
    config = tmp_path / "tiny.toml"
    shutil.copy(TINY, config)
    target = {"trace": tmp_path / "trace.h5", "cluster": tmp_path / "cluster.toml", "config": config}[which]
    before = target.read_bytes()
    outcome = run_ranks("place", config, "--cluster", tmp_path / "cluster.toml", "--trace", tmp_path / "trace.h5",
                        "-o", target, "--overwrite", ranks=1)
    assert outcome.result.returncode != 0 and len(outcome.error_lines) == 1, outcome.describe()
    assert "never replaces an input" in outcome.error_lines[0], outcome.describe()
    assert target.read_bytes() == before
