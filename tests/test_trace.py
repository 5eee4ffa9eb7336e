"""Routing traces (format, checks, the synthetic generator) and the cluster description."""
import h5py
import numpy as np
import pytest

from moe_hpc.config.cluster import GIB, build_cluster, load_cluster
from moe_hpc.config.errors import ConfigError, InputError
from moe_hpc.config.run_config import ModelConfig
from moe_hpc.placement.greedy import expert_slots
from moe_hpc.placement.traces import TraceRecorder, pair_counts, read_trace, write_trace
from moe_hpc.tools.tracegen import TraceShape, check_shape, sample_distinct, synthetic_trace

from helpers import REPO, transform_dataset

MODEL = ModelConfig(num_layers=5, first_dense_layers=1, num_experts=16, top_k=2)


@pytest.fixture(scope="module")
def trace():
    return synthetic_trace(MODEL, 32, range(32), TraceShape(tokens_per_source=400, zipf=1.0, clusters=4,
                                                            affinity=0.6, drift=0.5), seed=5)


def test_counts_are_consistent(trace):
    M, E, k = MODEL.num_moe_layers, MODEL.num_experts, MODEL.top_k
    assert trace.source_expert.shape == (M, 32, E) and trace.window_tokens.shape == (4, M, E)
    tokens = 32 * 400
    assert (trace.expert_tokens.sum(axis=1) == tokens * k).all()
    assert (trace.coactivation.sum(axis=(1, 2)) == tokens * k * (k - 1)).all()  # each pair both ways
    np.testing.assert_array_equal(trace.coactivation, trace.coactivation.transpose(0, 2, 1))
    assert (np.diagonal(trace.coactivation, axis1=1, axis2=2) == 0).all()
    np.testing.assert_array_equal(trace.window_tokens.sum(axis=0), trace.expert_tokens)


def test_seeded(trace):
    again = synthetic_trace(MODEL, 32, range(32), TraceShape(tokens_per_source=400, zipf=1.0, clusters=4,
                                                             affinity=0.6, drift=0.5), seed=5)
    np.testing.assert_array_equal(again.source_expert, trace.source_expert)
    other = synthetic_trace(MODEL, 32, range(32), TraceShape(tokens_per_source=400), seed=6)
    assert not np.array_equal(other.source_expert, trace.source_expert)


def test_skew_clusters_affinity_and_drift(trace):
    load = trace.expert_tokens
    assert (load.max(axis=1) / load.mean(axis=1)).min() > 2.0       # Zipf skew (even load: ~1.1)
    co = trace.coactivation[0].astype(float)
    strongest = np.argsort(-co, axis=1)[:, :3]            # each expert's favourite partners ...
    partner_share = np.take_along_axis(co, strongest, 1).sum() / co.sum()
    assert partner_share > 0.5                            # ... take most of its co-activations
    first, last = trace.source_expert[0, :8].sum(0), trace.source_expert[0, -8:].sum(0)
    assert np.abs(first / first.sum() - last / last.sum()).sum() > 0.3          # sources differ
    w = trace.window_tokens[:, 0].astype(float)
    assert np.abs(w[0] / w[0].sum() - w[-1] / w[-1].sum()).sum() > 0.1          # popularity drifts


def test_sample_distinct_never_repeats():
    rng = np.random.default_rng(0)
    p = np.array([0.9, 0.05, 0.03, 0.02])
    picks = sample_distinct(rng, p, 5000, 3)
    assert (picks[:, 0] != picks[:, 1]).all() and (picks[:, 1] != picks[:, 2]).all()
    assert (picks[:, 0] != picks[:, 2]).all() and picks.max() < 4


def test_pair_counts():
    experts = np.array([[0, 2], [2, 0], [1, 2]])
    pc = pair_counts(experts, 3)
    assert pc[0, 2] == pc[2, 0] == 2 and pc[1, 2] == 1 and pc.sum() == 6


def test_recorder_windows_and_sources():
    rec = TraceRecorder(MODEL)
    for chunk in range(3):
        for layer in MODEL.moe_layers:
            rec.record(layer, np.array([[0, 1], [1, 2]]) if chunk < 2 else np.zeros((0, 2), np.int64))
    assert len(rec.windows) == 3 and rec.windows[2].sum() == 0
    assert rec.own[0].tolist()[:3] == [2, 4, 2] and rec.coactivation[0, 0, 1] == 2


def test_write_read_roundtrip(trace, tmp_path):
    path = tmp_path / "t.h5"
    write_trace(path, trace)
    back = read_trace(path, MODEL)
    np.testing.assert_array_equal(back.source_expert, trace.source_expert)
    np.testing.assert_array_equal(back.coactivation, trace.coactivation)
    assert back.world_size == 32 and not (tmp_path / "t.h5.tmp").exists()


def _edited(trace, tmp_path, edit):
    path = tmp_path / "bad_trace.h5"
    write_trace(path, trace)
    with h5py.File(path, "r+") as f:
        edit(f)
    return path


BAD_TRACES = [
    ("format", lambda f: f.attrs.__setitem__("format", "moe_hpc.input/1")),
    ("/coactivation", lambda f: f.__delitem__("coactivation")),
    ("/source_expert", transform_dataset("source_expert", lambda a: a[:, :, :8])),
    ("/window_tokens", transform_dataset("window_tokens", lambda a: -a)),
    ("/expert_tokens", transform_dataset("expert_tokens", lambda a: a + 1)),
    ("/source_expert", transform_dataset("source_expert", lambda a: a.astype(np.float32))),
    ("/source_ranks", transform_dataset("source_ranks", lambda a: a + 100)),
    ("world_size", lambda f: f.attrs.__setitem__("world_size", "many")),
    ("config", lambda f: f.attrs.__delitem__("config")),
]


@pytest.mark.parametrize("needle, edit", BAD_TRACES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_TRACES)])
def test_bad_trace_names_file_and_item(trace, tmp_path, needle, edit):
    path = _edited(trace, tmp_path, edit)
    with pytest.raises(InputError) as err:
        read_trace(path, MODEL)
    assert str(path) in str(err.value) and needle in str(err.value)


def test_trace_of_another_model_is_refused(trace, tmp_path):
    path = tmp_path / "t.h5"
    write_trace(path, trace)
    with pytest.raises(InputError, match="model.num_experts"):
        read_trace(path, ModelConfig(num_layers=5, first_dense_layers=1, num_experts=8))


def test_generator_knobs_are_checked():
    with pytest.raises(ConfigError, match="--clusters"):
        check_shape(TraceShape(clusters=3), 16)
    with pytest.raises(ConfigError, match="--cluster-share"):
        check_shape(TraceShape(cluster_share=1.5), 16)


def test_cluster_files():
    c = load_cluster(REPO / "inputs" / "cluster3904.toml")
    assert c.num_gpus == 3904 and c.gpus_per_node == 8
    assert c.node_bytes_per_s == 8 * 50e9 and c.gpu_bytes_per_s == 450e9
    seed61 = ModelConfig(hidden_size=7168, moe_ffn_hidden_size=2048, num_experts=64)
    assert expert_slots(c, seed61) == int(74.5 * GIB * 0.5 // (2 * (2 * 7168 * 2048 + 2048 + 7168)))
    seed = load_cluster(REPO / "inputs" / "cluster_seed3904.toml")          # one rail per GPU by default
    assert seed.node_bytes_per_s == 8 * 50e9 and seed.gpu_bytes_per_s == 300e9


@pytest.mark.parametrize("text, needle", [
    ("[cluster]\nnodez = 2\n", "cluster.nodez"),
    ("[cluster]\nnodes = 0\n", "cluster.nodes"),
    ("[cluster]\nnodes = 2.5\n", "cluster.nodes"),
    ("[cluster]\nnodes = 2\ngpus_per_node = 2\n[network]\ninter_node_gb_s = -1\n", "network.inter_node_gb_s"),
    ("[cluster]\nnodes = 2\ngpus_per_node = 2\n[gpu]\nexpert_memory_fraction = 2\n", "gpu.expert_memory_fraction"),
    ("[cluster]\nnodes = 2\n", "cluster.gpus_per_node is required"),
    ("[cluster]\nnodes = 2\ngpus_per_node = 2\n[gpu]\noverlap_loss = 1.5\n", "gpu.overlap_loss"),
    # the retired placement-only form: one error naming the key to use instead
    ("[intra_node]\nbandwidth_gb_per_s = 450.0\n", "use network.intra_node_gb_s"),
    ("[inter_node]\nrails = 8\n", "use network.inter_node_gb_s (per rail), network.rails_per_node"),
    ("[cluster]\nnodes = 2\ngpus_per_node = 2\ngpu_memory_gb = 80.0\n", "use gpu.memory_gib"),
    ("[fabric]\nkind = 1\n", "fabric"),
    ("[cluster\n", "not valid TOML"),
])
def test_bad_cluster_file_names_file_and_key(tmp_path, text, needle):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_cluster(path)
    assert str(path) in str(err.value) and needle in str(err.value)
    with pytest.raises(ConfigError, match="cannot read"):
        load_cluster(tmp_path / "missing.toml")


def test_cluster_defaults():
    c = build_cluster({"cluster": {"nodes": 1, "gpus_per_node": 4}})
    assert c.nodes == 1 and c.rails == 4 and c.node_bytes_per_s == 4 * c.network.inter_node_gb_s * 1e9
