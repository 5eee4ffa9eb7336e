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

The section "issue 21: outputs a user can trust" at the end holds the output-side cases (an
output that is an input or a special file, report paths, one job per output, a full disk, an
error found mid-run, the strict summary); docs/guarantees.md lists them all.

Bad files are copies of the session's good ``tiny_files`` edited with h5py.  Each rank runs
through a small wrapper that prints its own exit status, so "every rank exits non-zero" is
checked per rank rather than through mpiexec's combined exit code.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py
import ml_dtypes
import numpy as np
import pytest

from helpers import (FAST_ENOUGH, TINY, Outcome, assert_clean_failure, build_tokenizer, edited, needs_mpiexec,
                     run_ranks)

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
    pytest.param(set_case("run.transport=ipc", needles=("run.transport = 'ipc' needs the GPU backend",)),
                 2, id="set-ipc-transport-on-cpu"),
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


# ------------------------------------------------------------------ issue 21 item 7: HF shard paths outside the folder
# A Hugging Face index is data: a weight_map entry that resolves outside the checkpoint folder
# (``..``, an absolute path, a link) is refused by name, by ``run`` and by ``import-hf``, even
# when a valid shard lies there; a hub-cache snapshot (files linked into the repo's blobs/) works.

HF_SHARD = "model-00003-of-00003.safetensors"


def hf_pointing_outside(tmp: Path, target: str) -> Path:
    """A copy of the Mixtral fixture whose index sends its last shard's tensors to ``target``;
    a valid copy of that shard waits at ``<tmp>/outside/x.safetensors``."""
    from helpers import fixture
    folder = tmp / "ckpt"
    shutil.copytree(fixture("mixtral"), folder)
    (tmp / "outside").mkdir()
    shutil.move(folder / HF_SHARD, tmp / "outside" / "x.safetensors")
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {k: (target if v == HF_SHARD else v) for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    return folder


OUTSIDE = {"dotdot": "../outside/x.safetensors", "absolute": "/etc/passwd", "link": "link.safetensors"}


def _outside_case(tmp: Path, kind: str) -> Path:
    folder = hf_pointing_outside(tmp, OUTSIDE[kind])
    if kind == "link":
        (folder / "link.safetensors").symlink_to(tmp / "outside" / "x.safetensors")
    return folder


@pytest.mark.parametrize("kind", OUTSIDE)
def test_hf_run_refuses_shard_outside_folder(kind, tmp_path):
    folder = _outside_case(tmp_path, kind)
    out = tmp_path / "out.h5"
    outcome = run_ranks("run", folder, "--weights", folder, "--input", folder / "reference.h5", "--output", out,
                        "--set", "parallel.dense_ranks=1", ranks=2)
    assert_clean_failure(outcome, 2, ("model.safetensors.index.json", OUTSIDE[kind],
                                      "outside the checkpoint folder"), out)


@pytest.mark.parametrize("kind", OUTSIDE)
def test_hf_import_refuses_shard_outside_folder(kind, tmp_path):
    from moe_hpc.config.errors import InputError
    from moe_hpc.tools.hf_import import import_hf
    folder = _outside_case(tmp_path, kind)
    cfg, weights = tmp_path / "m.toml", tmp_path / "w.h5"
    with pytest.raises(InputError, match="outside the checkpoint folder") as exc:
        import_hf(folder, cfg, weights, log=lambda text: None)
    assert OUTSIDE[kind] in str(exc.value)
    assert not any(p.exists() for p in (cfg, weights, weights.with_name("w.h5.tmp")))


def hub_snapshot(tmp: Path, family: str) -> Path:
    """The fixture laid out as huggingface_hub caches it: ``snapshots/<rev>/<file>`` are links
    to ``../../blobs/<hash>``."""
    from helpers import fixture
    repo = tmp / f"models--tiny--{family}"
    snapshot, blobs = repo / "snapshots" / "0123abcd", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, src in enumerate(sorted(fixture(family).iterdir())):
        shutil.copy(src, blobs / f"blob{i}")
        (snapshot / src.name).symlink_to(Path("..", "..", "blobs", f"blob{i}"))
    return snapshot


@pytest.mark.parametrize("family", ["mixtral", "olmoe"])   # an index, and one model.safetensors
def test_hf_hub_cache_snapshot_still_imports(family, tmp_path):
    from moe_hpc.tools.hf_import import import_hf
    snapshot = hub_snapshot(tmp_path, family)
    model = import_hf(snapshot, tmp_path / "m.toml", tmp_path / "w.h5", log=lambda text: None)
    assert model.num_layers >= 1 and (tmp_path / "w.h5").exists()


# ------------------------------------------------------------------ issue 21 item 5: config values out of type or range
# A --set value too large for any count, or a config.json field of the wrong type, is one
# ``error:`` line naming the key (and the file), before the output is opened: no partial.

def test_huge_set_value_is_a_config_error(tmp_path, tiny_files):
    weights, inputs = tiny_files
    case = Case(weights, inputs, tmp_path / "out.h5",
                ("run.micro_batch_tokens must be at most 2147483647", "99999999999999999999999"),
                ("--set", "run.micro_batch_tokens=99999999999999999999999"))
    assert_clean_failure(run_cmd(case, 2), 2, case.needles, case.output)


def test_model_size_set_against_the_checkpoint_is_refused_before_placement(tmp_path, tiny_files):
    """A mistyped model size is refused by the checkpoint's model table before the placement is
    built for it (which, at 10^8 experts, ran out of memory as an internal error)."""
    weights, inputs = tiny_files
    case = Case(weights, inputs, tmp_path / "out.h5",
                ("checkpoint has model.num_experts = 8 but the run config has 100000000",),
                ("--set", "model.num_experts=100000000"))
    assert_clean_failure(run_cmd(case, 2), 2, case.needles, case.output)


@pytest.mark.parametrize("key, value, needle", [
    ("num_local_experts", "eight", "num_local_experts must be an integer, got 'eight'"),
    ("num_local_experts", 8.5, "num_local_experts must be an integer, got 8.5"),
    ("hidden_size", True, "hidden_size must be an integer, got True"),
])
def test_hf_config_json_bad_field_names_file_and_key(key, value, needle, tmp_path):
    from helpers import fixture
    folder = tmp_path / "ckpt"
    shutil.copytree(fixture("mixtral"), folder)
    values = json.loads((folder / "config.json").read_text())
    values[key] = value
    (folder / "config.json").write_text(json.dumps(values))
    out = tmp_path / "out.h5"
    outcome = run_ranks("run", folder, "--weights", folder, "--input", folder / "reference.h5", "--output", out,
                        ranks=2)
    assert_clean_failure(outcome, 2, (folder / "config.json", needle), out)


# ================================================================== issue 21: outputs a user can trust
# Inputs are never overwritten, an output that is not a regular file is refused, every path the
# job writes is checked before any work, one job per output, a full disk or an error found
# mid-run keeps the finished chunks for resume, and the summary is strict JSON. Every case
# works on copies in tmp_path: on the code before these checks it destroys what it names.

import errno
import signal
import socket
import subprocess
import uuid

from moe_hpc.config.errors import OutputError
from moe_hpc.files import lock as lock_module
from moe_hpc.files.lock import OutputLock, lock_path_for

from helpers import (assert_same_output, error_messages, fixture, freeze_ranks, moe_hpc, progress_record, run_args,
                     signal_ranks, start_tagged, transform_dataset, wait_for_chunks)


def _assert_refused(out: Outcome, ranks: int, needles) -> str:
    """One clean ``error:`` line naming every needle, every rank non-zero, fast; -> the line."""
    info = out.describe()
    assert out.wall_s < FAST_ENOUGH, f"refusal took {out.wall_s:.1f} s{info}"
    assert out.result.returncode != 0 and "Traceback" not in out.stderr, info
    assert len(out.rank_codes) == ranks and all(rc != 0 for rc in out.rank_codes.values()), info
    assert len(out.error_lines) == 1 and "internal error" not in out.error_lines[0], info
    for needle in needles:
        assert str(needle) in out.error_lines[0], f"the error line does not name {needle!r}{info}"
    return out.error_lines[0]


def _local_copies(tmp: Path, weights: Path, inputs: Path) -> tuple[Path, Path]:
    w, i = tmp / "weights.h5", tmp / "inputs.h5"
    shutil.copy(weights, w)
    shutil.copy(inputs, i)
    return w, i


@pytest.mark.parametrize("target", ["input", "input-other-spelling", "weights-through-link", "input-tmp"])
def test_output_that_is_an_input_is_refused(target, tmp_path, tiny_files):
    weights, inputs = _local_copies(tmp_path, *tiny_files)
    (tmp_path / "sub").mkdir()
    if target == "weights-through-link":
        output = tmp_path / "link.h5"
        output.symlink_to(weights)
    else:
        output = {"input": inputs, "input-other-spelling": tmp_path / "sub" / ".." / "." / "inputs.h5",
                  "input-tmp": tmp_path / "inputs"}[target]
    if target == "input-tmp":          # the run's <output>.tmp would be the input
        shutil.move(inputs, tmp_path / "inputs.tmp")
        inputs = tmp_path / "inputs.tmp"
    before = {p: p.read_bytes() for p in (weights, inputs)}
    out = run_ranks("run", TINY, "--weights", weights, "--input", inputs, "--output", output, "--overwrite",
                    ranks=2)
    _assert_refused(out, 2, ("is the same file as", "never replaces an input"))
    assert all(p.is_file() and p.read_bytes() == data for p, data in before.items()), "an input was changed"
    assert not Path(str(output) + ".tmp").exists() or target == "input-tmp"


def test_output_in_hf_checkpoint_folder_is_refused(tmp_path):
    folder = tmp_path / "hf_mixtral"
    shutil.copytree(fixture("mixtral"), folder)
    shard = folder / "model-00002-of-00003.safetensors"
    before = shard.read_bytes()
    out = run_ranks("run", folder, "--weights", folder, "--input", folder / "reference.h5", "--output", shard,
                    "--overwrite", ranks=2)
    _assert_refused(out, 2, (shard, "is the same file as"))
    assert shard.read_bytes() == before


def _fifo(tmp: Path) -> Path:
    path = tmp / "out.h5"
    os.mkfifo(path)
    return path


def _char_device(tmp: Path) -> Path:
    """A copy of /dev/null's device node (as root), which the old code turned into a file."""
    import stat
    path = tmp / "null"
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except (PermissionError, OSError) as exc:
        pytest.skip(f"cannot make a device node here ({exc}); the FIFO case covers the check")
    return path


@pytest.mark.parametrize("make", [_fifo, _char_device], ids=["fifo", "device-node"])
def test_output_not_a_regular_file_is_refused(make, tmp_path, tiny_files):
    output = make(tmp_path)
    kind = os.stat(output).st_mode
    out = run_ranks("run", TINY, "--weights", tiny_files[0], "--input", tiny_files[1], "--output", output,
                    "--overwrite", ranks=2)
    _assert_refused(out, 2, (output, "not a regular file"))
    assert os.stat(output).st_mode == kind, "the special file was replaced"


@pytest.mark.parametrize("dry", [(), ("--dry-run",)], ids=["run", "dry-run"])
def test_summary_path_in_missing_dir_is_refused_before_work(dry, tmp_path, tiny_files):
    report = tmp_path / "no_such_dir" / "summary.json"
    case = Case(*tiny_files, tmp_path / "out.h5", (report, "does not exist"), ("--summary", report, *dry))
    assert_clean_failure(run_cmd(case, 2), 2, case.needles, case.output)


def test_summary_that_is_the_output_is_refused(tmp_path, tiny_files):
    output = tmp_path / "out.h5"
    case = Case(*tiny_files, output, (output, "is the same file as"), ("--summary", tmp_path / "." / "out.h5"))
    assert_clean_failure(run_cmd(case, 2), 2, case.needles, case.output)


# ------------------------------------------------------------------ one job per output

def test_second_job_on_a_live_output_is_refused(tiny_files, long_input, uninterrupted, tmp_path):
    """Job A runs; B on the same output (with --restart and another dtype, which used to replace
    A's file mid-run) is refused naming A's host and pid; A then finishes untouched."""
    out, tag = tmp_path / "out.h5", uuid.uuid4().hex
    args = run_args(tiny_files[0], long_input, out)
    first = start_tagged(*args, ranks=2, tag=tag)
    try:
        wait_for_chunks(out, 1, first)
        pids = freeze_ranks(tag, 2)             # A cannot finish while B tries
        try:
            second = run_ranks(*args, "--restart", "--set", "run.output_dtype=float32", ranks=2)
        finally:
            signal_ranks(pids.values(), signal.SIGCONT)
        _, err = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    _assert_refused(second, 2, (out, "another job is writing this output", f"pid {pids[0]}",
                                f"host {socket.gethostname()}"))
    assert first.returncode == 0, err
    assert_same_output(out, uninterrupted(2), tmp_path)
    assert not lock_path_for(out).exists() and progress_record(out) is None


def test_dry_run_on_a_held_output_says_what_the_run_would(tmp_path, tiny_files):
    """The dry run of a job whose output another job holds is refused like the run, naming the
    holder, and leaves the holder's lock file alone."""
    weights, inputs = tiny_files
    output = tmp_path / "out.h5"
    with OutputLock(output):
        out = run_ranks("run", TINY, "--weights", weights, "--input", inputs, "--output", output, "--dry-run",
                        ranks=2)
        _assert_refused(out, 2, ("another job is writing this output", f"pid {os.getpid()}"))
        assert lock_path_for(output).exists()


def test_output_lock_excludes_a_second_holder(tmp_path):
    out = tmp_path / "out.h5"
    with OutputLock(out):
        with pytest.raises(OutputError, match=f"another job is writing this output .host {socket.gethostname()}, "
                                              f"pid {os.getpid()}"):
            OutputLock(out)
    assert not lock_path_for(out).exists()
    OutputLock(out).release()                     # free again once released


def test_output_lock_without_flock_checks_the_holder_is_alive(tmp_path, monkeypatch):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(lock_module.fcntl, "flock", no_flock)
    out, host = tmp_path / "out.h5", socket.gethostname()
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        lock_path_for(out).write_text(f"{host} {sleeper.pid} 2026-01-01T00:00:00\n")
        with pytest.raises(OutputError, match=f"pid {sleeper.pid}.*remove {lock_path_for(out)}"):
            OutputLock(out)
    finally:
        sleeper.kill()
        sleeper.wait()
    with OutputLock(out):                          # its holder is gone: the record is stale
        assert lock_path_for(out).read_text().split()[:2] == [host, str(os.getpid())]


# ------------------------------------------------------------------ errors mid-run keep finished chunks

# ``moe-hpc`` whose rank 1 finds its disk full at its third write (after two finished chunks)
DISK_FULL = """
import errno, os, sys
from mpi4py import MPI
if MPI.COMM_WORLD.Get_rank() == 1:
    real, calls = os.pwrite, []
    def pwrite(fd, data, offset):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)
    os.pwrite = pwrite
from moe_hpc.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _assert_one_error_keeping_the_partial(full, needles) -> None:
    """A failed run that keeps its partial output: non-zero, one ``error:`` line naming every
    needle, neither an internal error nor a traceback."""
    errors = error_messages(full.stderr)
    assert full.returncode != 0 and len(errors) == 1, full.stderr
    for needle in needles:
        assert needle in errors[0], full.stderr
    assert "internal error" not in errors[0] and "Traceback" not in full.stderr, full.stderr


def test_disk_full_names_the_file_and_keeps_the_partial(tiny_files, long_input, uninterrupted, tmp_path):
    out = tmp_path / "out.h5"
    args = run_args(tiny_files[0], long_input, out)
    full = moe_hpc(*args, ranks=2, program=DISK_FULL)
    _assert_one_error_keeping_the_partial(full, (f"{out}.tmp: cannot write", "No space left on device",
                                                 "2 of 20 chunks are finished and kept",
                                                 "rerun the same command to resume"))
    assert progress_record(out)["chunks_done"] == 2
    rerun = moe_hpc(*args, ranks=2)
    assert rerun.returncode == 0 and "resuming at chunk 3 of 20" in rerun.stderr, rerun.stderr
    assert_same_output(out, uninterrupted(2), tmp_path)


# ``moe-hpc`` whose rank 0 finds the disk full when it renames the finished output
DISK_FULL_AT_THE_END = """
import errno, os, sys
from moe_hpc.files import batches
def publish(tmp, path, durable=True):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
batches.publish = publish
from moe_hpc.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_disk_full_while_finishing_keeps_every_chunk(tiny_files, long_input, uninterrupted, tmp_path):
    out = tmp_path / "out.h5"
    args = run_args(tiny_files[0], long_input, out)
    full = moe_hpc(*args, ranks=2, program=DISK_FULL_AT_THE_END)
    _assert_one_error_keeping_the_partial(full, (f"{out}.tmp: cannot finish the output (No space left on device)",
                                                 "every chunk is kept"))
    assert progress_record(out)["chunks_done"] == 20, full.stderr
    rerun = moe_hpc(*args, ranks=2)
    assert rerun.returncode == 0 and "all 20 chunk(s) are done" in rerun.stderr, rerun.stderr
    # the stats written by the failed attempt are replaced, and HDF5 does not reclaim their
    # space: equal datasets and attributes, not equal bytes
    with h5py.File(out, "r") as new, h5py.File(uninterrupted(2), "r") as old:
        for name in ("hidden", "stats/expert_tokens"):
            np.testing.assert_array_equal(new[name][()], old[name][()])
        assert {k: str(v) for k, v in new.attrs.items() if k != "wall_time_s"} == \
            {k: str(v) for k, v in old.attrs.items() if k != "wall_time_s"}


def test_error_found_mid_run_keeps_finished_chunks(tiny_files, long_input, uninterrupted, tmp_path):
    """A NaN that appears in the input's last sequence while the run is under way (no check
    before the work can see it) stops the run with the finished chunks kept; once the input is
    restored, the rerun resumes them to the uninterrupted output."""
    inputs, out, tag = tmp_path / "inputs.h5", tmp_path / "out.h5", uuid.uuid4().hex
    shutil.copy(long_input, inputs)
    with h5py.File(inputs, "r") as f:
        S, L, H = f["hidden"].shape
        where = f["hidden"].id.get_offset() + (S - 1) * L * H * 2        # sequence S-1, position 0
    stat = os.stat(inputs)
    args = run_args(tiny_files[0], inputs, out)
    run = start_tagged(*args, ranks=2, tag=tag)
    try:
        wait_for_chunks(out, 2, run)
        pids = freeze_ranks(tag, 2)
        with open(inputs, "r+b") as f:
            original = os.pread(f.fileno(), 2, where)
            os.pwrite(f.fileno(), bf16_bits(np.nan).tobytes(), where)
        signal_ranks(pids.values(), signal.SIGCONT)
        _, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
    errors = error_messages(err)
    assert run.returncode != 0 and len(errors) == 1, err
    for needle in (f"{inputs}: /hidden: NaN or Inf at sequence {S - 1}", "chunks are finished and kept in",
                   "rerun the same command to resume"):
        assert needle in errors[0], err
    done = progress_record(out)["chunks_done"]
    assert done >= 2 and out.with_name("out.h5.tmp").exists() and not out.exists()
    with open(inputs, "r+b") as f:                 # the input restored, as a file system would
        os.pwrite(f.fileno(), original, where)
    os.utime(inputs, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    rerun = moe_hpc(*args, ranks=2)
    assert rerun.returncode == 0 and f"resuming at chunk {done + 1} of 20" in rerun.stderr, rerun.stderr
    assert_same_output(out, uninterrupted(2), tmp_path)


# ------------------------------------------------------------------ the summary is strict JSON

def _no_nan(constant):
    raise AssertionError(f"the summary is not strict JSON: it holds {constant}")


def test_summary_of_an_all_padding_input_is_strict_json(tmp_path):
    """Every sequence one token long: no token has a next one, so no perplexity: null, not NaN."""
    folder = fixture("mixtral")
    inputs, out, summary = tmp_path / "inputs.h5", tmp_path / "out.h5", tmp_path / "summary.json"
    edited(folder / "reference.h5", inputs, transform_dataset("lengths", np.ones_like))
    r = moe_hpc("run", folder, "--weights", folder, "--input", inputs, "--output", out, "--summary", summary,
                "--set", "run.logprobs=true", "--progress", "off")
    assert r.returncode == 0, r.stderr
    for text in (r.stdout, summary.read_text()):
        values = json.loads(text, parse_constant=_no_nan)["summary"]
        assert values["perplexity"] is None and values["mean_logprob"] is None
        assert values["predicted_tokens"] == 0
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
    # a CPU run attends in tiles (no fused core), and its memory check counts those
    need = {n: max(m.total for m in rank_memory(cfg, n, 24, fused_core=False)) for n in (ranks_short, ranks_enough)}
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


@pytest.mark.parametrize("verb", ["run", "init-weights", "make-inputs", "placement-file"])
def test_an_output_over_the_config_or_placement_file_is_refused(verb, tmp_path, tiny_files):
    """The config TOML and a placement file are inputs too: no verb writes over them, even
    with --overwrite."""
    weights, inputs = _local_copies(tmp_path, *tiny_files)
    config = tmp_path / "tiny.toml"
    shutil.copy(TINY, config)
    if verb == "placement-file":
        target = tmp_path / "placement.h5"
        target.write_bytes(b"a placement file stands here")      # the check compares paths, not contents
        args = ("run", config, "--weights", weights, "--input", inputs, "--output", target,
                "--set", f"parallel.placement={target}")
    else:
        target = config
        args = {"run": ("run", config, "--weights", weights, "--input", inputs, "--output", target),
                "init-weights": ("init-weights", config, "-o", target),
                "make-inputs": ("make-inputs", config, "-o", target, "--sequences", "2", "--seq-len", "4")}[verb]
    before = target.read_bytes()
    out = run_ranks(*args, "--overwrite", ranks=1)
    _assert_refused(out, 1, ("is the same file as", "never replaces an input"))
    assert target.read_bytes() == before

# ------------------------------------------------------------------ issue 23: moe-hpc generate
# Each case gets one error: line naming the flag's key, the sequence or the layout, and nothing
# is written (tests/test_generate.py holds the good runs).

def _prompts(tmp: Path, lengths, L: int = 10) -> Path:
    return mixtral_tokens(tmp / "prompts.h5", np.ones((len(lengths), L), np.int64), np.array(lengths))


GENERATE_BAD = {
    "no-new-tokens": (["--max-new-tokens", "0"], ("generate.max_new_tokens must be >= 1, got 0",)),
    "negative-new-tokens": (["--max-new-tokens", "-3"], ("generate.max_new_tokens must be >= 1, got -3",)),
    "negative-temperature": (["--temperature", "-0.5"], ("generate.temperature must be >= 0, got -0.5",)),
    "negative-top-k": (["--top-k", "-1"], ("generate.top_k must be >= 0, got -1",)),
    "top-p-zero": (["--top-p", "0"], ("generate.top_p must be in (0, 1]", "got 0.0")),
    "top-p-above-one": (["--top-p", "1.5"], ("generate.top_p must be in (0, 1]", "got 1.5")),
    "negative-decode-slots": (["--decode-slots", "-1"], ("generate.decode_slots must be >= 0, got -1",)),
}


@pytest.mark.parametrize("case", GENERATE_BAD, ids=list(GENERATE_BAD))
def test_generate_bad_setting_is_one_error(case, tmp_path):
    flags, needles = GENERATE_BAD[case]
    output = tmp_path / "out.h5"
    out = run_ranks("generate", MIXTRAL, "--weights", MIXTRAL, "--input", _prompts(tmp_path, [3, 4]),
                    "--output", output, "--max-new-tokens", "4", *flags, ranks=2)
    assert_clean_failure(out, 2, needles, output)


def test_generate_empty_prompt_is_refused(tmp_path):
    output = tmp_path / "out.h5"
    out = run_ranks("generate", MIXTRAL, "--weights", MIXTRAL, "--input", _prompts(tmp_path, [3, 0]),
                    "--output", output, "--max-new-tokens", "4", ranks=2)
    assert_clean_failure(out, 2, ("sequence 1 has an empty prompt",), output)


def test_generate_past_max_positions_is_refused(tmp_path):
    """A prompt of 60 + 8 new tokens passes the Mixtral fixture's 64 positions."""
    output = tmp_path / "out.h5"
    out = run_ranks("generate", MIXTRAL, "--weights", MIXTRAL, "--input", _prompts(tmp_path, [4, 60], L=60),
                    "--output", output, "--max-new-tokens", "8", ranks=2)
    assert_clean_failure(out, 2, ("sequence 1: its prompt of 60 tokens plus generate.max_new_tokens = 8",
                                  "max_position_embeddings = 64"), output)


@pytest.mark.parametrize("vocab, needle", [(256, "generate needs token prompts (/tokens), this file has /hidden"),
                                           (0, "generate needs model.vocab_size > 0")], ids=["hidden", "no-vocab"])
def test_generate_needs_tokens_and_a_vocabulary(vocab, needle, tmp_path, tiny_files):
    weights, inputs = tiny_files          # /hidden inputs of a model without a vocabulary
    if vocab:                             # weights with the vocabulary, so only the input is wrong
        from moe_hpc.config.run_config import load_config
        from moe_hpc.tools.synth import write_checkpoint
        weights = tmp_path / "vocab_weights.h5"
        write_checkpoint(weights, load_config(TINY, [f"model.vocab_size={vocab}"]).model, seed=0)
    output = tmp_path / "out.h5"
    out = run_ranks("generate", TINY, "--weights", weights, "--input", inputs, "--output", output,
                    "--set", f"model.vocab_size={vocab}", ranks=2)
    assert_clean_failure(out, 2, (needle,), output)


def test_generate_whose_kv_cache_does_not_fit_is_refused_with_the_sequences_that_do(tmp_path):
    """One process (no mpiexec): under a limit the weights fit but 64 sequences' KV cache of
    10 + 4 positions does not: one error line naming the cache and the group size that fits,
    nothing written; that group size then runs."""
    from moe_hpc.config.cluster import GIB
    from moe_hpc.config.run_config import load_config
    from moe_hpc.planner.fit import rank_memory
    need = rank_memory(load_config(MIXTRAL, ["generate.max_new_tokens=4"]), 1, 10, 4, fused_core=False)[0]   # the CPU tiles
    one = need.kv_cache // 64
    limit = f"run.memory_limit_gib={(need.total - need.kv_cache + 20.5 * one) / GIB!r}"
    inputs, output = _prompts(tmp_path, [3, 4]), tmp_path / "out.h5"
    before = {p.name for p in tmp_path.iterdir()}
    run = lambda *extra: moe_hpc("generate", MIXTRAL, "--weights", MIXTRAL, "--input", inputs, "--output", output,
                                 "--max-new-tokens", "4", "--progress=off", "--set", limit, *extra)
    r = run()
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 1 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "the model does not fit" in lines[0] and "KV cache for 64 sequences x 14 positions" in lines[0], lines[0]
    assert "20 sequences per group fit (--set run.chunk_sequences=20)" in lines[0], lines[0]
    assert {p.name for p in tmp_path.iterdir()} == before
    r = run("--set", "run.chunk_sequences=20")
    assert r.returncode == 0 and output.exists(), r.stderr


# --prompts (text prompts): one error line, every rank non-zero, nothing written: not the output,
# its tokenised batch, OUT.jsonl nor the lock

def _text_checkpoint(tmp: Path, *prompt_lines: str) -> tuple[Path, Path]:
    """(a copy of the Mixtral fixture with a word-level tokenizer.json, prompts.jsonl of these lines)."""
    folder = tmp / "hf_mixtral"
    shutil.copytree(MIXTRAL, folder)
    build_tokenizer(folder, size=256)
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(line + "\n" for line in prompt_lines))
    return folder, prompts


def _nothing_written_beside(output: Path) -> None:
    from moe_hpc.files.prompts import completions_path, prompt_batch_path
    for path in (output, prompt_batch_path(output), completions_path(output), lock_path_for(output)):
        assert not path.exists(), f"{path} was written"


def _generate_text(folder: Path, prompts: Path, output: Path, *extra, ranks: int) -> Outcome:
    return run_ranks("generate", folder, "--weights", folder, "--prompts", prompts, "--output", output,
                     "--max-new-tokens", "4", *extra, ranks=ranks)


def test_generate_malformed_prompt_line_is_named_by_number(tmp_path):
    folder, prompts = _text_checkpoint(tmp_path, '{"prompt": "hello world"}', '{"prompt": "the cat', '{"prompt": "x"}')
    output = tmp_path / "out.h5"
    out = _generate_text(folder, prompts, output, ranks=2)
    assert_clean_failure(out, 2, (f"{prompts}:2", "not a JSON object"), output)
    _nothing_written_beside(output)


def test_generate_prompts_without_tokenizer_json_names_the_folder(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hello world"}\n')
    output = tmp_path / "out.h5"
    out = _generate_text(MIXTRAL, prompts, output, ranks=2)
    assert_clean_failure(out, 2, (f"{MIXTRAL}: no tokenizer.json in the checkpoint folder",), output)
    _nothing_written_beside(output)


def test_generate_input_and_prompts_together_is_one_error(tmp_path):
    folder, prompts = _text_checkpoint(tmp_path, '{"prompt": "hello world"}')
    output = tmp_path / "out.h5"
    out = _generate_text(folder, prompts, output, "--input", _prompts(tmp_path, [3]), ranks=2)
    assert_clean_failure(out, 2, ("generate needs exactly one of --input", "--prompts", "got both"), output)
    _nothing_written_beside(output)


NO_TOKENIZERS = """
import sys
sys.modules["tokenizers"] = None          # as if the [text] extra were not installed
from moe_hpc import cli
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("case", ["no-tokenizers-library", "completions-exist", "completions-over-the-prompts",
                                  "prompt-past-max-positions"])
def test_generate_prompts_refusals_on_one_process(case, tmp_path):
    """Single process (no mpiexec): the library missing names the extra; an existing OUT.jsonl
    is refused without --overwrite, and OUT.jsonl never replaces an input (here: the prompts); a
    prompt of 61 tokens (<s> and 60 words) + 4 new past the fixture's 64 positions is named by
    its line."""
    folder, prompts = _text_checkpoint(tmp_path, '{"prompt": "hello world"}', json.dumps({"prompt": "cat " * 60}))
    output = tmp_path / "out.h5"
    program, needles = None, ()
    if case == "no-tokenizers-library":
        program, needles = NO_TOKENIZERS, ("needs Hugging Face's tokenizers library", "moe_hpc[text]")
    elif case == "completions-exist":
        (tmp_path / "out.jsonl").write_text("{}\n")
        needles = (f"{tmp_path / 'out.jsonl'}: exists; pass --overwrite",)
    elif case == "prompt-past-max-positions":
        needles = (f"{prompts}:2: its prompt of 61 tokens plus generate.max_new_tokens = 4",
                   "max_position_embeddings = 64")
    else:
        prompts = prompts.rename(tmp_path / "out.jsonl")
        needles = (f"{tmp_path / 'out.jsonl'}: is the same file as",)
    before = {p.name for p in tmp_path.iterdir()}
    r = moe_hpc("generate", folder, "--weights", folder, "--prompts", prompts, "--output", output,
                "--max-new-tokens", "4", "--overwrite" if case == "completions-over-the-prompts" else "--progress=off",
                program=program)
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 1 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert all(n in lines[0] for n in needles), lines[0]
    assert {p.name for p in tmp_path.iterdir()} == before
