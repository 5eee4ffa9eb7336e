"""The planner: the layout is the runner's own (same functions), memory and FLOPs by hand for the
tiny model, refusal when memory does not fit, bad cluster files, and the calibration target."""
import dataclasses
import json
from types import SimpleNamespace

import pytest

import moe_hpc.planner.deployment as plan_mod
from moe_hpc.comm.exchange import SLOT_ROUND, slot_rows
from moe_hpc.config.cluster import build_cluster, load_cluster
from moe_hpc.config.errors import ConfigError, InputError
from moe_hpc.config.roles import role_layout
from moe_hpc.config.run_config import ModelConfig, build_config, load_config
from moe_hpc.model.flops import flops_per_token, model_flops
from moe_hpc.placement.file import make_placement
from moe_hpc.placement.search import place
from moe_hpc.placement.table import gpu_to_node
from moe_hpc.placement.traces import read_trace
from moe_hpc.planner.calibrate import fit, load_measured, measured_flash, measured_layer, predict_forward, predict_layer
from moe_hpc.planner.deployment import make_layout, rank_rows
from moe_hpc.planner.memory import (activation_bytes, dense_weight_bytes, expert_weight_bytes, plan_memory,
                                   token_buffer_bytes)
from moe_hpc.planner.report import build, experts_text, run_plan
from moe_hpc.planner.time_model import Rates, attention, kernel
from moe_hpc.planner.workload import Workload, workload_of
from moe_hpc.tools.tracegen import TraceShape, make_trace_file

from helpers import REPO, moe_hpc

SEED61 = REPO / "inputs" / "seed61.toml"
C128, C3904 = REPO / "inputs" / "cluster_seed128.toml", REPO / "inputs" / "cluster_seed3904.toml"
FITS = ["run.chunk_sequences=1"]          # the seed config's 16-sequence chunks do not fit 64 GiB


def plan_args(cluster, tmp_path, *extra_set, measured=(), fmt="table"):
    return SimpleNamespace(config=str(SEED61), cluster=str(cluster), placement=None, format=fmt, dot=None,
                           table=str(tmp_path / "ranks.tsv"), measured=list(measured), validate=[],
                           set=list(extra_set))


@pytest.mark.parametrize("cluster, X, D", [(C128, 64, 0), (C3904, 3712, 192)])
def test_layout_calls_the_runners_functions(cluster, X, D, monkeypatch):
    calls = []

    def spy(fn):
        def wrapped(*a, **k):
            calls.append(fn.__name__)
            return fn(*a, **k)
        return wrapped
    monkeypatch.setattr(plan_mod, "make_placement", spy(make_placement))
    monkeypatch.setattr(plan_mod, "role_layout", spy(role_layout))
    cfg, cl = load_config(SEED61, FITS), load_cluster(cluster)
    layout = make_layout(cfg, cl)
    assert calls == ["role_layout", "make_placement"]
    group = cl.num_gpus // cl.deployment.data_parallel
    assert layout.roles == role_layout(group, D)
    assert layout.placement == make_placement(cfg.model, X, "auto")
    rows = rank_rows(layout)
    assert len(rows) == cl.num_gpus
    for row in rows[::97] + rows[-3:]:
        local = row.rank % group
        assert row.node == gpu_to_node(row.rank, 8)
        assert row.role == layout.roles.role_of(local)
        g = row.expert_rank
        assert list(row.experts) == (layout.placement.experts_on(g) if g >= 0 else [])


def test_seed_table_pins_in_the_plan():
    layout = make_layout(load_config(SEED61, FITS), load_cluster(C3904))
    rows = rank_rows(layout)
    assert (rows[63].node, rows[63].experts) == (7, ((3, 63),))
    assert (rows[3648].node, rows[3648].experts) == (456, ((60, 0),))
    assert {r.role for r in rows[3712:]} == {"dense"} and (rows[3712].node, rows[-1].node) == (464, 487)
    dp = rank_rows(make_layout(load_config(SEED61, FITS), load_cluster(C128)))
    assert experts_text(dp[64].experts) == "L3-60:e0" and (dp[64].replica, dp[64].node) == (1, 8)


def test_tiny_memory_and_flops_by_hand():
    m = ModelConfig()          # H 64, 4 blocks (1 dense), 4 heads x 16, Fd 256, F 128, E 8, top-2
    # per block: wq, wk, wv, wo 4 x 64 x 64 + 2 norms of 64 = 16512; dense MLP 64x256 + 256 + 256x64 + 64
    # = 33088; each MoE block: gate 512 + b2 [8, 64] 512 (bf16) + gate_bias 8 fp32; final_norm 64
    assert dense_weight_bytes(m) == 2 * (4 * 16512 + 33088 + 3 * 1024 + 64) + 3 * 8 * 4 == 204640
    assert expert_weight_bytes(m, 1) == 2 * (64 * 128 + 128 + 128 * 64) == 33024
    assert expert_weight_bytes(m, 3, tp=2) == 3 * 16512
    f = flops_per_token(m, 16)
    assert (f["projections"], f["attention_core"], f["dense_mlp"], f["gate"], f["experts"]) == \
        (2 * 64 * 16 * 16, 2 * 2 * 4 * 16 * 8, 2 * 2 * 64 * 256, 2 * 64 * 8, 2 * 2 * 2 * 64 * 128)
    assert model_flops(m, 16) == 4 * (32768 + 2048) + 65536 + 3 * (1024 + 65536) == 404480
    w = Workload(sequences=1, seq_len=16, micro_batch_tokens=8)
    assert (w.tokens, w.micro_batches, w.mb_tokens) == (16, 2, 8)
    # two slots x (dispatch-send + combine-recv 16 rows, dispatch-recv + combine-send 24 rows) x H bf16
    # + the [24, F] hidden buffer
    assert token_buffer_bytes(m, w, 16, 24) == 2 * 2 * (16 + 24) * 64 * 2 + 24 * 128 * 2 == 26624
    assert slot_rows(10, 2, 0.12) == 2 * SLOT_ROUND and slot_rows(0, 2, 0.12) == 0


def test_memory_of_a_small_deployment_by_hand():
    cfg = build_config({"run": {"chunk_sequences": 2}}, where="<tiny>")
    cl = build_cluster({"cluster": {"nodes": 1, "gpus_per_node": 4}, "deployment": {"dense_gpus": 1, "seq_len": 16},
                        "gpu": {"reserved_gib": 0}, "network": {"transport_buffer_gib": 0}}, "<c>")
    layout = make_layout(cfg, cl)
    w = workload_of(cfg, cl, slot_padding=0.0)
    mem = plan_memory(cfg, cl, layout, w)
    assert [g.role for g in mem] == ["expert", "expert", "expert", "dense"]
    # 3 expert ranks < 24 slots: shared placement, rank 0 hosts experts 0, 3, 6 of 3 blocks
    assert mem[0].experts == 9 and mem[0].memory.expert_weights == 9 * 33024
    # the dense rank routes 32 tokens x 2 rows; rank 0 gets 3 of 8 experts' rows: 3 slots of SLOT_ROUND
    assert mem[3].memory.token_buffers == 2 * 64 * 64 * 2
    assert mem[0].memory.token_buffers == 2 * 3 * SLOT_ROUND * 64 * 2 + 3 * SLOT_ROUND * 128 * 2
    assert mem[3].memory.dense_weights == 204640 and mem[0].memory.dense_weights == 0


def test_one_rank_holds_no_send_buffers():
    """A group of one rank moves its rows itself (MoeLayer._local_step): the experts' input and
    output buffers only, one per direction, however many micro-batches."""
    cfg = build_config({"run": {"chunk_sequences": 4, "micro_batch_tokens": 16}}, where="<tiny>")
    cl = build_cluster({"cluster": {"nodes": 1, "gpus_per_node": 1}, "deployment": {"seq_len": 16}}, "<c>")
    w = workload_of(cfg, cl, slot_padding=0.0)
    assert w.micro_batches == 4
    (mem,) = plan_memory(cfg, cl, make_layout(cfg, cl), w)
    m = cfg.model
    extent = slot_rows(16 * m.top_k, m.num_experts, 0.0)        # a block's experts, all on this rank
    assert mem.role == "dense+expert"
    assert mem.memory.token_buffers == 2 * extent * m.hidden_size * 2 + extent * m.moe_ffn_hidden_size * 2
    assert mem.memory.token_buffers < token_buffer_bytes(m, w, 16 * m.top_k, extent)      # two ranks' layout


def test_refusal_names_the_fix(tmp_path):
    """An explicit dense TP that does not fit is refused, with what would fit."""
    small = tmp_path / "small.toml"
    small.write_text(C3904.read_text().replace("memory_gib = 64.0", "memory_gib = 36.0"))
    out = []
    with pytest.raises(ConfigError, match="does not fit: a dense GPU needs .* GiB of 36 GiB"):
        run_plan(plan_args(small, tmp_path, "parallel.dense_tp=2"), out=out.append)
    assert "DOES NOT FIT" in out[0] and "--set run.chunk_sequences=" in out[0]
    assert "--set parallel.dense_tp=4, fits" in out[0]
    r = build(plan_args(small, tmp_path, "parallel.dense_tp=4"))
    assert r["fits"] and r["time"]["step_s"] > 0


@pytest.mark.parametrize("config, cluster", [(SEED61, C3904), (SEED61, C128), (REPO / "inputs" / "seed16.toml", C3904)])
def test_seed_deployments_plan_without_refusal(config, cluster, tmp_path):
    """The seeds' own configs: where one dense GPU cannot hold the blocks, the planner splits
    them by dense TP, says so, and every GPU fits; the DAGs verify."""
    args = plan_args(cluster, tmp_path)
    args.config = str(config)
    r = run_plan(args, out=lambda s: None)
    assert r["fits"] and all(not d["problems"] for d in r["dags"])
    assert max(v["gib"]["total"] for v in r["memory"].values()) <= 64
    if config == SEED61:
        assert r["chose"]["parallel.dense_tp"] == 2
        dense = r["memory"]["dense" if "dense" in r["memory"] else "dense+expert"]
        assert dense["gib"]["dense_weights"] == pytest.approx(54.95 / 2, rel=0.01)


def test_both_seed_plans_print_quickly(tmp_path):
    for cluster in (C128, C3904):
        r = run_plan(plan_args(cluster, tmp_path, *FITS, fmt="json"), out=lambda s: json.loads(s))
        # "in seconds" on a loaded 2-core CI machine: about 1 s measured; the bound only catches a blow-up
        assert r["planner_seconds"] < 60 and all(not d["problems"] for d in r["dags"])
        assert sum(r["time"]["shares"].values()) == pytest.approx(1.0)
        assert (tmp_path / "ranks.tsv").read_text().count("\n") == r["gpus"] + 1


@pytest.mark.parametrize("tables, message", [
    ({"cluster": {"nodes": 2}}, "f.toml: cluster.gpus_per_node is required"),
    ({"cluster": {"nodes": 2, "gpus_per_node": 8}, "gpu": {"mfu": 1.5}}, r"f.toml: gpu.mfu must be in \(0, 1\]"),
    ({"cluster": {"nodes": 2, "gpus_per_node": 8}, "network": {"speed": 1}}, "f.toml: unknown key network.speed"),
    ({"cluster": {"nodes": "2", "gpus_per_node": 8}}, "f.toml: cluster.nodes must be an integer"),
    ({"cluster": {"nodes": 2, "gpus_per_node": 8}, "links": {}}, r"f.toml: unknown table \[links\]"),
    ({"cluster": {"nodes": 2, "gpus_per_node": 8}, "deployment": {"data_parallel": 3}},
     "f.toml: deployment.data_parallel"),
])
def test_bad_cluster_tables(tables, message):
    with pytest.raises(ConfigError, match=message):
        build_cluster(tables, "f.toml")


def test_bad_cluster_file_is_one_error_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[cluster]\nnodes = 2\ngpus_per_node = 8\n[gpu]\nmemory_tb_s = -1\n")
    r = moe_hpc("plan", SEED61, "--cluster", bad, "--table", tmp_path / "t.tsv")
    assert r.returncode == 1 and r.error_lines == [f"error: {bad}: gpu.memory_tb_s must be > 0, got -1.0"]
    assert "Traceback" not in r.stderr


def test_roofline_step():
    r = Rates(gemm=1e12, attention=1e12, memory=1e9, copy=1e9, launch=1e-5, sync=1e-3)
    assert kernel(r, 2e12, 1e9, 3, syncs=1) == pytest.approx({"compute": 2.0, "communication": 0.0,
                                                                "synchronisation": 1e-3, "overhead": 3e-5})


HELD_OUT = [("bench_h200_1_mb2.json", SEED61),                  # other micro-batch count
            ("bench_h100_1_nccl_mb4.json", SEED61),             # other GPU, four micro-batches
            ("bench_h200_seed16.json", REPO / "inputs" / "seed16.toml")]   # other model


@pytest.mark.parametrize("name, config", HELD_OUT, ids=[n for n, _ in HELD_OUT])
def test_calibrated_layer_within_25_percent_on_a_bench_it_was_not_fitted_on(name, config):
    cl = load_cluster(C128)
    results = REPO / "benchmarks" / "results"
    gpu = fit(cl, [load_measured(results / "bench_h200_1_mb1.json", cl, SEED61)])
    assert 0.3 < gpu.mfu <= 1 and 0.3 < gpu.memory_util <= 1
    held_out = load_measured(results / name, cl, config)
    got, want = predict_layer(cl, held_out, gpu)["t_layer_ms"], measured_layer(held_out)["t_layer_ms"]
    assert abs(got / want - 1) < 0.25, (got, want)


def test_planner_plans_the_attention_core_the_runner_runs():
    """auto or cudnn with plain q/k/v projections: cuDNN's fused flash core (what a GPU run with
    the [gpu] extras takes); tiles when asked, or for layers the fused path does not run."""
    cl = load_cluster(C128)
    seed = load_config(SEED61)
    assert workload_of(seed, cl).flash
    assert not workload_of(dataclasses.replace(seed, run=dataclasses.replace(seed.run, attention="tiles")), cl).flash
    for change in ({"attention_bias": True}, {"qk_norm": "head"}):
        assert not workload_of(dataclasses.replace(seed, model=dataclasses.replace(seed.model, **change)), cl).flash
    assert not workload_of(load_config(REPO / "inputs" / "deepseek_v3.toml"), cl).flash     # MLA


def test_a_runs_memory_check_counts_the_core_the_run_will_take(monkeypatch):
    """The CPU tiles; a GPU takes cuDNN's core when asked for, or for auto when its frontend is
    installed, and tiles when told to."""
    import numpy as np
    import moe_hpc.model.attention as attention_mod
    cpu, gpu = SimpleNamespace(xp=np), SimpleNamespace(xp=object())
    assert not any(attention_mod.fused_core_expected(c, cpu) for c in ("auto", "cudnn", "tiles"))
    assert attention_mod.fused_core_expected("cudnn", gpu) and not attention_mod.fused_core_expected("tiles", gpu)
    for installed in (True, False):
        monkeypatch.setattr(attention_mod, "cudnn_frontend_present", lambda: installed)
        assert attention_mod.fused_core_expected("auto", gpu) == installed


def test_flash_core_has_the_tiles_flops_and_none_of_their_traffic():
    m = load_config(SEED61).model
    tiles, flash = Workload(4, 4096, 16384), Workload(4, 4096, 16384, flash=True)
    free_memory = Rates(gemm=5e14, attention=3e14, memory=1e30, copy=1e30, launch=0.0, sync=0.0)
    assert attention(m, flash, 512, free_memory)["compute"] == pytest.approx(attention(m, tiles, 512, free_memory)["compute"])
    r = Rates(gemm=5e14, attention=3e14, memory=3e12, copy=2e12, launch=1e-5, sync=1e-5)
    assert attention(m, flash, 512, r)["compute"] < attention(m, tiles, 512, r)["compute"]
    # no score tiles: neither its time nor its memory depends on the tile size
    assert attention(m, flash, 128, r) == attention(m, flash, 1024, r)
    assert activation_bytes(m, flash, 128) == activation_bytes(m, flash, 1024) < activation_bytes(m, tiles, 512)
    assert activation_bytes(m, tiles, 128) != activation_bytes(m, tiles, 1024)


def test_attention_rate_is_the_fused_cores_measured_rate():
    """A bench file of the fused core carries that core's TFLOP/s: the fit takes it as it is,
    and the whole forward of another shape, never fitted, comes out near its measurement. A
    file from before the fused core (no model.dense) is planned with the tiles it ran."""
    cl, results = load_cluster(C128), REPO / "benchmarks" / "results"
    trained = load_measured(results / "model_1gpu_16x1024_packed.json", cl, SEED61)
    gpu = fit(cl, [trained])
    core = trained.bench["model"]["dense"]["attention_core_tflops"]
    assert gpu.attention_mfu == pytest.approx(core / trained.peak_tflops)
    assert measured_flash(trained) and not measured_flash(load_measured(results / "bench_h200_model.json", cl, SEED61))
    held_out = load_measured(results / "model_1gpu_4x4096.json", cl, SEED61)
    got, want = predict_forward(cl, held_out, gpu), held_out.bench["model"]["t_forward_s"]
    assert abs(got / want - 1) < 0.15, (got, want)


def test_an_attention_rate_is_used_only_for_the_core_it_was_measured_on(tmp_path):
    """The seed plan runs the fused core: a rate fitted on the tiled core's forward (a file from
    before the fused core) leaves the cluster file's attention_mfu standing; the fused core's own
    measured rate is used."""
    results = REPO / "benchmarks" / "results"
    tiled = build(plan_args(C128, tmp_path, *FITS, measured=[results / "bench_h200_1_mb1.json",
                                                             results / "bench_h200_model.json"]))
    fused = build(plan_args(C128, tmp_path, *FITS, measured=[results / "model_1gpu_16x1024_packed.json"]))
    assert not tiled["calibration"]["attention_mfu_used"] and fused["calibration"]["attention_mfu_used"]
    assert tiled["calibration"]["constants"]["attention_mfu"] < 0.05       # the tiles' score traffic, fitted
    assert tiled["gpu"]["attention_mfu"] == load_cluster(C128).gpu.attention_mfu
    assert fused["gpu"]["attention_mfu"] == pytest.approx(fused["calibration"]["constants"]["attention_mfu"])


def test_calibration_refuses_a_transport_it_does_not_model():
    cl = load_cluster(C128)
    with pytest.raises(InputError, match="planner models the nccl transport only"):
        load_measured(REPO / "benchmarks" / "results" / "bench_h100_2ranks_1gpu_staged_cma.json", cl, SEED61)


CLUSTER_FILES = sorted((REPO / "inputs").glob("cluster*.toml"))


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_every_cluster_file_serves_make_trace_place_and_plan(path, tmp_path):
    """One schema: each file in inputs/ is read by make-trace, place and plan alike, and all three
    take the dense GPUs from its [deployment] when it names them."""
    cluster = load_cluster(path)
    cfg = load_config(SEED61, FITS)
    dense = max(cluster.deployment.dense_gpus, 0)
    trace_path = tmp_path / "trace.h5"
    make_trace_file(cfg, path, trace_path, TraceShape(tokens_per_source=16, windows=1), seed=0, overwrite=False)
    trace = read_trace(trace_path, cfg.model)
    assert trace.world_size == cluster.num_gpus
    assert len(trace.source_ranks) == (dense or cluster.num_gpus)       # the dense GPUs route
    placements, report = place(cfg, path, trace_path, steps=20, seconds=30.0)
    assert set(placements) == {"formula", "greedy", "optimised"} and report["gpus"] == cluster.num_gpus
    assert report["dense_ranks"] == dense
    plan = build(plan_args(path, tmp_path))
    assert plan["gpus"] == cluster.num_gpus and all(not d["problems"] for d in plan["dags"])


@pytest.mark.parametrize("name", ["ep_4gpu_mb2.json", "ep_2gpu_mb2.json", "ep_4gpu_dp2_mb2.json"])
def test_one_gpu_calibration_predicts_the_multi_gpu_layer_within_15_percent(name):
    """Fitted on the 1-GPU bench only; the 2- and 4-GPU runs of the same session are held out
    (gpu.overlap_loss, the one constant a single GPU cannot show, is the cluster file's)."""
    cl = load_cluster(C128)
    results = REPO / "benchmarks" / "results"
    gpu = fit(cl, [load_measured(results / "ep_1gpu_mb1.json", cl, SEED61)])
    held_out = load_measured(results / name, cl, SEED61)
    got, want = predict_layer(cl, held_out, gpu)["t_layer_ms"], measured_layer(held_out)["t_layer_ms"]
    assert abs(got / want - 1) < 0.15, (got, want)


def test_plan_takes_data_parallelism_from_the_config_or_the_cluster(tmp_path):
    """One rule for replicas: the cluster's deployment.data_parallel when above 1, else the
    config's parallel.dp; two different counts are refused, naming both."""
    cfg, c128, c3904 = load_config(SEED61, FITS), load_cluster(C128), load_cluster(C3904)
    assert make_layout(cfg, c128).replicas == 2
    two = load_config(SEED61, FITS + ["parallel.dp=2"])
    assert make_layout(two, c128).replicas == 2
    one_replica = tmp_path / "one.toml"
    one_replica.write_text(C128.read_text().replace("data_parallel = 2", "data_parallel = 1"))
    assert make_layout(two, load_cluster(one_replica)).replicas == 2
    with pytest.raises(ConfigError, match=r"data_parallel = 2 but the config's parallel\.dp = 4"):
        make_layout(load_config(SEED61, FITS + ["parallel.dp=4"]), c128)
    assert make_layout(cfg, c3904).replicas == 1


def test_stage_time_follows_the_engines_lockstep_schedule(tmp_path):
    """Two stages: one wave runs the blocks one after another (the sum of all blocks, plus the
    hand-over); more waves let the stages overlap, but never below the busier stage's work."""
    from moe_hpc.planner.time_model import step_time
    cl = load_cluster(C3904)
    for waves in (1, 4, 64):     # waves are at most run.chunk_sequences (16 in seed61.toml: raised to 64)
        cfg = load_config(SEED61, ["parallel.dense_stages=2", "run.chunk_sequences=64", f"run.pipeline_waves={waves}"])
        lay = make_layout(cfg, cl)
        step = step_time(cfg, cl, lay, workload_of(cfg, cl))
        blocks, send = sum(b.seconds for b in step.blocks), step.send_s
        if waves == 1:
            assert step.seconds == pytest.approx(blocks + send)
        else:
            assert max(step.stage_seconds) <= step.seconds + 1e-9 < blocks + send
    assert step.seconds < 0.8 * (blocks + send)          # 64 waves: about twice the blocks per stage
    assert build(plan_args(C3904, tmp_path, "parallel.dense_tp=2"))["time"]["stages_s"] is None


def test_pipeline_stages_split_the_dense_weights(tmp_path):
    """A dense GPU of stage s holds its stage's blocks only (embedding with the first, the final
    norm with the last): two stages halve the 61-layer model's dense weights as dense TP does."""
    r = build(plan_args(C3904, tmp_path, "parallel.dense_stages=2"))
    assert r["fits"] and "chose" not in r and all(not d["problems"] for d in r["dags"])
    assert r["memory"]["dense"]["gib"]["dense_weights"] == pytest.approx(54.95 / 2, rel=0.03)
    cfg = load_config(SEED61, ["parallel.dense_stages=2"])
    lay = make_layout(cfg, load_cluster(C3904))
    assert lay.roles.stage_of(3712) == 0 and lay.roles.stage_of(3903) == 1 and len(lay.routers) == 96
    # a later stage's MoE blocks are routed from that stage's GPUs (the link model's sources)
    last = lay.routers_of(cfg.model.num_layers - 1)
    assert len(last) == 96 and all(lay.roles.stage_of(r) == 1 for r in last)
    assert lay.routers_of(0) == lay.routers


def test_dense_weights_count_the_head_for_logprobs_and_a_tied_copy():
    """load_weights reads lm_head for logits or log-probs; a tied head is a transposed copy of
    embed on the last stage: both are memory the planner must count."""
    tied = build_config({"model": {"vocab_size": 100, "tie_embeddings": True}}, where="<t>").model
    H, V = tied.hidden_size, tied.vocab_size
    assert dense_weight_bytes(tied, True) - dense_weight_bytes(tied, False) == H * V * 2
    cfg = load_config(SEED61, ["model.vocab_size=1000", "run.logprobs=true"])
    cl = load_cluster(C128)
    with_head = plan_memory(cfg, cl, make_layout(cfg, cl), workload_of(cfg, cl))
    off = load_config(SEED61, ["model.vocab_size=1000"])
    without = plan_memory(off, cl, make_layout(off, cl), workload_of(off, cl))
    dense = lambda mem: max(g.memory.dense_weights for g in mem)
    assert dense(with_head) - dense(without) == 7168 * 1000 * 2


def test_smallest_fit_searches_past_a_world_of_64_ranks_or_more():
    """A world already at the one-by-one search's end still gets counts past it (it raised
    IndexError at 64 ranks, an internal error instead of the refusal)."""
    from moe_hpc.config.run_config import load_config
    from moe_hpc.planner.fit import rank_memory, smallest_fit
    cfg = load_config(REPO / "inputs" / "seed61.toml", [])
    need = max(m.total for m in rank_memory(cfg, 64, 4096))
    found = smallest_fit(cfg, 64, 4096, need - 1)
    assert found is None or found > 64


def test_kv_cache_by_hand_for_the_tiny_model():
    """tiny: 4 layers, 4 kv heads of 16: k and v in bf16 are 2 x 4 x 16 x 2 = 256 bytes a
    position and block; a dense-TP member holds half the heads, a stage half the blocks."""
    from moe_hpc.planner.memory import kv_cache_bytes, kv_cache_bytes_per_token
    m = load_config(REPO / "inputs" / "tiny.toml").model
    assert kv_cache_bytes_per_token(m) == 2 * 4 * 16 * 2
    assert kv_cache_bytes(m, 4, 24 + 8) == 4 * 32 * 4 * 256
    assert kv_cache_bytes(m, 4, 32, dense_tp=2) == 4 * 32 * 4 * 128
    assert kv_cache_bytes(m, 4, 32, stage=1, stages=2) == 4 * 32 * 2 * 256


def test_memory_check_counts_a_generate_jobs_kv_cache_and_says_how_many_sequences_fit():
    """Under a limit the weights fit but the KV cache of 4 sequences x (24 + 8) positions does
    not: refused naming the cache and 2 sequences per group (the arithmetic: the room left over
    one sequence's cache), which then fit; the same job as a run (no cache) fits."""
    from moe_hpc.config.cluster import GIB
    from moe_hpc.planner.fit import check_memory, rank_memory, with_chunk
    cfg = load_config(REPO / "inputs" / "tiny.toml", ["generate.max_new_tokens=8"])
    need = rank_memory(cfg, 2, 24, 8)[0]
    one = 32 * 4 * 256                               # one sequence's cache: 32 positions x 4 blocks
    assert need.kv_cache == 4 * one
    cfg = load_config(REPO / "inputs" / "tiny.toml",
                      ["generate.max_new_tokens=8",
                       f"run.memory_limit_gib={(need.total - need.kv_cache + 2.5 * one) / GIB!r}"])
    with pytest.raises(ConfigError) as e:
        check_memory(cfg, 2, 0, 0, 24, None, generate=True)
    text = str(e.value)
    assert "the model does not fit: rank 0 needs" in text and "KV cache 0.00" in text, text
    assert ("of KV cache for 4 sequences x 32 positions (prompt + generate.max_new_tokens); "
            "2 sequences per group fit (--set run.chunk_sequences=2)") in text, text
    assert check_memory(with_chunk(cfg, 2), 2, 0, 0, 24, None, generate=True).fits
    assert check_memory(cfg, 2, 0, 0, 24, None).fits


def test_decode_slots_size_the_kv_cache_and_the_hint_names_them():
    """generate.decode_slots = 3 of a 4-sequence group: a cache of 3 rows (one more slot than
    the group changes nothing); under a limit with room for 2.5 the hint says 2 slots fit."""
    from moe_hpc.config.cluster import GIB
    from moe_hpc.planner.fit import check_memory, rank_memory
    tiny = REPO / "inputs" / "tiny.toml"
    one = 32 * 4 * 256
    for slots, rows in ((3, 3), (5, 4), (0, 4)):
        cfg = load_config(tiny, ["generate.max_new_tokens=8", f"generate.decode_slots={slots}"])
        assert rank_memory(cfg, 2, 24, 8)[0].kv_cache == rows * one
    need = rank_memory(load_config(tiny, ["generate.max_new_tokens=8", "generate.decode_slots=3"]), 2, 24, 8)[0]
    cfg = load_config(tiny, ["generate.max_new_tokens=8", "generate.decode_slots=3",
                             f"run.memory_limit_gib={(need.total - need.kv_cache + 2.5 * one) / GIB!r}"])
    with pytest.raises(ConfigError) as e:
        check_memory(cfg, 2, 0, 0, 24, None, generate=True)
    assert ("of KV cache for 3 decode slots (generate.decode_slots) of 32 positions (prompt + "
            "generate.max_new_tokens); 2 sequences per group fit (--set run.chunk_sequences=2), "
            "or 2 decode slots (--set generate.decode_slots=2)") in str(e.value), str(e.value)


def test_plan_says_how_many_sequences_caches_fit(tmp_path):
    """Beside the plan's memory and the LM head (generate always loads it) on the fullest dense
    GPU, the room left over one sequence's cache of seq_len + N positions: DeepSeek-V3 on 256
    GPUs (MLA: 1,152 bytes a position and block), the same whether or not run asks for logits."""
    dsv3, c256 = REPO / "inputs" / "deepseek_v3.toml", REPO / "inputs" / "cluster_dsv3_256.toml"

    def plan(*sets):
        args = plan_args(c256, tmp_path, *sets, fmt="json")
        args.config = str(dsv3)
        return build(args)
    with_head = plan("run.logits=true")
    kv, dense = with_head["kv_cache"], with_head["memory"]["dense+expert"]
    per_sequence = (with_head["workload"]["seq_len"] + 16) * 61 * 1152
    assert kv["sequences_fit"] == (64 * 2 ** 30 - dense["bytes"]) // per_sequence == 7
    assert plan()["kv_cache"]["sequences_fit"] == 7               # the head counted without run.logits too
    longer = plan("generate.max_new_tokens=8000")               # the group of 4 does not fit: the line says what does
    n = longer["kv_cache"]["sequences_fit"]
    assert 0 < n < 4
    out = []
    args = plan_args(c256, tmp_path, "generate.max_new_tokens=8000")
    args.config = str(dsv3)
    run_plan(args, out=out.append)
    assert (f"{n} sequences' caches fit beside the plan's memory and the LM head (fewer than the group's: "
            f"--set run.chunk_sequences={n} or --set generate.decode_slots={n})") in out[0]


def test_plan_reports_the_generate_kv_cache(tmp_path):
    """The 61-block seed model's MHA cache: k and v of 128 heads of 128 in bf16 = 64 KiB a
    position and block; a one-sequence group of seq_len + 128 positions over 61 blocks."""
    r = build(plan_args(C128, tmp_path, *FITS, "generate.max_new_tokens=128", fmt="json"))
    kv, L = r["kv_cache"], r["workload"]["seq_len"]
    assert kv["bytes_per_token_and_block"] == 2 * 128 * 128 * 2 and kv["blocks"] == 61
    assert kv["group_gib"] * 2 ** 30 == 1 * (L + 128) * 61 * 65536
