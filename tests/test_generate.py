"""``moe-hpc generate`` (docs/generate.md) against the float64 reference generator.

The oracle is ``model/reference.py: reference_generate`` (full recompute of prompt + tokens so
far at every step). A bf16 engine must pick the reference's very tokens, step by step, until the
first step near a tie: the reference's top-1/top-2 logit gap under 1e-2, or the routing margin
of the position that picks under TIE_MARGIN (bf16 may route it to another expert, SPEC). Past
that the two may continue differently, so nothing is compared. A second oracle needs no tie
rule: the log-probability the engine reports for each token (from its KV cache) equals the one
``moe-hpc run`` computes over prompt + tokens so far in one full forward.

Layouts are held to the 1-rank output; MPI launches are few (CI has 2 cores).
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from helpers import (GENERATE_FAMILIES, TINY, assert_generate_equals_transformers, assert_steps_equal_full_forward,
                     build_tokenizer, fixture, moe_hpc, needs_mpiexec, prompts_of, read_generated as read)
from moe_hpc.config.run_config import build_config, load_config
from moe_hpc.model.blocks import AttentionBlock
from moe_hpc.model.reference import reference_forward, reference_generate
from moe_hpc.tools.hf_import import import_hf
from moe_hpc.tools.synth import write_checkpoint, write_inputs

N = 8
TINY_VOCAB = ["--set", "model.vocab_size=256", "--set", "run.chunk_sequences=3"]
STOP_AFTER_ONE_GROUP = """
import sys
from moe_hpc import cli
from moe_hpc.runtime import signals
class StopAfterOneGroup(signals.StopRequest):
    calls = 0
    def agreed(self, comm):
        StopAfterOneGroup.calls += 1
        return signals.agree_max(comm, 15 if StopAfterOneGroup.calls == 2 else 0)
cli.StopRequest = StopAfterOneGroup
sys.exit(cli.main(sys.argv[1:]))
"""


# ``moe-hpc`` saying how many rows each KV cache it opens holds (one line per open, any rank)
SHOW_CACHE_ROWS = """
import sys
from moe_hpc import cli
from moe_hpc.runtime import engine
real = engine.Engine.open_cache
def open_cache(self, sequences, positions):
    sys.stderr.write(f"kv cache rows {sequences};\\n")        # one write: ranks share stderr
    sys.stderr.flush()
    return real(self, sequences, positions)
engine.Engine.open_cache = open_cache
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (config for the CLI, extra CLI args, HDF5 weights for the reference, the engine's
    weights, prompts): the tiny preset with a vocabulary, and four Hugging Face families."""
    d = tmp_path_factory.mktemp("generate")
    tiny_w = d / "tiny.h5"
    cfg = build_config({"model": {"vocab_size": 256}})
    write_checkpoint(tiny_w, cfg.model, seed=3)
    out = {"tiny": (TINY, TINY_VOCAB, tiny_w, tiny_w, _prompts(d / "tiny_in.h5", cfg.model, 6))}
    for family in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"):
        weights = d / f"{family}.h5"
        import_hf(fixture(family), d / f"{family}.toml", weights, log=lambda text: None)
        out[family] = (fixture(family), [], weights, fixture(family),
                       _prompts(d / f"{family}_in.h5", load_config(fixture(family)).model, 8))
    return out


def _prompts(path: Path, model, sequences: int) -> Path:
    write_inputs(path, model, sequences=sequences, seq_len=10, seed=5, ragged=True)
    return path


def generate(model, output: Path, *extra, ranks=None, program=None):
    config, args, _, weights, prompts = model
    r = moe_hpc("generate", config, "--weights", weights, "--input", prompts, "--output", output,
                "--max-new-tokens", N, "--progress", "off", *args, *extra, ranks=ranks, program=program)
    return r


def assert_same_tokens(got: dict, want: dict) -> None:
    """Equal tokens, lengths and reasons; log-probs up to fp32 (BLAS blocks a group of 1 and of 3
    differently)."""
    for dataset in ("generated", "generated_lengths", "finish_reason"):
        np.testing.assert_array_equal(got[dataset], want[dataset], err_msg=dataset)
    np.testing.assert_allclose(got["generated_logprobs"], want["generated_logprobs"], rtol=1e-5)


def assert_reference_tokens(got: dict, model) -> int:
    """The engine's tokens equal the reference's up to each sequence's first near-tie step;
    returns how many tokens were compared (a test must compare some)."""
    ref = reference_generate(model[2], prompts_of(model[4]), N)
    compared = 0
    for s, r in enumerate(ref):
        k = r.clear_steps()
        assert (got["generated"][s, :k] == r.tokens[:k]).all(), (s, k, got["generated"][s], r.tokens)
        assert np.abs(got["generated_logprobs"][s, :k] - r.logprobs[:k]).max(initial=0) < 5e-2
        compared += k
    return compared


# ---------------------------------------------------------------- the reference generator

def test_reference_generator_recomputes_the_forward(models):
    """Step 0's token is the argmax of the reference forward's logits at the prompt's end."""
    _, _, weights, _, prompts = models["tiny"]
    ref = reference_generate(weights, prompts_of(prompts), 2)
    forward = reference_forward(weights, prompts, with_logits=True)
    with h5py.File(prompts, "r") as f:
        lengths = f["lengths"][()]
    first = [int(np.argmax(forward.logits[s, n - 1])) for s, n in enumerate(lengths)]
    assert [int(r.tokens[0]) for r in ref] == first
    assert all(len(r.tokens) == 2 and r.finish_reason == 1 for r in ref)


@pytest.mark.parametrize("name", ["tiny", "deepseek_v3"])
def test_kv_cache_is_made_once_per_group_shape_and_mla_keeps_the_latent(name):
    """MHA keeps k and v per kv head; MLA only kv_lora_rank + qk_rope_head_dim values per token
    and block (never the expanded k and v); a second group of the same shape reuses the cache."""
    m = build_config({}).model if name == "tiny" else load_config(fixture(name)).model
    block = AttentionBlock(None, m, m, 64, np)
    cache = block.allocate(3, 10)
    per_token = (m.kv_lora_rank + m.qk_rope_head_dim) * 2 if m.mla else 2 * m.kv_heads * m.head_dim * 2
    assert cache.nbytes == 3 * 10 * per_token
    assert block.allocate(3, 10) is cache and block.allocate(2, 10) is not cache


# ``moe-hpc`` counting the KV caches it makes and the shape of every cached forward's tokens
COUNT_CACHES_AND_STEPS = """
import atexit, json, sys
from moe_hpc import cli
from moe_hpc.model import blocks
from moe_hpc.runtime import engine
seen = {"caches": 0, "forwards": []}
real_cache, real_forward = blocks.KvCache.__init__, engine.Engine.forward_cached
def cache(self, *args, **kwargs):
    seen["caches"] += 1
    real_cache(self, *args, **kwargs)
def forward(self, tokens, *args):
    seen["forwards"].append(list(tokens.shape))
    return real_forward(self, tokens, *args)
blocks.KvCache.__init__, engine.Engine.forward_cached = cache, forward
atexit.register(lambda: sys.stderr.write("seen " + json.dumps(seen) + chr(10)))
sys.exit(cli.main(sys.argv[1:]))
"""


def test_decode_steps_read_the_cache_made_once_per_group(models, tmp_path):
    """Two groups of 3 prompts: each gets one prefill over its prompts, then N - 1 decode steps
    of one new position per sequence (the cache supplies the rest); the caches are made per
    group (one per attention block), never per step."""
    r = generate(models["tiny"], tmp_path / "out.h5", "--set", "run.chunk_sequences=3",
                 program=COUNT_CACHES_AND_STEPS)
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stderr.split("seen ", 1)[1].splitlines()[0])
    blocks = load_config(TINY).model.num_layers
    prompt_lengths = prompts_of(models["tiny"][4])
    longest = [max(len(p) for p in prompt_lengths[g:g + 3]) for g in (0, 3)]
    want = [[3, longest[0]]] + [[3, 1]] * (N - 1) + [[3, longest[1]]] + [[3, 1]] * (N - 1)
    assert seen["forwards"] == want
    assert blocks <= seen["caches"] <= 2 * blocks


# ---------------------------------------------------------------- one rank, every family

@pytest.mark.parametrize("name", ["tiny", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"])
def test_greedy_continuations_equal_the_reference(name, models, tmp_path):
    out = tmp_path / "out.h5"
    r = generate(models[name], out)
    assert r.returncode == 0, r.stderr
    got = read(out)
    assert assert_reference_tokens(got, models[name]) >= 4
    assert (got["generated_lengths"] == N).all() and (got["finish_reason"] == 1).all()
    assert_steps_equal_full_forward(got, models[name], tmp_path, N)
    summary = json.loads(r.stdout)["summary"]
    assert summary["generated_tokens"] == got["generated_lengths"].sum()
    assert summary["generated_tokens_per_s"] > 0 and summary["prompt_tokens_per_s"] > 0


# ---------------------------------------------------------------- layouts, resume

@pytest.fixture(scope="module")
def one_rank(models, tmp_path_factory):
    made = {}

    def get(name):
        if name not in made:
            made[name] = tmp_path_factory.mktemp("one") / f"{name}.h5"
            assert generate(models[name], made[name]).returncode == 0
        return read(made[name])
    return get


@needs_mpiexec
@pytest.mark.parametrize("name, ranks, sets", [
    ("tiny", 3, ["parallel.dense_ranks=1"]),
    ("tiny", 4, ["run.chunk_sequences=1", "parallel.expert_tp=2", "run.pipeline_waves=1"]),
    ("tiny", 4, ["parallel.dp=2"]),
    ("tiny", 3, ["parallel.dense_ranks=2", "parallel.dense_stages=2"]),
    ("mixtral", 3, ["parallel.dense_ranks=1", "run.pipeline_waves=2"]),
    ("olmoe", 4, ["run.chunk_sequences=1"]),
    ("deepseek_v3", 3, ["parallel.dense_ranks=2", "parallel.dense_stages=2"]),
    ("qwen2_moe", 3, ["parallel.dense_ranks=1"]),
    ("qwen3_moe", 4, ["parallel.dp=2"]),
], ids=["tiny-3-split", "tiny-4-expert-tp-empty-ranks", "tiny-4-dp", "tiny-3-stages", "mixtral-3-split-waves",
        "olmoe-4-colocated", "deepseek-3-stages", "qwen2-3-split-shared-expert",
        "qwen3-4-dp"])
def test_layouts_generate_the_one_rank_tokens(name, ranks, sets, models, one_rank, tmp_path):
    out = tmp_path / "out.h5"
    r = generate(models[name], out, *[a for s in sets for a in ("--set", s)], ranks=ranks)
    assert r.returncode == 0, r.stderr
    assert_same_tokens(read(out), one_rank(name))
    if "run.pipeline_waves=2" in sets:
        assert "generate runs run.pipeline_waves = 1" in r.stderr


@needs_mpiexec
@pytest.mark.parametrize("name, sets", [
    ("tiny", ["parallel.dense_tp=2", "parallel.dense_ranks=2"]),
    ("deepseek_v3", ["parallel.dense_tp=2", "parallel.dense_ranks=2"]),      # the MLA latent cache whole on each member
    ("deepseek_v3", ["parallel.expert_tp=2"]),
], ids=["tiny-dense-tp", "deepseek-dense-tp", "deepseek-expert-tp"])
def test_split_sums_generate_the_reference_tokens(name, sets, models, tmp_path):
    """Dense or expert TP sums partial outputs in another order (fp32 partials, one rounding):
    equal to the reference up to ties, not to the one-rank run's bits."""
    out = tmp_path / "out.h5"
    r = generate(models[name], out, *[a for s in sets for a in ("--set", s)], ranks=4)
    assert r.returncode == 0, r.stderr
    assert assert_reference_tokens(read(out), models[name]) >= 4


@needs_mpiexec
@pytest.mark.parametrize("slots", [[], ["--decode-slots", "2"]], ids=["whole-group", "2-slots"])
@pytest.mark.parametrize("mode", ["greedy", "sampled"])
def test_resume_after_a_stop_gives_identical_tokens(mode, slots, models, one_rank, tmp_path):
    """A stop after the first of two groups of 3; the rerun resumes at the second, with the
    group's 3 sequences in its KV cache at once or 2 at a time (continuous batching). Sampled:
    the resumed group draws what an uninterrupted run on one rank drew (its draws are keyed by
    sequence and step, not by where a run started), and a rerun with another seed is refused."""
    sampling = SAMPLING if mode == "sampled" else []
    out, layout = tmp_path / "out.h5", ["--set", "parallel.dense_ranks=1", *slots]
    stopped = generate(models["tiny"], out, *sampling, *layout, ranks=3, program=STOP_AFTER_ONE_GROUP)
    assert stopped.returncode == 75, stopped.stderr
    assert not out.exists() and out.with_name("out.h5.progress.json").exists()
    if sampling:
        other_seed = generate(models["tiny"], out, *sampling[:-1], "12", *layout, ranks=3)
        assert other_seed.returncode != 0 and "a partial run of" in other_seed.stderr, other_seed.stderr
        assert not out.exists() and out.with_name("out.h5.progress.json").exists()
    resumed = generate(models["tiny"], out, *sampling, *layout, ranks=3)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at group 2 of 2" in resumed.stderr
    if sampling:
        assert generate(models["tiny"], tmp_path / "whole.h5", *sampling).returncode == 0
        want = read(tmp_path / "whole.h5")
        assert (want["generated"] != one_rank("tiny")["generated"]).any()      # sampling did draw
    else:
        want = one_rank("tiny")
    assert_same_tokens(read(out), want)


PROGRESS_LINE = re.compile(r"progress: chunk (\d+)/(\d+) \(([\d.]+)%\), (\d+)/(\d+) generated tokens, "
                           r"(\d+) generated tokens/s, elapsed \d+:\d\d:\d\d, ETA (\d+:\d\d:\d\d|\?)$")


@pytest.mark.parametrize("ranks, sets", [
    (None, ["run.chunk_sequences=4"]),
    pytest.param(3, ["parallel.dense_ranks=2", "run.chunk_sequences=2"], marks=needs_mpiexec),
], ids=["1-rank-groups-of-4-then-2", "3-ranks-two-owners"])
def test_progress_counts_generated_tokens_against_each_groups_bound(ranks, sets, models, tmp_path):
    """A line per group in generated tokens: the bound is each group's sequences over every
    dense rank x N (6 prompts: groups of 4 then 2, or 2 + 2 then 1 + 1), so the count ends at the
    tokens generated, within the bound; the summary's rates and mean length agree with the file."""
    out = tmp_path / "out.h5"
    r = generate(models["tiny"], out, "--progress", "lines", "--progress-every", "0",
                 *[a for s in sets for a in ("--set", s)], ranks=ranks)
    assert r.returncode == 0, r.stderr
    lines = [PROGRESS_LINE.match(line) for line in r.stderr.splitlines() if line.startswith("progress:")]
    assert lines and all(lines), r.stderr
    lengths = read(out)["generated_lengths"]
    assert [int(m[1]) for m in lines] == list(range(1, int(lines[0][2]) + 1)) == [1, 2]
    done = [int(m[4]) for m in lines]
    assert all(int(m[5]) == len(lengths) * N for m in lines) and done == sorted(done)
    assert done[-1] == lengths.sum() and all(float(m[3]) <= 100.0 for m in lines)
    summary = json.loads(r.stdout)["summary"]
    assert summary["generated_tokens"] == summary["generated_tokens_this_run"] == lengths.sum()
    assert summary["mean_generated_length"] == pytest.approx(lengths.mean())
    assert summary["prompt_tokens_per_s"] > 0 and summary["generated_tokens_per_s"] > 0


def test_end_of_sequence_from_generation_config_stops_and_pads(models, one_rank, tmp_path):
    """eos_token_id of generation_config.json (a list) ends a sequence at that token, which is
    kept; the rest is -1 / NaN padding, finish_reason 0; --ignore-eos runs on to N."""
    want = one_rank("mixtral")
    eos = int(want["generated"][0, 2])
    folder = tmp_path / "hf_mixtral"
    shutil.copytree(fixture("mixtral"), folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, 255]}))
    config, args, ref_weights, _, prompts = models["mixtral"]
    model = (folder, args, ref_weights, folder, prompts)
    out = tmp_path / "eos.h5"
    assert generate(model, out).returncode == 0
    got = read(out)
    for s, tokens in enumerate(want["generated"]):
        hit = np.flatnonzero(np.isin(tokens, [eos, 255]))
        n = int(hit[0]) + 1 if hit.size else N
        assert got["generated_lengths"][s] == n and got["finish_reason"][s] == (0 if hit.size else 1)
        np.testing.assert_array_equal(got["generated"][s, :n], tokens[:n])
        assert (got["generated"][s, n:] == -1).all() and np.isnan(got["generated_logprobs"][s, n:]).all()
    assert got["generated_lengths"][0] == 3
    assert generate(model, tmp_path / "all.h5", "--ignore-eos").returncode == 0
    assert_same_tokens(read(tmp_path / "all.h5"), want)


@needs_mpiexec
def test_sampled_tokens_do_not_depend_on_ranks_or_chunking(models, tmp_path):
    """Each draw is keyed by (seed, sequence, step): 1 rank with 3-sequence groups and 3 ranks
    with 1-sequence groups draw the same tokens; another seed draws others."""
    sampling = ["--temperature", "0.9", "--top-k", "40", "--top-p", "0.9", "--seed", "11"]
    outs = {name: tmp_path / f"{name}.h5" for name in ("one", "three", "seed")}
    assert generate(models["tiny"], outs["one"], *sampling).returncode == 0
    r = generate(models["tiny"], outs["three"], *sampling, "--set", "run.chunk_sequences=1",
                 "--set", "parallel.dense_ranks=2", ranks=3)
    assert r.returncode == 0, r.stderr
    assert_same_tokens(read(outs["three"]), read(outs["one"]))
    assert generate(models["tiny"], outs["seed"], *sampling[:-1], "12").returncode == 0
    assert (read(outs["seed"])["generated"] != read(outs["one"])["generated"]).any()


# ---------------------------------------------------------------- continuous batching (decode_slots)

SAMPLING = ["--temperature", "0.9", "--top-k", "40", "--top-p", "0.9", "--seed", "11"]


@pytest.fixture(scope="module")
def eos_model(models, one_rank, tmp_path_factory):
    """mode ("greedy" | "sampled") -> (the Mixtral fixture with end-of-sequence ids that end its
    sequences at different steps, its tokens with every group's sequences in the KV cache at
    once: 1 rank, groups of 5 then 3)."""
    made = {}

    def get(mode):
        if mode not in made:
            d = tmp_path_factory.mktemp(f"eos_{mode}")
            sampling = SAMPLING if mode == "sampled" else []
            if mode == "sampled":
                assert generate(models["mixtral"], d / "free.h5", *sampling).returncode == 0
                free = read(d / "free.h5")["generated"]
            else:
                free = one_rank("mixtral")["generated"]
            folder = d / "hf_mixtral"
            shutil.copytree(fixture("mixtral"), folder)
            eos = sorted({int(free[0, 2]), int(free[3, 5])})       # two stops, at different steps
            (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
            _, args, ref_weights, _, prompts = models["mixtral"]
            model = (folder, args, ref_weights, folder, prompts)
            r = generate(model, d / "whole.h5", *sampling, "--set", "run.chunk_sequences=5")
            assert r.returncode == 0, r.stderr
            made[mode] = model, sampling, read(d / "whole.h5")
        return made[mode]
    return get


@pytest.mark.parametrize("mode, ranks, sets", [
    ("greedy", None, []),
    pytest.param("greedy", 3, ["parallel.dense_ranks=2", "parallel.dense_stages=2"], marks=needs_mpiexec),
    ("sampled", None, []),
    pytest.param("sampled", 3, ["parallel.dense_ranks=2"], marks=needs_mpiexec),
], ids=["greedy-1", "greedy-3-stages", "sampled-1", "sampled-3-two-owners"])
def test_decode_slots_give_the_tokens_of_the_whole_group(mode, ranks, sets, eos_model, tmp_path):
    """2 KV cache slots for groups of 5 and 3 ragged prompts (or of 4 on each of two dense
    ranks) whose sequences stop at different steps: each finished sequence's slot goes to the
    next prompt, whose prefill joins the step; tokens, lengths, log-probs and reasons equal the
    whole group's at once, in input order. At 3 ranks an expert-only rank (and a second pipeline
    stage, or a second sequence owner) joins each step's forwards."""
    model, sampling, want = eos_model(mode)
    lengths = want["generated_lengths"]
    assert len(set(lengths.tolist())) >= 3 and (want["finish_reason"] == 0).sum() >= 2, lengths
    out = tmp_path / "out.h5"
    r = generate(model, out, *sampling, "--decode-slots", "2", "--set", "run.chunk_sequences=5",
                 *[a for s in sets for a in ("--set", s)], ranks=ranks, program=SHOW_CACHE_ROWS)
    assert r.returncode == 0, r.stderr
    rows = re.findall(r"kv cache rows (\d+);", r.stderr)
    assert rows and set(rows) == {"2"}, r.stderr             # the slots, not the group's 5 (or 4)
    assert_same_tokens(read(out), want)
    assert json.loads(r.stdout)["summary"]["generated_tokens"] == lengths.sum()


# ---------------------------------------------------------------- text prompts (--prompts)

TEXT_PROMPTS = ["hello world", "the cat sat on the mat", "cat", "the café"]


@pytest.fixture
def text_model(tmp_path):
    """(a copy of the Mixtral fixture with a word-level tokenizer.json of its 256 ids, prompts.jsonl)."""
    folder = tmp_path / "hf_mixtral"
    shutil.copytree(fixture("mixtral"), folder)
    build_tokenizer(folder, size=load_config(folder).model.vocab_size)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in TEXT_PROMPTS))
    return folder, prompts


def generate_text(folder: Path, prompts: Path, output: Path, *extra, ranks=None, program=None):
    return moe_hpc("generate", folder, "--weights", folder, "--prompts", prompts, "--output", output,
                   "--max-new-tokens", N, "--progress", "off", "--set", "run.chunk_sequences=2", *extra,
                   ranks=ranks, program=program)


@needs_mpiexec
def test_text_prompts_give_one_completion_per_prompt_decoding_the_generated_tokens(text_model, tmp_path):
    """2 ranks from text: OUT.h5 and OUT.jsonl (in order, each line the decoded /generated of its
    row), the tokenised batch removed; the same tokens as 1 rank from the equivalent token batch."""
    from moe_hpc.files.prompts import load_tokenizer, read_token_prompts, write_token_batch
    folder, prompts = text_model
    out = tmp_path / "out.h5"
    r = generate_text(folder, prompts, out, ranks=2)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["summary"]["completions"] == str(tmp_path / "out.jsonl")
    assert not (tmp_path / "out.h5.prompts.h5").exists() and not (tmp_path / "out.h5.progress.json").exists()
    got = read(out)
    tokenizer = load_tokenizer(folder / "tokenizer.json")
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [line["prompt"] for line in lines] == TEXT_PROMPTS
    for s, line in enumerate(lines):
        ids = got["generated"][s, :got["generated_lengths"][s]].tolist()
        assert line["completion"] == tokenizer.decode(ids, skip_special_tokens=True)
        assert line["finish_reason"] == ("eos", "max_new_tokens", "max_positions")[got["finish_reason"][s]]
    assert sum(len(line["completion"].split()) for line in lines) >= 2 * len(lines)   # words, not nothing
    _, batch, _ = read_token_prompts(prompts, folder, 256)
    write_token_batch(tmp_path / "tokens.h5", batch)
    r = moe_hpc("generate", folder, "--weights", folder, "--input", tmp_path / "tokens.h5", "--output",
                tmp_path / "tokens_out.h5", "--max-new-tokens", N, "--progress", "off")
    assert r.returncode == 0, r.stderr
    assert_same_tokens(got, read(tmp_path / "tokens_out.h5"))
    assert not (tmp_path / "tokens_out.jsonl").exists()


def test_text_prompts_resume_from_the_kept_batch_with_identical_tokens(text_model, tmp_path):
    """A stop after the first of two groups keeps OUT.h5.prompts.h5 (untouched by the rerun, so
    the fingerprint holds); the same command resumes and finishes the same completions."""
    folder, prompts = text_model
    whole, out = tmp_path / "whole.h5", tmp_path / "out.h5"
    assert generate_text(folder, prompts, whole).returncode == 0
    stopped = generate_text(folder, prompts, out, program=STOP_AFTER_ONE_GROUP)
    assert stopped.returncode == 75, stopped.stderr
    batch = tmp_path / "out.h5.prompts.h5"
    assert batch.exists() and not out.exists() and not (tmp_path / "out.jsonl").exists()
    resumed = generate_text(folder, prompts, out)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at group 2 of 2" in resumed.stderr
    assert not batch.exists()
    assert_same_tokens(read(out), read(whole))
    assert (tmp_path / "out.jsonl").read_text(encoding="utf-8") == (tmp_path / "whole.jsonl").read_text(encoding="utf-8")


# ---------------------------------------------------------------- against transformers' own generate

@needs_mpiexec
@pytest.mark.parametrize("family", GENERATE_FAMILIES)
def test_greedy_continuations_equal_transformers(family, tmp_path):
    """transformers' greedy continuations equal the engine's at 2 ranks (helpers.py says how)."""
    assert_generate_equals_transformers(family, tmp_path, ranks=2)
