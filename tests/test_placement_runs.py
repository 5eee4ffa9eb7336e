"""On real MPI ranks: record a trace, plan a placement from it (replicas included), run with it
and get the same output; balance a skewed model at run time and see the load even out."""
import json
import shutil

import h5py
import numpy as np
import pytest

from moe_hpc.config.run_config import build_config
from moe_hpc.model.reference import compare, read_output_hidden
from moe_hpc.placement.traces import read_trace
from moe_hpc.tools.synth import write_inputs

from helpers import TINY, moe_hpc, needs_mpiexec, split_difference

pytestmark = needs_mpiexec
DEDICATED = ["--set", "parallel.dense_ranks=1"]


def run(weights, inputs, out, *sets, ranks=4, extra=()):
    args = ["run", TINY, "--weights", weights, "--input", inputs, "--output", out, *extra]
    for s in sets:
        args += ["--set", s]
    r = moe_hpc(*args, ranks=ranks)
    assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def traced(tiny_files, tmp_path_factory):
    """A 4-rank run (1 dense + 3 expert ranks) that records its routing trace."""
    weights, inputs = tiny_files
    d = tmp_path_factory.mktemp("traced")
    run(weights, inputs, d / "out.h5", "parallel.dense_ranks=1", extra=("--trace", d / "trace.h5"))
    return d


def test_trace_of_a_run_matches_its_statistics(traced):
    cfg = build_config({})
    trace = read_trace(traced / "trace.h5", cfg.model)
    with h5py.File(traced / "out.h5", "r") as f:
        stats = f["stats/expert_tokens"][()]
    assert trace.source_ranks.tolist() == [3] and trace.world_size == 4
    np.testing.assert_array_equal(trace.expert_tokens, stats)
    assert trace.window_tokens.shape[0] == 2          # 6 sequences in chunks of 4: two windows
    k = cfg.model.top_k
    assert (trace.coactivation.sum(axis=(1, 2)) == stats.sum(axis=1) // k * k * (k - 1)).all()


@pytest.fixture(scope="module")
def planned(traced):
    """``moe-hpc place`` on the recorded trace for 2 nodes x 2 GPUs: 3 expert GPUs hold
    9 copies each (the formula's busiest GPU), so 27 copies for 24 experts: 3 replicas."""
    cluster = traced / "cluster.toml"
    cluster.write_text("[cluster]\nnodes = 2\ngpus_per_node = 2\n")
    out = traced / "placement.h5"
    r = moe_hpc("place", TINY, "--cluster", cluster, "--trace", traced / "trace.h5", "-o", out,
                "--json", *DEDICATED, ranks=2)
    assert r.returncode == 0, r.stderr
    report = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("{")))["place"]
    return out, report


def test_place_reports_all_three_and_replicates(planned):
    out, report = planned
    assert set(report["metrics"]) == {"formula", "greedy", "optimised"}
    o, g = (report["metrics"][k]["max_link_ms"] for k in ("optimised", "greedy"))
    assert o <= g and report["replicated_experts"] == 3
    with h5py.File(out, "r") as f:
        assert f.attrs["format"] == "moe_hpc.placement/1" and f["ranks"].shape[:2] == (3, 8)
        assert ((f["ranks"][()] >= 0).sum(axis=2) > 1).sum() == 3


@pytest.mark.parametrize("sets", [
    [],
    ["run.balance=true", "run.balance_threshold=1000", "run.micro_batch_tokens=16"],  # water-filled replicas
], ids=["default-replica-choice", "balancer-replica-choice"])
def test_run_with_computed_placement_matches_reference(planned, tiny_files, reference, baseline, tmp_path, sets):
    weights, inputs = tiny_files
    out = tmp_path / "out.h5"
    r = run(weights, inputs, out, "parallel.dense_ranks=1", f"parallel.placement={planned[0]}", *sets)
    assert "placement optimised (placement.h5)" in r.stderr     # the run log goes to stderr
    hidden = read_output_hidden(out)
    ref, lengths = reference
    agreement = compare(hidden, ref, lengths)
    assert agreement.ok(), str(agreement)
    assert split_difference(hidden, baseline, ref, lengths) < 2e-2
    with h5py.File(out, "r") as f:
        assert "optimised" in f.attrs["placement"]


@pytest.fixture(scope="module")
def skewed(tiny_files, tmp_path_factory):
    """The tiny model with a gate bias that makes experts 0 and 1 win most tokens (max/mean
    load near 4), and 4,096 tokens so the balancer has micro-batches to act on."""
    weights, _ = tiny_files
    d = tmp_path_factory.mktemp("skewed")
    shutil.copy(weights, d / "w.h5")
    with h5py.File(d / "w.h5", "r+") as f:
        for layer in build_config({}).model.moe_layers:
            bias = np.zeros(8, np.float32)
            bias[:2] = [0.3, 0.15]
            f.create_dataset(f"layers/{layer}/gate_bias", data=bias)
    write_inputs(d / "in.h5", build_config({}).model, sequences=128, seq_len=32, seed=9)
    return d / "w.h5", d / "in.h5"


BALANCE = ["run.balance=true", "run.balance_threshold=1.5", "run.balance_gamma=0.03",
           "run.micro_batch_tokens=128", "run.chunk_sequences=32"]


def test_balancing_evens_a_skewed_load_and_reports_it(skewed, tmp_path):
    weights, inputs = skewed
    r = run(weights, inputs, tmp_path / "a.h5", *BALANCE, ranks=2)
    report = json.loads(r.stdout.strip().splitlines()[-1])["summary"]["balance"]
    assert len(report["blocks"]) == 3
    for block in report["blocks"]:
        assert block["before"] > 3.0, report           # the skew the gate bias makes
        assert block["after"] < 1.5, report            # under the threshold at the end
        assert block["updates"] >= 1
    assert "max/mean expert load" in r.stderr and "bias update(s)" in r.stderr
    with h5py.File(tmp_path / "a.h5", "r") as f:
        assert json.loads(f.attrs["balance"])["blocks"] == report["blocks"]
    # every rank makes the same updates from the reduced counts: a rerun is bit-identical
    run(weights, inputs, tmp_path / "b.h5", *BALANCE, ranks=2)
    np.testing.assert_array_equal(read_output_hidden(tmp_path / "a.h5"), read_output_hidden(tmp_path / "b.h5"))


def test_balancing_is_off_by_default(skewed, tmp_path):
    weights, inputs = skewed
    r = run(weights, inputs, tmp_path / "off.h5", "run.micro_batch_tokens=128", ranks=2)
    assert "balance" not in r.stdout + r.stderr
    with h5py.File(tmp_path / "off.h5", "r") as f:
        assert "balance" not in f.attrs
        stats = f["stats/expert_tokens"][()]
    assert (stats.max(axis=1) / stats.mean(axis=1) > 3.0).all()     # the model's own skew stays
