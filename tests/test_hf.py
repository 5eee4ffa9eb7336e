"""Hugging Face checkpoints against transformers itself (tests/fixtures/make_hf_fixtures.py).

Each fixture is a tiny random model of one family saved by transformers in bf16, with
transformers' fp32 logits on a ragged token batch. The engine must give the same logits per
position, up to its bf16 arithmetic: relative error of each position's logit vector, median
under 2e-2 and at most 5% of positions over 5e-2 (routing near a tie may flip under bf16).
The float64 reference (model/reference.py) on the imported checkpoint must agree to fp32
rounding, which checks the formulas apart from any bf16 effect.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from helpers import (assert_clean_failure, bf16_values, fixture, logit_errors, moe_hpc, needs_mpiexec,
                     reference, run_ranks)
from moe_hpc.config.errors import ConfigError, InputError
from moe_hpc.config.hf import model_table_from_hf
from moe_hpc.config.run_config import build_config, load_config
from moe_hpc.files.checkpoint import Checkpoint
from moe_hpc.model.reference import reference_forward
from moe_hpc.tools.hf_import import import_hf

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
# (ranks, --set options, source): one rank, split roles, co-located roles; each family runs
# one layout straight from its directory and one through import-hf
LAYOUTS = {"1-rank-dir": (None, [], "dir"),
           "3-ranks-split-dir": (3, ["parallel.dense_ranks=1"], "dir"),
           "4-ranks-colocated-imported": (4, ["run.chunk_sequences=1"], "imported")}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """family -> (config, weights) written by import-hf (in process: no MPI needed)."""
    out = {}
    for family in FAMILIES:
        folder = tmp_path_factory.mktemp(f"import-{family}")
        cfg, weights = folder / "model.toml", folder / "weights.h5"
        import_hf(fixture(family), cfg, weights, log=lambda text: None)
        out[family] = (cfg, weights)
    return out


# ---------------------------------------------------------------- config.json and the reference

@pytest.mark.parametrize("family", FAMILIES)
def test_config_json_gives_the_model_table(family):
    m = load_config(fixture(family)).model
    hf = json.loads((fixture(family) / "config.json").read_text())
    assert (m.hidden_size, m.num_layers, m.num_heads, m.kv_heads, m.vocab_size) == (
        hf["hidden_size"], hf["num_hidden_layers"], hf["num_attention_heads"], hf["num_key_value_heads"],
        hf["vocab_size"])
    assert m.mlp == "gated" and m.activation == "silu" and m.norm_eps == hf["rms_norm_eps"]
    assert m.first_dense_layers == len(hf.get("mlp_only_layers", []))
    assert m.qk_norm == {"qwen3_moe": "head", "olmoe": "full"}.get(family, "none")
    assert m.shared_expert_gate == (family == "qwen2_moe") and m.attention_bias == (family == "qwen2_moe")
    assert m.normalize_topk == hf.get("norm_topk_prob", True)
    assert m.tie_embeddings == hf["tie_word_embeddings"]


@pytest.mark.parametrize("family", FAMILIES)
def test_float64_reference_of_the_import_matches_transformers(family, imported):
    """The formulas themselves (no bf16): equal to transformers' fp32 up to fp32 rounding."""
    cfg, weights = imported[family]
    got = reference_forward(weights, fixture(family) / "reference.h5", with_logits=True)
    assert logit_errors(got.logits, family).max() < 1e-4
    assert load_config(cfg).model == load_config(fixture(family)).model


def test_import_refuses_to_overwrite(imported):
    cfg, weights = imported["olmoe"]
    before = weights.read_bytes()
    with pytest.raises(Exception, match="exists; pass --overwrite"):
        import_hf(fixture("olmoe"), cfg, weights, log=lambda text: None)
    assert weights.read_bytes() == before


@pytest.mark.parametrize("field, value, needle", [
    ("model_type", "llama", "model_type 'llama' is not supported"),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}, "rope_parameters.rope_type"),
    ("mlp_only_layers", [1], "mlp_only_layers"),
    ("hidden_act", "relu", "hidden_act"),
    ("use_sliding_window", True, "use_sliding_window"),
])
def test_unsupported_fields_are_named(field, value, needle):
    values = json.loads((fixture("qwen2_moe") / "config.json").read_text())
    values[field] = value
    with pytest.raises(ConfigError, match=needle):
        model_table_from_hf(values, "config.json")


def test_sparse_step_maps_to_a_dense_prefix_only():
    values = json.loads((fixture("qwen3_moe") / "config.json").read_text())
    values.update(mlp_only_layers=[], decoder_sparse_step=2)       # blocks 0 and 2 dense: not a prefix
    with pytest.raises(ConfigError, match="decoder_sparse_step"):
        model_table_from_hf(values, "config.json")
    values.update(num_hidden_layers=2)                               # block 0 dense, block 1 MoE
    assert model_table_from_hf(values, "config.json")["first_dense_layers"] == 1


def test_each_read_takes_only_the_asked_expert(monkeypatch):
    """A rank reads the tensors it owns: one expert's read opens that expert's tensors only."""
    m = load_config(fixture("mixtral")).model
    with Checkpoint(fixture("mixtral"), m) as ckpt:
        original = type(ckpt.tensors).read
        names = []
        monkeypatch.setattr(type(ckpt.tensors), "read", lambda self, name, index=(): names.append(
            (name, index[:1])) or original(self, name, index))
        ckpt.read_expert(2, 5, np.float32)
    assert {n for n, _ in names} == {"layers/2/experts/w1", "layers/2/experts/w3", "layers/2/experts/w2"}
    assert {i for _, i in names} == {(5,)}


# ---------------------------------------------------------------- the engine against transformers

def run_family(family: str, layout: str, imported, tmp_path) -> Path:
    ranks, sets, source = LAYOUTS[layout]
    cfg, weights = (fixture(family), fixture(family)) if source == "dir" else imported[family]
    out = tmp_path / "out.h5"
    sets = [*sets, "run.logits=true", "run.logprobs=true", "run.micro_batch_tokens=16"]
    r = moe_hpc("run", cfg, "--weights", weights, "--input", fixture(family) / "reference.h5", "--output", out,
                *[a for s in sets for a in ("--set", s)], "--progress", "off", ranks=ranks)
    assert r.returncode == 0, r.stderr
    return out


@needs_mpiexec
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_engine_matches_transformers(family, layout, imported, tmp_path):
    out = run_family(family, layout, imported, tmp_path)
    with h5py.File(out, "r") as f:
        logits, logprobs = bf16_values(f["logits"]), f["logprobs"][()]
        summary = {k: f.attrs[k] for k in ("mean_logprob", "perplexity")}
    err = logit_errors(logits, family)
    print(f"{family} {layout}: median {np.median(err):.2e}, {np.mean(err > 5e-2):.1%} over 5e-2")
    assert np.median(err) < 2e-2 and np.mean(err > 5e-2) <= 0.05
    # /logprobs: log softmax of transformers' logits at the next token; NaN where there is none
    want, tokens, lengths = reference(family)
    lse = np.log(np.exp(want.astype(np.float64) - want.max(-1, keepdims=True)).sum(-1)) + want.max(-1)
    next_lp = np.take_along_axis(want, np.roll(tokens, -1, axis=1)[..., None], -1)[..., 0] - lse
    has_next = np.arange(tokens.shape[1])[None, :] < lengths[:, None] - 1
    assert np.array_equal(np.isnan(logprobs), ~has_next)
    assert np.median(np.abs(logprobs - next_lp)[has_next]) < 2e-2
    assert summary["mean_logprob"] == pytest.approx(np.nanmean(logprobs.astype(np.float64)), rel=1e-5)
    assert summary["perplexity"] == pytest.approx(np.exp(-summary["mean_logprob"]), rel=1e-5)


def test_logprob_time_is_its_own_phase(tmp_path):
    """The next-token log-probs are timed as ``logprobs`` in the summary, not inside ``final_norm``."""
    out, summary = tmp_path / "out.h5", tmp_path / "summary.json"
    r = moe_hpc("run", fixture("mixtral"), "--weights", fixture("mixtral"), "--input", fixture("mixtral") / "reference.h5",
                "--output", out, "--set", "run.logprobs=true", "--progress", "off", "--summary", summary)
    assert r.returncode == 0, r.stderr
    phases = json.loads(summary.read_text())["summary"]["phases_s"]
    assert "logprobs" in phases and "final_norm" in phases


# ---------------------------------------------------------------- broken checkpoints

def broken_copy(family: str, tmp_path: Path, edit) -> Path:
    folder = tmp_path / f"hf_{family}"
    shutil.copytree(fixture(family), folder)
    edit(folder)
    return folder


def truncate(folder: Path) -> None:
    shard = sorted(folder.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])


def drop_tensor(folder: Path) -> None:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def reshape_tensor(folder: Path) -> None:
    from safetensors.numpy import load_file, save_file
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.1.self_attn.k_proj.weight"] = tensors["model.layers.1.self_attn.k_proj.weight"][:16]
    save_file(tensors, folder / "model.safetensors")


def other_architecture(folder: Path) -> None:
    values = json.loads((folder / "config.json").read_text())
    values["model_type"] = "deepseek_v2"
    (folder / "config.json").write_text(json.dumps(values))


BROKEN = {"truncated-shard": ("mixtral", truncate, ["safetensors", "truncated"]),
          "missing-tensor": ("mixtral", drop_tensor, ["experts.3.w2.weight"]),
          "wrong-shape": ("olmoe", reshape_tensor, ["k_proj.weight", "shape"]),
          "unsupported-architecture": ("qwen3_moe", other_architecture, ["deepseek_v2"])}


@needs_mpiexec
@pytest.mark.parametrize("case", BROKEN)
def test_broken_checkpoint_fails_cleanly(case, tmp_path):
    family, edit, needles = BROKEN[case]
    folder = broken_copy(family, tmp_path, edit)
    out = tmp_path / "out.h5"
    outcome = run_ranks("run", folder, "--weights", folder, "--input", folder / "reference.h5", "--output", out,
                        "--set", "parallel.dense_ranks=1", ranks=2)
    assert_clean_failure(outcome, 2, needles, out)


@pytest.mark.parametrize("case", ["truncated-shard", "missing-tensor", "wrong-shape"])
def test_import_of_a_broken_checkpoint_leaves_nothing(case, tmp_path):
    family, edit, needles = BROKEN[case]
    folder = broken_copy(family, tmp_path, edit)
    cfg, weights = tmp_path / "m.toml", tmp_path / "w.h5"
    with pytest.raises(InputError) as exc:
        import_hf(folder, cfg, weights, log=lambda text: None)
    assert all(n in str(exc.value) for n in needles), exc.value
    assert not any(p.exists() for p in (cfg, weights, weights.with_name("w.h5.tmp")))


def test_logprobs_need_a_vocabulary():
    with pytest.raises(ConfigError, match="run.logprobs"):
        build_config({"run": {"logprobs": True}})


# ---------------------------------------------------------------- the variants under parallel splits

SYNTH_GATED_MEDIAN = 4e-2
VARIANTS = {  # model variants, and a layout that splits what they add
    "gated-shared-headnorm-bias-tied/dense_tp+expert_tp": (
        {"qk_norm": "head", "attention_bias": True, "tie_embeddings": True},
        4, ["parallel.dense_ranks=2", "parallel.dense_tp=2", "parallel.expert_tp=2"]),
    "gated-shared-fullnorm/stages+waves": (
        {"qk_norm": "full", "normalize_topk": False},
        3, ["parallel.dense_ranks=2", "parallel.dense_stages=2", "run.pipeline_waves=2"]),
}


@needs_mpiexec
@pytest.mark.parametrize("case", VARIANTS)
def test_variants_match_the_float64_reference(case, tmp_path):
    """Synthetic weights of the HF variants, split the ways that shard their new weights."""
    from moe_hpc.model.reference import compare, read_output_hidden
    from moe_hpc.tools.hf_import import toml_table
    from moe_hpc.tools.synth import write_checkpoint, write_inputs
    keys, ranks, sets = VARIANTS[case]
    model = {"vocab_size": 96, "num_kv_heads": 2, "mlp": "gated", "activation": "silu",
             "shared_expert_ffn_hidden_size": 48, "shared_expert_gate": True, **keys}
    cfg = build_config({"model": model})
    toml, weights, inputs, out = (tmp_path / n for n in ("m.toml", "w.h5", "in.h5", "out.h5"))
    toml.write_text(toml_table("model", vars(cfg.model)))
    write_checkpoint(weights, cfg.model, seed=7)
    write_inputs(inputs, cfg.model, sequences=6, seq_len=20, seed=8, ragged=True)
    sets = [*sets, "run.logits=true", "run.logprobs=true", "run.micro_batch_tokens=16"]
    r = moe_hpc("run", toml, "--weights", weights, "--input", inputs, "--output", out,
                *[a for s in sets for a in ("--set", s)], "--progress", "off", ranks=ranks)
    assert r.returncode == 0, r.stderr
    ref = reference_forward(weights, inputs, with_logits=True)
    with h5py.File(inputs, "r") as f:
        lengths = f["lengths"][()]
    agreement = compare(read_output_hidden(out), ref, lengths)
    # SYNTH_GATED_MEDIAN: synthetic gated weights (tools/synth.py) amplify bf16 rounding more than
    # the HF fixtures do; one rank measures a 2.3e-2 median on the first case's model (the
    # kernel alone: 2.3e-3, as plain). The HF fixtures above hold SPEC's 2e-2 against transformers.
    assert agreement.ok(median_tol=SYNTH_GATED_MEDIAN), str(agreement)
    with h5py.File(out, "r") as f:
        logits, logprobs = bf16_values(f["logits"]).astype(np.float64), f["logprobs"][()]
    valid = np.arange(logits.shape[1])[None, :] < lengths[:, None]
    err = np.linalg.norm(logits - ref.logits, axis=-1)[valid] / np.linalg.norm(ref.logits, axis=-1)[valid]
    assert np.median(err) < SYNTH_GATED_MEDIAN
    assert np.isfinite(logprobs).sum() == (lengths - 1).sum()


def test_generate_fixture_script_imports_without_torch_and_cuts_six_prompts():
    """tests/fixtures/make_generate_fixtures.py runs on the device only, but must import here
    (torch and transformers inside its functions) and cut prompts the fixtures can continue."""
    import importlib.util
    path = fixture("mixtral").parent / "make_generate_fixtures.py"
    spec = importlib.util.spec_from_file_location("make_generate_fixtures", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for family in script.FAMILIES:
        tokens, lengths = script.prompt_batch(fixture(family) / "reference.h5")
        _, source, _ = reference(family)
        positions = json.loads((fixture(family) / "config.json").read_text())["max_position_embeddings"]
        assert len(set(lengths.tolist())) == 6 and lengths.max() + script.NEW_TOKENS <= positions
        for s, (row, n) in enumerate(script.PROMPTS):
            assert tokens[s, :n].tolist() == source[row, :n].tolist() and not tokens[s, n:].any()
