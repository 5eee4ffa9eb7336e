"""DeepSeek-V3 checkpoints against transformers (tests/fixtures/make_hf_fixtures.py).

Three tiny random models made with transformers 5.17: ``deepseek_v3`` (q latent, YaRN with
mscale != mscale_all_dim, interleaved RoPE, 16 experts in 4 groups of which 2 are kept, top-4,
sigmoid scores with a correction bias, renormalised and scaled by 2.5, a shared expert, one
dense block), ``deepseek_v3_direct`` (q projected directly, plain half-split RoPE, 2 groups of
which 1 is kept, no renormalisation) and ``deepseek_v3_fp8`` (the first quantised to float8 e4m3
in 32x32 blocks; transformers' logits from its dequantised weights). Same tolerance as the
other families (tests/test_hf.py): per position, median under 2e-2, at most 5% over 5e-2.
"""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from helpers import REPO, bf16_values, fixture, logit_errors, moe_hpc, needs_mpiexec
from moe_hpc.config.errors import ConfigError, InputError
from moe_hpc.config.hf import model_table_from_hf
from moe_hpc.config.run_config import build_config, load_config
from moe_hpc.device.kernels import gate_topk
from moe_hpc.files.fp8 import dequantize
from moe_hpc.model.reference import reference_forward
from moe_hpc.tools.hf_import import import_hf

MODELS = ["deepseek_v3", "deepseek_v3_direct", "deepseek_v3_fp8"]
# (model, ranks, --set options, source): every model at one rank from its directory; at four
# ranks, the layouts that split what MLA adds (heads of wq_b / wkv_b / wo over dense TP) and
# the stages and waves, one of them through import-hf
LAYOUTS = {"v3-1": ("deepseek_v3", None, [], "dir"),
           "direct-1": ("deepseek_v3_direct", None, [], "dir"),
           "fp8-1": ("deepseek_v3_fp8", None, [], "dir"),
           "v3-4-dense_tp": ("deepseek_v3", 4, ["parallel.dense_ranks=2", "parallel.dense_tp=2",
                                                "parallel.expert_tp=2"], "dir"),
           "direct-4-stages": ("deepseek_v3_direct", 4, ["parallel.dense_ranks=2", "parallel.dense_stages=2",
                                                         "run.pipeline_waves=2"], "imported"),
           "fp8-4-colocated": ("deepseek_v3_fp8", 4, ["run.chunk_sequences=1"], "dir")}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """model -> (config, weights) written by import-hf (in process)."""
    out = {}
    for name in MODELS:
        folder = tmp_path_factory.mktemp(f"import-{name}")
        import_hf(fixture(name), folder / "model.toml", folder / "weights.h5", log=lambda text: None)
        out[name] = (folder / "model.toml", folder / "weights.h5")
    return out


def test_config_json_gives_the_model_table():
    m = load_config(fixture("deepseek_v3")).model
    hf = json.loads((fixture("deepseek_v3") / "config.json").read_text())
    assert m.mla and m.head_dim == hf["qk_nope_head_dim"] + hf["qk_rope_head_dim"]
    assert (m.kv_lora_rank, m.q_lora_rank, m.qk_rope_head_dim, m.v_head_dim) == (
        hf["kv_lora_rank"], hf["q_lora_rank"], hf["qk_rope_head_dim"], hf["v_head_dim"])
    assert (m.gate_score, m.expert_groups, m.topk_groups, m.routed_scaling_factor) == (
        "sigmoid", hf["n_group"], hf["topk_group"], hf["routed_scaling_factor"])
    assert m.first_dense_layers == hf["first_k_dense_replace"] and not m.shared_expert_gate
    assert m.shared_expert_ffn_hidden_size == hf["n_shared_experts"] * hf["moe_intermediate_size"]
    rope = hf["rope_parameters"]
    assert (m.rope_scaling, m.rope_factor, m.rope_mscale_all_dim) == ("yarn", rope["factor"], rope["mscale_all_dim"])
    assert load_config(fixture("deepseek_v3_direct")).model.q_lora_rank == 0


def test_missing_router_keys_mean_what_transformers_assumes():
    """A config.json without n_group, topk_group, routed_scaling_factor, n_shared_experts or
    first_k_dense_replace is transformers' model with its defaults, not a model with them off."""
    from moe_hpc.config.hf import DSV3_DEFAULTS
    values = json.loads((fixture("deepseek_v3") / "config.json").read_text())
    for key in DSV3_DEFAULTS:
        values.pop(key, None)
    values.update(n_routed_experts=16, num_hidden_layers=4)
    t = model_table_from_hf(values, "config.json")
    assert (t["expert_groups"], t["topk_groups"], t["routed_scaling_factor"]) == (8, 4, 2.5)
    assert t["first_dense_layers"] == 3 and t["shared_expert_ffn_hidden_size"] == values["moe_intermediate_size"]


@pytest.mark.parametrize("sets", [[], ["model.rope_mscale=0.707", "model.rope_mscale_all_dim=0.707"],
                                  ["model.rope_mscale=1.0", "model.rope_mscale_all_dim=0.0"],
                                  ["model.rope_factor=8.0", "model.rope_beta_fast=16.0"]])
def test_engine_yarn_tables_equal_the_reference(sets):
    """The engine's RoPE frequencies, cos/sin scale and softmax scale (model/mla.py) against the
    float64 reference's own derivation, which matches transformers to 7e-7 on the fixture: a
    wrong YaRN factor in the engine would hide inside the logits' bf16 tolerance."""
    from moe_hpc.model import mla
    from moe_hpc.model.reference import _mla_rope
    m = load_config(fixture("deepseek_v3"), sets).model
    inv, cos_sin = mla.rope_frequencies(m)
    want_inv, want_cs, want_scale = _mla_rope(m)
    np.testing.assert_allclose(inv, want_inv, rtol=1e-12)
    assert cos_sin == pytest.approx(want_cs, rel=1e-12)
    if "model.rope_mscale_all_dim=0.0" in sets:          # no mscale_all_dim: cos/sin carry mscale(factor)
        assert cos_sin > 1.0
    assert mla.softmax_scale(m) == pytest.approx(want_scale, rel=1e-12)


@pytest.mark.parametrize("name", MODELS)
def test_float64_reference_of_the_import_matches_transformers(name, imported):
    """MLA, YaRN, the grouped sigmoid router and the FP8 dequantisation, without bf16."""
    _, weights = imported[name]
    got = reference_forward(weights, fixture(name) / "reference.h5", with_logits=True)
    assert logit_errors(got.logits, name).max() < 1e-4


@needs_mpiexec
@pytest.mark.parametrize("layout", LAYOUTS)
def test_engine_matches_transformers(layout, imported, tmp_path):
    name, ranks, sets, source = LAYOUTS[layout]
    cfg, weights = (fixture(name), fixture(name)) if source == "dir" else imported[name]
    out = tmp_path / "out.h5"
    sets = [*sets, "run.logits=true", "run.micro_batch_tokens=16"]
    r = moe_hpc("run", cfg, "--weights", weights, "--input", fixture(name) / "reference.h5", "--output", out,
                *[a for s in sets for a in ("--set", s)], "--progress", "off", ranks=ranks)
    assert r.returncode == 0, r.stderr
    with h5py.File(out, "r") as f:
        err = logit_errors(bf16_values(f["logits"]), name)
    print(f"{layout}: median {np.median(err):.2e}, {np.mean(err > 5e-2):.1%} over 5e-2")
    assert np.median(err) < 2e-2 and np.mean(err > 5e-2) <= 0.05


# ---------------------------------------------------------------- the router

def brute_force_route(logits, bias, k, groups, keep, normalize, scale):
    """Token by token, in float64: DeepSeek-V3's rule written out."""
    T, E = logits.shape
    per = E // groups
    experts, weights = np.zeros((T, k), int), np.zeros((T, k))
    for t in range(T):
        p = 1 / (1 + np.exp(-logits[t].astype(np.float64)))
        s = p + bias
        group_score = [sorted(s[g * per:(g + 1) * per])[-2:] for g in range(groups)]
        kept = sorted(range(groups), key=lambda g: -sum(group_score[g]))[:keep]
        allowed = [e for e in range(E) if e // per in kept]
        chosen = sorted(allowed, key=lambda e: -s[e])[:k]
        w = p[chosen] / (p[chosen].sum() if normalize else 1.0)
        experts[t], weights[t] = chosen, w * scale
    return experts, weights


@pytest.mark.parametrize("groups, keep, normalize", [(4, 2, True), (8, 3, False), (1, 1, True)])
def test_grouped_sigmoid_gate(groups, keep, normalize):
    rng = np.random.default_rng(groups)
    logits = rng.normal(size=(64, 32)).astype(np.float32)
    bias = (0.3 * rng.normal(size=32)).astype(np.float32)
    e, w = gate_topk(logits, bias, 4, normalize, score="sigmoid", groups=groups, keep_groups=keep, scale=2.5)
    want_e, want_w = brute_force_route(logits, bias.astype(np.float64), 4, groups, keep, normalize, 2.5)
    assert np.array_equal(np.sort(e, axis=1), np.sort(want_e, axis=1))
    order = np.argsort(e, axis=1)
    np.testing.assert_allclose(np.take_along_axis(w, order, 1), np.take_along_axis(want_w, np.argsort(want_e, 1), 1),
                               rtol=1e-5)


# ---------------------------------------------------------------- FP8 and refusals

def test_fp8_dequantisation_uses_each_block_scale():
    import ml_dtypes
    w = np.arange(1, 1 + 5 * 3, dtype=np.float32).reshape(5, 3) / 4
    w8 = w.astype(ml_dtypes.float8_e4m3fn)
    scale = np.array([[2.0, 3.0], [5.0, 7.0], [11.0, 13.0]], np.float32)        # 2x2 blocks, edges partial
    got = dequantize(w8, scale, (2, 2)).astype(np.float32)
    rows, cols = np.arange(5)[:, None] // 2, np.arange(3)[None, :] // 2
    np.testing.assert_array_equal(got, (w8.astype(np.float32) * scale[rows, cols]).astype(ml_dtypes.bfloat16))
    with pytest.raises(InputError, match="weight_scale_inv has shape"):
        dequantize(w8, scale[:2], (2, 2))


@pytest.mark.parametrize("field, value, needle", [
    ("rope_parameters", {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}, "rope_type"),
    ("scoring_func", "softmax", "scoring_func"),
    ("topk_method", "greedy", "topk_method"),
    ("attention_bias", True, "attention_bias"),
    ("quantization_config", {"quant_method": "gptq", "bits": 4}, "quant_method"),
    ("quantization_config", {"quant_method": "fp8", "fmt": "e4m3"}, "weight_block_size"),
])
def test_unsupported_fields_are_named(field, value, needle):
    values = json.loads((fixture("deepseek_v3") / "config.json").read_text())
    values[field] = value
    with pytest.raises(ConfigError, match=needle):
        model_table_from_hf(values, "config.json")


def test_hub_style_rope_scaling_is_read():
    """The released config.json carries YaRN as ``rope_scaling`` with ``type``, beside rope_theta."""
    values = json.loads((fixture("deepseek_v3") / "config.json").read_text())
    rope = values.pop("rope_parameters")
    values.update(rope_theta=rope.pop("rope_theta"), rope_scaling={**rope, "type": rope.pop("rope_type")})
    assert model_table_from_hf(values, "c") == model_table_from_hf(
        json.loads((fixture("deepseek_v3") / "config.json").read_text()), "c")


@pytest.mark.parametrize("model, needle", [
    ({"rope_scaling": "yarn", "rope_factor": 4.0, "rope_original_max_positions": 64}, "rope_scaling"),
    ({"kv_lora_rank": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "num_kv_heads": 2}, "num_kv_heads"),
    ({"gate_score": "sigmoid", "expert_groups": 4, "topk_groups": 1, "top_k": 3}, "model.top_k"),
    ({"expert_groups": 3}, "expert_groups"),
])
def test_model_keys_are_checked(model, needle):
    with pytest.raises(ConfigError, match=needle):
        build_config({"model": model})


# ---------------------------------------------------------------- planning the released model

PRESET = REPO / "inputs" / "deepseek_v3.toml"


def test_preset_counts_mla_weights_and_flops_by_hand():
    """One MoE block of the 671B model: MLA's weights and the top-8-of-256 FLOPs, counted here."""
    from moe_hpc.files.checkpoint import layer_shapes
    from moe_hpc.model.flops import flops_per_token
    m = load_config(PRESET).model
    H, nh = 7168, 128
    mla = H * 1536 + 1536 + 1536 * nh * 192 + H * 576 + 512 + 512 * nh * (128 + 128) + nh * 128 * H
    shapes = layer_shapes(m, 3)
    assert "wq" not in shapes and "wk" not in shapes and "wv" not in shapes
    assert sum(np.prod(shapes[n]) for n in ("wq_a", "q_a_norm", "wq_b", "wkv_a", "kv_a_norm", "wkv_b", "wo")) == mla
    assert sum(np.prod(shapes[f"experts/{w}"]) for w in ("w1", "w2", "w3")) == 256 * 3 * H * 2048
    f = flops_per_token(m, 4096)
    assert f["projections"] == 2 * (mla - 1536 - 512)
    assert f["experts"] == 8 * 2 * 3 * H * 2048 and f["gate"] == 2 * H * 256 + 2 * 3 * H * 2048
    assert f["attention_core"] == 2 * nh * (192 + 128) * 4096 / 2


@pytest.mark.parametrize("cluster", ["cluster_seed128.toml", "cluster_dsv3_256.toml"])
def test_preset_plans_and_verifies(cluster, tmp_path):
    from test_plan import plan_args
    from moe_hpc.planner.report import run_plan
    args = plan_args(REPO / "inputs" / cluster, tmp_path)
    args.config = str(PRESET)
    r = run_plan(args, out=lambda s: None)
    assert r["fits"] and all(not d["problems"] for d in r["dags"])
    assert max(v["gib"]["total"] for v in r["memory"].values()) <= 64


def test_init_weights_refuses_mla_by_name(tmp_path):
    r = moe_hpc("init-weights", REPO / "inputs" / "deepseek_v3.toml", "-o", tmp_path / "w.h5",
                "--set", "model.num_layers=4")
    assert r.returncode != 0 and "error: init-weights does not make MLA" in r.stderr
    assert not (tmp_path / "w.h5").exists()
