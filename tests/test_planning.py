"""Placement planning: the link model by hand, the EPLB-style pieces, the optimiser's search,
and the issue's claims at 64, 512 and 3,904 GPUs on seeded synthetic traces."""
import time
from collections import Counter

import numpy as np
import pytest

from moe_hpc.config.cluster import build_cluster, load_cluster
from moe_hpc.config.errors import ConfigError
from moe_hpc.config.roles import role_layout
from moe_hpc.config.run_config import ModelConfig, load_config
from moe_hpc.placement.file import make_placement
from moe_hpc.placement.greedy import (balanced_packing, coactivation_groups, greedy_placement,
                                      replicate_experts, slot_budget)
from moe_hpc.placement.links import layer_links, node_volumes, placement_metrics, row_bytes
from moe_hpc.placement.optimise import (construct, empty_state, local_search, make_copies, node_capacity,
                                        state_of)
from moe_hpc.placement.search import evaluate, plan_placements
from moe_hpc.placement.table import Placement
from moe_hpc.placement.traces import Trace
from moe_hpc.tools.tracegen import TraceShape, synthetic_trace

from helpers import REPO

SEED61 = load_config(REPO / "inputs" / "seed61.toml").model


def test_link_model_by_hand():
    # 2 nodes x 2 GPUs; sources GPU 0 (node 0) and GPU 3 (node 1); expert 0 on GPU 1, expert 1
    # replicated on GPUs 0 and 2
    holders = np.array([[1, -1], [0, 2]])
    counts = np.array([[10.0, 4.0],      # from GPU 0: 10 to e0, 4 to e1 (2 stay on GPU 0, 2 to GPU 2)
                       [6.0, 8.0]])      # from GPU 3: 6 to e0 (other node), 8 to e1 (4 to GPU 0, 4 to GPU 2)
    x = layer_links(holders, counts, np.array([0, 3]), gpus_per_node=2, nodes=2)
    np.testing.assert_allclose(x.gpu_up, [10, 0, 0, 4])          # 0->1 inside node 0; 3->2 inside node 1
    np.testing.assert_allclose(x.gpu_down, [0, 10, 4, 0])
    np.testing.assert_allclose(x.node_up, [2, 10])               # 0->2 leaves node 0; 3->1 and 3->0 leave node 1
    np.testing.assert_allclose(x.node_down, [10, 2])
    np.testing.assert_allclose(x.gpu_load, [6, 16, 6, 0])


def test_metrics_sum_busiest_link_over_layers():
    cluster = build_cluster({"cluster": {"nodes": 2, "gpus_per_node": 1}, "network": {"rails_per_node": 1}})
    model = ModelConfig(num_layers=2, first_dense_layers=0, num_experts=2, top_k=1, hidden_size=8)
    # both layers: source GPU 0 sends 30 tokens to expert 0 and 10 to expert 1
    trace = Trace(model, 2, np.array([0]), np.array([[[30, 10]], [[30, 10]]]), np.zeros((2, 2, 2), np.int64),
                  np.zeros((1, 2, 2), np.int64))
    local = Placement((((0,), (1,)), ((1,), (0,))), 2, 0, "test")   # layer 0 keeps e0 on GPU 0
    m = placement_metrics(local, trace, cluster)
    busiest = 10 + 30                                              # layer 0: 10 leave; layer 1: 30 leave
    assert m.max_link_tokens == busiest / 2
    assert m.max_link_ms == pytest.approx(1e3 * busiest * row_bytes(8) / cluster.node_bytes_per_s)
    assert m.inter_node_gb == pytest.approx(2 * busiest * row_bytes(8) / 1e9)
    assert m.gpu_max_over_mean == pytest.approx(40 / 40)


def test_replicate_experts_gives_copies_to_the_most_tokens_per_copy():
    count = replicate_experts(np.array([90.0, 30.0, 10.0]), 6, most=3)
    assert count.tolist() == [3, 2, 1] and count.sum() == 6
    assert replicate_experts(np.array([90.0, 1.0]), 10, most=3).tolist() == [3, 3]   # capped


def test_balanced_packing_respects_capacity_keys_and_balances():
    w = np.array([8.0, 7, 6, 5, 4, 3, 2, 1])
    pack = balanced_packing(w, np.array([4, 4]))
    assert np.bincount(pack).tolist() == [4, 4]
    assert abs(w[pack == 0].sum() - w[pack == 1].sum()) <= 2
    keyed = balanced_packing(np.array([5.0, 5, 1, 1]), np.array([2, 2]), keys=np.array([0, 0, 1, 1]))
    assert keyed[0] != keyed[1] and keyed[2] != keyed[3]


def test_coactivation_groups_keep_co_chosen_experts_together():
    co = np.zeros((4, 4))
    co[0, 2] = co[2, 0] = 50
    co[1, 3] = co[3, 1] = 40
    group = coactivation_groups(co, np.array([10.0, 9, 8, 7]), 2)
    assert group[0] == group[2] and group[1] == group[3] and group[0] != group[1]


def test_slot_budget_is_the_formulas_and_checks_memory():
    cluster = load_cluster(REPO / "inputs" / "cluster3904.toml")
    assert slot_budget(make_placement(SEED61, 3712, "disjoint"), cluster, SEED61) == 1
    assert slot_budget(make_placement(SEED61, 512), cluster, SEED61) == 58
    tiny_gpu = build_cluster({"cluster": {"nodes": 64, "gpus_per_node": 8}, "gpu": {"memory_gib": 0.1}})
    with pytest.raises(ConfigError, match="gpu.memory_gib"):
        slot_budget(make_placement(SEED61, 512), tiny_gpu, SEED61)


def small_disjoint_case():
    """16 MoE layers x 8 experts, one expert per GPU: 16 expert nodes + 2 dense nodes of 8."""
    model = ModelConfig(num_layers=17, first_dense_layers=1, num_experts=8, top_k=2)
    cluster = build_cluster({"cluster": {"nodes": 18, "gpus_per_node": 8}})
    roles = role_layout(144, 16)
    trace = synthetic_trace(model, 144, roles.dense_ranks, TraceShape(tokens_per_source=256), seed=3)
    return model, cluster, trace


def test_local_search_repairs_a_bad_start():
    model, cluster, trace = small_disjoint_case()
    formula = make_placement(model, 128, "disjoint")
    volumes = node_volumes(trace, 8, 18)
    count = np.ones((16, 8), np.int64)
    copies = make_copies(count, volumes)
    capacity = node_capacity(128, 8, 18, 1)
    state = state_of(formula, copies, volumes.sum(axis=1), capacity, 8)
    start = state.objective
    bound = np.maximum(trace.expert_tokens.max(axis=1), volumes.sum(axis=1).max(axis=1)).sum()
    state = local_search(copies, state, steps=5000)
    assert state.objective < 0.8 * start
    assert state.objective <= 1.05 * bound          # a copy cannot be split: this bound is tight
    assert (state.free == 0).all() and (np.bincount(state.node, minlength=18) <= capacity).all()
    fresh = construct(copies, empty_state(copies, volumes.sum(axis=1), capacity, 16 * 8))
    assert fresh.objective <= 1.05 * bound


def check_valid(p: Placement, slots: int, num_expert_ranks: int) -> None:
    per_gpu = Counter(g for row in p.ranks for h in row for g in h)
    assert max(per_gpu.values()) <= slots and set(per_gpu) <= set(range(num_expert_ranks))
    assert all(h and len(set(h)) == len(h) for row in p.ranks for h in row)


SCALES = [(64, 0), (512, 0), (3904, 192)]
SEARCH_STEPS = {64: 400, 512: 300, 3904: 2000}     # 3,904 converges long before its budget


@pytest.mark.parametrize("gpus, dense", SCALES, ids=[f"{g}gpus" for g, _ in SCALES])
def test_optimiser_beats_formula_by_30pct_and_is_no_worse_than_greedy(gpus, dense):
    cluster = load_cluster(REPO / "inputs" / f"cluster{gpus}.toml")
    trace = synthetic_trace(SEED61, gpus, role_layout(gpus, dense).dense_ranks, TraceShape(), seed=1)
    t0 = time.perf_counter()
    placements = plan_placements(SEED61, cluster, dense, trace, steps=SEARCH_STEPS[gpus])
    report = evaluate(placements, trace, cluster)
    wall = time.perf_counter() - t0
    ms = {name: m["max_link_ms"] for name, m in report["metrics"].items()}
    assert ms["optimised"] <= 0.7 * ms["formula"], report
    assert ms["optimised"] <= ms["greedy"] * (1 + 1e-12), report
    X = gpus - dense
    slots = slot_budget(placements["formula"], cluster, SEED61)
    for p in placements.values():
        check_valid(p, slots, X)
    if gpus == 3904:
        assert slots == 1, "one expert per GPU: the GPUs suffice"
        assert wall < 180, f"3,904-GPU planning and evaluation took {wall:.1f} s"   # ~2 s measured; generous for a loaded CI
    if gpus == 512:
        assert report["metrics"]["optimised"]["gpu_max_over_mean"] < 1.2   # replicas even it out
        assert any(len(h) > 8 for row in placements["optimised"].ranks for h in row)


def test_greedy_keeps_the_formulas_layout_per_layer():
    trace = synthetic_trace(SEED61, 3904, role_layout(3904, 192).dense_ranks, TraceShape(), seed=2)
    formula = make_placement(SEED61, 3712, "auto")
    greedy = greedy_placement(formula, trace, 8)
    for m in (0, 31, 57):
        assert {g for h in greedy.ranks[m] for g in h} == {g for h in formula.ranks[m] for g in h}
