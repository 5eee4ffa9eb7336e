"""DAGs: the verifier passes on every DAG of both seed layouts (and small ones), and catches a
cycle, a shape mismatch, an operation on no GPU and a misplaced expert; DOT without Graphviz."""
import dataclasses

import pytest

import moe_hpc.planner.dag as dag_mod
from moe_hpc.config.cluster import build_cluster, load_cluster
from moe_hpc.config.run_config import build_config, load_config
from moe_hpc.planner.dag import Edge, all_dags, layer_dag, to_dot, verify, write_dags
from moe_hpc.planner.deployment import make_layout
from moe_hpc.planner.workload import workload_of

from helpers import REPO

SEED61 = REPO / "inputs" / "seed61.toml"


def seed(cluster: str):
    cfg, cl = load_config(SEED61, ["run.chunk_sequences=1"]), load_cluster(REPO / "inputs" / cluster)
    layout = make_layout(cfg, cl)
    return layout, workload_of(cfg, cl)


def tiny(gpus: int, dense: int, placement: str):
    cfg = build_config({"parallel": {"placement": placement}}, where="<tiny>")
    cl = build_cluster({"cluster": {"nodes": 1, "gpus_per_node": gpus},
                        "deployment": {"dense_gpus": dense, "seq_len": 16}}, "<c>")
    return make_layout(cfg, cl), workload_of(cfg, cl)


@pytest.mark.parametrize("layout, w", [seed("cluster_seed128.toml"), seed("cluster_seed3904.toml"),
                                       tiny(4, 1, "shared"), tiny(30, 2, "disjoint"), tiny(2, 0, "auto")])
def test_every_dag_verifies(layout, w):
    dags = all_dags(layout, w)
    assert len(dags) == 3
    for d in dags:
        assert verify(d, layout) == [], d.name
    # the whole deployment stays readable however many GPUs: at most 8 bands of 3 nodes, plus 4
    assert len(dags[0].nodes) <= 3 * dag_mod.MAX_BANDS + 4


def test_split_dense_side_draws_its_stages_and_tp():
    """dense_tp 2 x 2 stages on 8 dense GPUs: each stage's nodes run on its own dense ranks, the
    hand-over between stages is a dashed edge from a send node, the TP all-reduce is named."""
    from moe_hpc.planner.dag import deployment_dag
    cfg = build_config({"parallel": {"placement": "disjoint", "dense_tp": 2, "dense_stages": 2}}, where="<tiny>")
    cl = build_cluster({"cluster": {"nodes": 1, "gpus_per_node": 16},
                        "deployment": {"dense_gpus": 8, "seq_len": 16}}, "<c>")
    layout, w = make_layout(cfg, cl), workload_of(cfg, cl)
    d = deployment_dag(layout, w)
    assert verify(d, layout) == []
    roles = layout.roles
    stage = {s: {r for r in roles.dense_ranks if roles.stage_of(r) == s} for s in (0, 1)}
    sends = [n for n in d.nodes.values() if n.id.startswith("send")]
    assert len(sends) == 1 and set(sends[0].gpus) == stage[0]
    assert any(e.src == sends[0].id and e.comm for e in d.edges)
    assert set(d.nodes["dense0"].gpus) == stage[0]                # block 0 (dense) is stage 0's
    assert set(d.nodes["output"].gpus) == stage[1]
    assert all("all-reduce" in n.note for n in d.nodes.values() if n.id.endswith("_gate"))


def test_every_moe_block_of_the_3904_layout_verifies():
    layout, w = seed("cluster_seed3904.toml")
    for layer in layout.model.moe_layers:
        assert verify(layer_dag(layout, w, layer), layout) == []


@pytest.fixture
def broken():
    layout, w = seed("cluster_seed3904.toml")
    return layout, layer_dag(layout, w, 3)


def test_cycle_is_caught(broken):
    layout, d = broken
    d.edges.append(Edge("sum", "attention", (d.nodes["sum"].outputs[0])))
    d.nodes["sum"].outputs += d.nodes["sum"].outputs            # shapes still agree: only the cycle is wrong
    d.nodes["attention"].inputs += d.nodes["attention"].inputs
    problems = verify(d, layout)
    assert len(problems) == 1 and problems[0].startswith("cycle through attention")


def test_shape_mismatch_is_caught(broken):
    layout, d = broken
    i = next(i for i, e in enumerate(d.edges) if (e.src, e.dst) == ("gate", "topk"))
    d.edges[i] = dataclasses.replace(d.edges[i], shape=(4096, 63))
    problems = verify(d, layout)
    assert problems == ["gate: output shapes edges carry [(4096, 63)] where the node takes [(4096, 64)]",
                        "topk: input shapes edges carry [(4096, 63)] where the node takes [(4096, 64)]"]


def test_unassigned_op_is_caught(broken):
    layout, d = broken
    d.nodes["plan"].gpus = ()
    d.nodes["e5_g5"].gpus = (layout.world_size,)                 # a GPU the deployment does not have
    assert verify(d, layout) == ["plan (plan: sort by (rank, expert)) is not on a GPU of the deployment",
                                 "e5_g5 (expert 5) is not on a GPU of the deployment"]


def test_misplaced_and_unreachable_are_caught(broken):
    layout, d = broken
    d.nodes["e5_g5"].experts = ((3, 5, 6),)                      # expert 5 claimed on GPU 6
    d.edges = [e for e in d.edges if e.src != "input"]
    d.nodes["input"].outputs = ()
    d.nodes["attention"].inputs = ()
    problems = verify(d, layout)
    assert any("not reachable from input" in p and p.startswith("attention") for p in problems)
    assert problems[-1].startswith("experts differ from the placement: 1 missing (e.g. [(3, 5, 5)]), 1 extra")


def test_dot_without_graphviz(tmp_path, monkeypatch):
    layout, w = tiny(4, 1, "shared")
    monkeypatch.setattr(dag_mod.shutil, "which", lambda name: None)
    written, svg = write_dags(all_dags(layout, w), layout, tmp_path, "tiny")
    assert not svg and [p.suffix for p in written] == [".dot"] * 3
    text = to_dot(all_dags(layout, w)[1], layout)
    assert 'style=dashed' in text and "GPU 0" in text and "[1024, 64]" in text
