"""Bad input fails cleanly: one ``error:`` line, every rank non-zero, fast, and no output.

The contract: a missing, non-HDF5 or truncated file, a missing dataset, a wrong shape or
dtype, a hidden size that does not match the config, NaN/Inf in the inputs, a negative or
too-long ``/lengths``, an unwritable output path, a bad config key or value (in the file or
through ``--set``), a checkpoint whose model table differs from the run's, or a wrong
``format`` attribute gets

- exactly ONE line starting with ``error:`` on stderr, summed over all ranks, that names the
  file, dataset or key (and is not an "internal error");
- no traceback;
- a non-zero exit on EVERY rank, within seconds (no rank left waiting in a collective);
- no file at the output path and no ``<output>.tmp`` or ``<output>.progress.json`` left behind
  (a bad input dooms the partial output, unlike an interruption: see test_resume.py).

And a rerun never destroys a complete output: without ``--overwrite`` it is refused with an
error naming the output and the file stays byte-identical; with ``--overwrite`` it is replaced.

Bad files are copies of the session's good ``tiny_files`` edited with h5py.  Each rank runs
through a small wrapper that prints its own exit status, so "every rank exits non-zero" is
checked per rank rather than through mpiexec's combined exit code.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py
import ml_dtypes
import numpy as np
import pytest

from helpers import FAST_ENOUGH, TINY, Outcome, assert_clean_failure, edited, needs_mpiexec, run_ranks

pytestmark = needs_mpiexec

BF16 = ml_dtypes.bfloat16


def run_cmd(case: "Case", ranks: int) -> Outcome:
    return run_ranks("run", case.config, "--weights", case.weights, "--input", case.input,
                     "--output", case.output, *case.extra, ranks=ranks)


# ------------------------------------------------------------------ building bad files

@dataclass
class Case:
    weights: Path
    input: Path
    output: Path
    needles: tuple = ()
    extra: tuple = ()
    config: Path = TINY
    output_is_dir: bool = False


def bf16_bits(value) -> np.uint16:
    return np.array(value, dtype=np.float32).astype(BF16).view(np.uint16)


def truncated(src: Path, dst: Path) -> Path:
    shutil.copy(src, dst)
    os.truncate(dst, os.path.getsize(dst) // 2)
    return dst


def text_file(dst: Path) -> Path:
    dst.write_text("this is not an HDF5 file\n" * 20)
    return dst


def replace_dataset(name: str, data, bf16: bool = False):
    def edit(f):
        del f[name]
        dset = f.create_dataset(name, data=data)
        if bf16:
            dset.attrs["dtype"] = "bfloat16"
    return edit


def set_value(name: str, index, value):
    def edit(f):
        dset = f[name]
        dset[index] = bf16_bits(value) if dset.dtype == np.uint16 else value
    return edit


def set_attr(name: str, value):
    def edit(f):
        f.attrs[name] = value
    return edit


def add_dataset(name: str, data):
    def edit(f):
        f.create_dataset(name, data=data)
    return edit


def del_item(name: str):
    def edit(f):
        del f[name]
    return edit


def del_attr(name: str, of: str = "/"):
    def edit(f):
        del f[of].attrs[name]
    return edit


def chain(*edits):
    def edit(f):
        for e in edits:
            e(f)
    return edit


def input_case(edit, needles=("/hidden",), extra=(), name="bad_inputs.h5"):
    """A case whose input is the good input with ``edit`` applied; needles include its path."""
    def make(tmp, w, i):
        bad = edited(i, tmp / name, edit)
        return Case(w, bad, tmp / "out.h5", (bad, *needles), extra)
    return make


def weights_case(edit, needles=(), extra=()):
    def make(tmp, w, i):
        bad = edited(w, tmp / "bad_weights.h5", edit)
        return Case(bad, i, tmp / "out.h5", (bad, *needles), extra)
    return make


def toml_case(text_edit, needles, extra=()):
    """A config file: a copy of TINY with ``text_edit(str) -> str`` applied."""
    def make(tmp, w, i):
        cfg = tmp / "bad.toml"
        cfg.write_text(text_edit(TINY.read_text()))
        return Case(w, i, tmp / "out.h5", (cfg, *needles), extra, config=cfg)
    return make


def set_case(*sets, needles):
    def make(tmp, w, i):
        extra = tuple(x for s in sets for x in ("--set", s))
        return Case(w, i, tmp / "out.h5", needles, extra)
    return make


S, L, H = 6, 24, 64           # the tiny_files input batch
LAST_SEQ_CHUNKED = ("--set", "run.chunk_sequences=1")
DEDICATED = ("--set", "parallel.dense_ranks=1")
rng = np.random.default_rng(0)
hidden_h32 = rng.standard_normal((S, L, 32), dtype=np.float32).astype(BF16).view(np.uint16)


def missing_input(tmp, w, i):
    return Case(w, tmp / "no_such_inputs.h5", tmp / "out.h5", (tmp / "no_such_inputs.h5",))


def text_input(tmp, w, i):
    bad = text_file(tmp / "inputs.h5")
    return Case(w, bad, tmp / "out.h5", (bad,))


def truncated_input(tmp, w, i):
    bad = truncated(i, tmp / "inputs.h5")
    return Case(w, bad, tmp / "out.h5", (bad,))


def missing_weights(tmp, w, i):
    return Case(tmp / "no_such_weights.h5", i, tmp / "out.h5", (tmp / "no_such_weights.h5",))


def text_weights(tmp, w, i):
    bad = text_file(tmp / "weights.h5")
    return Case(bad, i, tmp / "out.h5", (bad,))


def truncated_weights(tmp, w, i):
    bad = truncated(w, tmp / "weights.h5")
    return Case(bad, i, tmp / "out.h5", (bad,))


def output_dir_missing(tmp, w, i):
    out = tmp / "no_such_dir" / "out.h5"
    return Case(w, i, out, (out,))


def output_parent_is_file(tmp, w, i):
    (tmp / "a_file").write_text("x")
    out = tmp / "a_file" / "out.h5"
    return Case(w, i, out, (out,))


def output_is_directory(tmp, w, i):
    out = tmp / "out.h5"
    out.mkdir()
    return Case(w, i, out, (out,), ("--overwrite",), output_is_dir=True)


def output_dir_unwritable(tmp, w, i):
    d = tmp / "read_only"
    d.mkdir()
    d.chmod(0o555)
    out = d / "out.h5"
    if os.access(d, os.W_OK):  # root ignores permissions; /proc refuses new files even to root
        if not Path("/proc/self").is_dir():
            pytest.skip("running as root and no /proc: cannot make an unwritable directory")
        out = Path("/proc") / f"moe_hpc_test_{os.getpid()}_out.h5"
    return Case(w, i, out, (out,))


def checkpoint_model_differs(f):
    import json
    model = json.loads(f.attrs["config"])
    model["activation"] = "silu"
    f.attrs["config"] = json.dumps(model)


CASES = [
    # --- input file: missing, not HDF5, truncated
    pytest.param(missing_input, 2, id="input-missing"),
    pytest.param(text_input, 2, id="input-not-hdf5"),
    pytest.param(truncated_input, 2, id="input-truncated"),
    # --- input datasets: missing, shape, dtype, H, format
    pytest.param(input_case(del_item("hidden"), ("hidden",)), 2, id="input-no-hidden"),
    pytest.param(input_case(replace_dataset("hidden", np.zeros((S, L * H), np.uint16), bf16=True)),
                 2, id="input-hidden-2d"),
    pytest.param(input_case(replace_dataset("hidden", np.zeros((S, L, H), np.int32))),
                 2, id="input-hidden-int32"),
    pytest.param(input_case(del_attr("dtype", of="hidden")),
                 2, id="input-hidden-uint16-untagged"),
    pytest.param(input_case(replace_dataset("hidden", hidden_h32, bf16=True), ("/hidden", "hidden_size")),
                 2, id="input-hidden-H32-vs-config-64"),
    pytest.param(input_case(chain(del_item("hidden"), add_dataset("tokens", np.zeros((S, L), np.int64))),
                            ("/tokens",)),
                 2, id="input-tokens-without-vocab"),
    pytest.param(input_case(set_attr("format", "moe_hpc.checkpoint/1"), ("format",)),
                 2, id="input-format-wrong"),
    pytest.param(input_case(del_attr("format"), ("format",)),
                 2, id="input-format-missing"),
    pytest.param(input_case(set_attr("format", np.array([1, 2], np.int64)), ("format",)),
                 2, id="input-format-array"),
    # --- input values: NaN/Inf at valid positions
    pytest.param(input_case(set_value("hidden", (0, 0, 0), np.nan)), 2, id="input-nan-seq0"),
    pytest.param(input_case(set_value("hidden", (2, 0, 5), np.inf)), 2, id="input-inf-seq2"),
    pytest.param(input_case(set_value("hidden", (S - 1, 0, 7), np.nan), extra=LAST_SEQ_CHUNKED),
                 2, id="input-nan-last-seq-rank1-late-chunk"),
    pytest.param(input_case(set_value("hidden", (S - 1, 0, 7), -np.inf),
                            extra=DEDICATED + LAST_SEQ_CHUNKED),
                 3, id="input-inf-last-seq-dense-rank2-late-chunk"),
    # --- /lengths
    pytest.param(input_case(set_value("lengths", 3, -1), ("/lengths",)), 2, id="lengths-negative"),
    pytest.param(input_case(set_value("lengths", 4, L + 1), ("/lengths",)), 2, id="lengths-too-long"),
    pytest.param(input_case(replace_dataset("lengths", np.ones(S + 1, np.int64)), ("/lengths",)),
                 2, id="lengths-wrong-shape"),
    pytest.param(input_case(replace_dataset("lengths", np.ones(S, np.float32)), ("/lengths",)),
                 2, id="lengths-float"),
    # --- weights file
    pytest.param(missing_weights, 2, id="weights-missing"),
    pytest.param(text_weights, 2, id="weights-not-hdf5"),
    pytest.param(truncated_weights, 3, id="weights-truncated-3ranks"),
    pytest.param(weights_case(set_attr("format", "moe_hpc.input/1"), ("format",)),
                 2, id="weights-format-wrong"),
    pytest.param(weights_case(del_item("layers/2/experts/w1"), ("layers/2/experts/w1",)),
                 2, id="weights-missing-dataset"),
    pytest.param(weights_case(replace_dataset("layers/0/wq", np.zeros((H, 32), np.uint16), bf16=True),
                              ("layers/0/wq",)),
                 2, id="weights-wrong-shape"),
    pytest.param(weights_case(replace_dataset("layers/1/gate", np.zeros((H, 8), np.int32)),
                              ("layers/1/gate",)),
                 2, id="weights-wrong-dtype"),
    # expert 7 of the last MoE layer lives only on expert rank 1 (shared placement, 2 expert ranks)
    pytest.param(weights_case(set_value("layers/3/experts/w2", (7, 0, 0), np.nan),
                              ("layers/3/experts/w2",), extra=DEDICATED),
                 3, id="weights-nan-expert-on-rank1"),
    # --- checkpoint model table vs the run config
    pytest.param(weights_case(checkpoint_model_differs, ("model.activation",)),
                 2, id="checkpoint-config-differs"),
    pytest.param(set_case("model.top_k=1", needles=("model.top_k", "weights.h5")),
                 2, id="run-config-differs-from-checkpoint"),
    # --- output path
    pytest.param(output_dir_missing, 2, id="output-dir-missing"),
    pytest.param(output_parent_is_file, 2, id="output-parent-is-file"),
    pytest.param(output_is_directory, 2, id="output-is-directory"),
    pytest.param(output_dir_unwritable, 2, id="output-dir-unwritable"),
    # --- config: in the file, and through --set
    pytest.param(toml_case(lambda t: t.replace("[model]\n", "[model]\nhidden_sise = 64\n"),
                           ("model.hidden_sise",)), 2, id="config-file-unknown-key"),
    pytest.param(toml_case(lambda t: t.replace("chunk_sequences = 4", 'chunk_sequences = "four"'),
                           ("run.chunk_sequences",)), 2, id="config-file-wrong-type"),
    pytest.param(toml_case(lambda t: t + "\n[modle]\nx = 1\n", ("modle",)),
                 2, id="config-file-unknown-table"),
    pytest.param(toml_case(lambda t: t + "\n[run\n", ()), 2, id="config-file-not-toml"),
    pytest.param(set_case("run.chunk_seqs=2", needles=("run.chunk_seqs",)), 2, id="set-unknown-key"),
    pytest.param(set_case("model.normalize_topk=1", needles=("model.normalize_topk",)),
                 2, id="set-wrong-type"),
    pytest.param(set_case("run.device=tpu", needles=("run.device",)), 2, id="set-bad-value"),
    pytest.param(set_case("parallel.dense_ranks=2", needles=("parallel.dense_ranks",)),
                 2, id="set-dense-ranks-leaves-no-expert-rank"),
]


@pytest.mark.parametrize("make, ranks", CASES)
def test_bad_input_fails_cleanly(make, ranks, tmp_path, tiny_files):
    weights, inputs = tiny_files
    case = make(tmp_path, weights, inputs)
    out = run_cmd(case, ranks)
    assert_clean_failure(out, ranks, case.needles, case.output, case.output_is_dir)


def test_config_file_missing(tmp_path, tiny_files):
    weights, inputs = tiny_files
    cfg = tmp_path / "no_such.toml"
    case = Case(weights, inputs, tmp_path / "out.h5", (cfg,), config=cfg)
    assert_clean_failure(run_cmd(case, 2), 2, case.needles, case.output)


# ------------------------------------------------------------------ reruns onto a complete output

@pytest.fixture(scope="module")
def complete_output(tmp_path_factory, tiny_files):
    """A good output of the tiny run (2 ranks), made once."""
    weights, inputs = tiny_files
    output = tmp_path_factory.mktemp("complete") / "out.h5"
    out = run_ranks("run", TINY, "--weights", weights, "--input", inputs, "--output", output, ranks=2)
    assert out.result.returncode == 0 and output.exists(), f"the good run failed{out.describe()}"
    return output


def _copy_output(complete: Path, tmp: Path) -> tuple[Path, bytes]:
    output = tmp / "out.h5"
    shutil.copy(complete, output)
    return output, output.read_bytes()


def test_rerun_without_overwrite_keeps_complete_output(complete_output, tmp_path, tiny_files):
    weights, inputs = tiny_files
    output, before = _copy_output(complete_output, tmp_path)
    out = run_ranks("run", TINY, "--weights", weights, "--input", inputs, "--output", output, ranks=2)
    info = out.describe()
    assert out.wall_s < FAST_ENOUGH, f"refusal took {out.wall_s:.1f} s{info}"
    assert out.result.returncode != 0, f"rerun without --overwrite succeeded{info}"
    assert len(out.rank_codes) == 2 and all(rc != 0 for rc in out.rank_codes.values()), \
        f"not every rank exited non-zero{info}"
    assert "Traceback" not in out.stderr, info
    assert len(out.error_lines) == 1, f"expected one 'error:' line{info}"
    assert str(output) in out.error_lines[0], f"the error line does not name the output{info}"
    assert output.read_bytes() == before, f"the existing output was modified{info}"
    assert not output.with_name("out.h5.tmp").exists(), f"a leftover .tmp remains{info}"


def test_rerun_with_overwrite_and_bad_input_keeps_complete_output(complete_output, tmp_path,
                                                                  tiny_files):
    weights, inputs = tiny_files
    output, before = _copy_output(complete_output, tmp_path)
    bad = edited(inputs, tmp_path / "bad_inputs.h5", set_value("hidden", (S - 1, 0, 0), np.nan))
    out = run_ranks("run", TINY, "--weights", weights, "--input", bad, "--output", output,
                    "--overwrite", "--set", "run.chunk_sequences=1", ranks=2)
    info = out.describe()
    assert out.result.returncode != 0, f"the run succeeded on a NaN input{info}"
    assert len(out.error_lines) == 1 and str(bad) in out.error_lines[0], info
    assert output.read_bytes() == before, f"a failed --overwrite run modified the complete output{info}"
    assert not output.with_name("out.h5.tmp").exists(), f"a leftover .tmp remains{info}"


def test_rerun_with_overwrite_replaces_output(complete_output, tmp_path, tiny_files):
    weights, inputs = tiny_files
    output, _ = _copy_output(complete_output, tmp_path)
    os.utime(output, (0, 0))   # so a replacement is visible even if the bytes came out equal
    out = run_ranks("run", TINY, "--weights", weights, "--input", inputs, "--output", output,
                    "--overwrite", ranks=2)
    info = out.describe()
    assert out.wall_s < FAST_ENOUGH, info
    assert out.result.returncode == 0, f"rerun with --overwrite failed{info}"
    assert out.rank_codes == {"0": 0, "1": 0}, f"not every rank exited 0{info}"
    assert out.error_lines == [], info
    assert output.stat().st_mtime > 0, f"the output was not replaced{info}"
    assert not output.with_name("out.h5.tmp").exists(), f"a leftover .tmp remains{info}"
    with h5py.File(output, "r") as new, h5py.File(complete_output, "r") as old:
        assert new.attrs["format"] == "moe_hpc.output/1"
        np.testing.assert_array_equal(new["hidden"][()], old["hidden"][()])


# ------------------------------------------------------------------ issue 21 (items 4, 8): every input
# value is checked before any compute, by the run and its dry run alike; sequences longer than the
# model's max_position_embeddings are refused unless run.allow_long_sequences says otherwise

MIXTRAL = Path(__file__).resolve().parent / "fixtures" / "hf_mixtral"    # max_position_embeddings 64


def mixtral_tokens(path: Path, tokens: np.ndarray, lengths: np.ndarray) -> Path:
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "moe_hpc.input/1"
        f["tokens"], f["lengths"] = tokens, lengths
    return path


def late_bad_token(tmp: Path) -> tuple[Path, tuple]:
    """8 sequences of the Mixtral fixture; the last holds token 999 (vocab 256)."""
    with h5py.File(MIXTRAL / "reference.h5", "r") as f:
        tokens, lengths = f["tokens"][()][[0, 1, 2, 3] * 2], f["lengths"][()][[0, 1, 2, 3] * 2]
    tokens[7, 3] = 999
    return mixtral_tokens(tmp / "late_token.h5", tokens, lengths), ("token 999", "sequence 7", "vocab_size=256")


def late_nan(tmp: Path, long_input: Path) -> tuple[Path, tuple]:
    """The 40-sequence tiny input with a NaN in its last sequence."""
    bad = edited(long_input, tmp / "late_nan.h5", set_value("hidden", (39, 0, 0), np.nan))
    return bad, ("NaN or Inf", "sequence 39")


def bad_value_run(kind: str, tmp: Path, tiny_files, long_input, *extra) -> tuple[Outcome, tuple, Path]:
    if kind == "token":
        inputs, needles = late_bad_token(tmp)
        args = [MIXTRAL, "--weights", MIXTRAL]
    else:
        inputs, needles = late_nan(tmp, long_input)
        args = [TINY, "--weights", tiny_files[0]]
    output = tmp / "out.h5"
    out = run_ranks("run", *args, "--input", inputs, "--output", output, "--set", "run.chunk_sequences=1",
                    "--progress", "off", *extra, ranks=2)
    return out, needles, output


@pytest.mark.parametrize("kind", ["token", "nan"])
def test_a_bad_value_late_in_the_input_stops_the_run_before_any_compute(kind, tmp_path, tiny_files, long_input):
    out, needles, output = bad_value_run(kind, tmp_path, tiny_files, long_input)
    assert_clean_failure(out, 2, needles, output)
    # the run's start line follows loading: a bad value must be found before it, not in its chunk
    assert "moe-hpc: " not in out.stderr, f"the run started computing before the bad value was found{out.describe()}"


@pytest.mark.parametrize("kind", ["token", "nan"])
def test_the_dry_run_checks_every_value_like_the_run(kind, tmp_path, tiny_files, long_input):
    out, needles, output = bad_value_run(kind, tmp_path, tiny_files, long_input, "--dry-run")
    assert_clean_failure(out, 2, needles, output)


def test_the_dry_run_says_what_it_checked(tmp_path, long_input, tiny_files):
    out = run_ranks("run", TINY, "--weights", tiny_files[0], "--input", long_input, "--output", tmp_path / "o.h5",
                    "--dry-run", "--set", "parallel.dense_ranks=1", ranks=2)
    assert out.result.returncode == 0, out.describe()
    assert ("input: all 40 sequences checked before any compute by 1 dense rank(s)" in out.result.stdout
            and "hidden values finite" in out.result.stdout), out.describe()


def too_long(tmp: Path) -> Path:
    """Two sequences of 80 positions, the first 70 tokens long: past the fixture's 64."""
    return mixtral_tokens(tmp / "long.h5", np.ones((2, 80), np.int64), np.array([70, 10]))


@pytest.mark.parametrize("dry", [False, True], ids=["run", "dry-run"])
def test_a_sequence_past_max_position_embeddings_is_refused(dry, tmp_path):
    output = tmp_path / "out.h5"
    out = run_ranks("run", MIXTRAL, "--weights", MIXTRAL, "--input", too_long(tmp_path), "--output", output,
                    *(["--dry-run"] if dry else []), ranks=2)
    assert_clean_failure(out, 2, ("sequence 0 has 70 tokens", "max_position_embeddings = 64",
                                  "run.allow_long_sequences"), output)


def test_the_position_limit_from_the_toml_model_table(tmp_path, tiny_files):
    """model.max_position_embeddings in a TOML config (a checkpoint that does not know it agrees)."""
    weights, inputs = tiny_files
    output = tmp_path / "out.h5"
    out = run_ranks("run", TINY, "--weights", weights, "--input", inputs, "--output", output,
                    "--set", "model.max_position_embeddings=8", ranks=2)
    assert_clean_failure(out, 2, ("max_position_embeddings = 8", "run.allow_long_sequences"), output)


def test_allow_long_sequences_runs_them(tmp_path):
    output = tmp_path / "out.h5"
    out = run_ranks("run", MIXTRAL, "--weights", MIXTRAL, "--input", too_long(tmp_path), "--output", output,
                    "--set", "run.allow_long_sequences=true", "--progress", "off", ranks=2)
    assert out.result.returncode == 0 and output.exists(), out.describe()


# ------------------------------------------------------------------ issue 21 (item 12): a model that does not
# fit its GPUs is refused before loading, with the planner's figure, the free memory and the
# smallest layout that fits (run.memory_limit_gib stands in for a GPU's free memory on the CPU)

def tiny_limit_between(ranks_short: int, ranks_enough: int) -> float:
    """A memory limit (GiB) that ``ranks_enough`` ranks of the tiny model fit and ``ranks_short`` do not."""
    from moe_hpc.config.cluster import GIB
    from moe_hpc.config.run_config import load_config
    from moe_hpc.planner.fit import rank_memory
    cfg = load_config(TINY)
    need = {n: max(m.total for m in rank_memory(cfg, n, 24)) for n in (ranks_short, ranks_enough)}
    assert need[ranks_enough] < need[ranks_short]
    return (need[ranks_short] + need[ranks_enough]) / 2 / GIB


@pytest.mark.parametrize("dry", [False, True], ids=["run", "dry-run"])
def test_a_model_that_does_not_fit_is_refused_before_loading(dry, tmp_path, tiny_files):
    weights, inputs = tiny_files
    output = tmp_path / "out.h5"
    limit = tiny_limit_between(3, 4)            # 2 ranks and 3 do not fit; 4 do
    out = run_ranks("run", TINY, "--weights", weights, "--input", inputs, "--output", output,
                    "--set", f"run.memory_limit_gib={limit!r}", *(["--dry-run"] if dry else []), ranks=2)
    assert_clean_failure(out, 2, ("the model does not fit: rank 0 needs 2.00 GiB (dense weights",
                                  "of 2.00 GiB free", "smallest layout that fits: 4 ranks"), output)


def test_the_dry_run_prints_the_memory_comparison(tmp_path, tiny_files):
    weights, inputs = tiny_files
    out = run_ranks("run", TINY, "--weights", weights, "--input", inputs, "--output", tmp_path / "o.h5",
                    "--dry-run", "--set", "run.memory_limit_gib=4", ranks=2)
    assert out.result.returncode == 0, out.describe()
    assert "memory: rank 0 needs 2.00 GiB" in out.result.stdout and "of 4.00 GiB free: fits" in out.result.stdout, \
        out.describe()
