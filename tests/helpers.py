"""What the tests share (no fixtures here: those are in conftest.py).

- launching ``moe-hpc`` as one process or under ``mpiexec`` (``moe_hpc_cmd``, ``moe_hpc``): the
  one launcher every test uses, always under a timeout, so a hang fails the test, not the job;
- the bad-input contract (``run_ranks``, ``assert_clean_failure``): one ``error:`` line, every
  rank non-zero, quickly, nothing written;
- stopping, signalling and killing the ranks of a running job deterministically;
- comparing outputs bit for bit and against the float64 reference.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest

from moe_hpc.model.reference import TIE_MARGIN

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "inputs" / "tiny.toml"
MPI_TIMEOUT = 120
CHUNKED = ["--set", "run.chunk_sequences=1"]      # many chunks, so a signal lands mid-run


# ---------------------------------------------------------------- launching moe-hpc

def find_mpiexec() -> str | None:
    """The mpiexec beside this Python (the [mpi] extra's MPICH) first, then PATH."""
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


MPIEXEC = find_mpiexec()

needs_mpiexec = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (install the [mpi] extra)")

def rank_env(**extra) -> dict:
    """The environment of test ranks: one BLAS thread each (ranks share 2 cores in CI)."""
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1",
                OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_rmaps_base_oversubscribe="1", **extra)


def transform_dataset(name: str, fn):
    """An h5py edit: replace dataset ``name`` by ``fn(its data)`` (for making bad files)."""
    def edit(f):
        data = fn(f[name][()])
        del f[name]
        f.create_dataset(name, data=data)
    return edit



@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    wall_s: float = 0.0

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]


def moe_hpc_cmd(*args, ranks: int | None = None, program: str | None = None) -> list[str]:
    """``python -m moe_hpc.cli ARGS`` (or ``python -c PROGRAM ARGS``), under ``mpiexec -n ranks``
    when ``ranks`` is given."""
    python = [sys.executable, *(["-m", "moe_hpc.cli"] if program is None else ["-c", program]), *map(str, args)]
    return python if ranks is None else [MPIEXEC, "-n", str(ranks), *python]


def start_tagged(*args, ranks: int, tag: str) -> subprocess.Popen:
    """``moe-hpc ARGS`` under ``mpiexec -n ranks`` in the background, its ranks tagged with
    MOE_HPC_TEST_TAG so a test can find, freeze or kill them by tag."""
    return subprocess.Popen(moe_hpc_cmd(*args, ranks=ranks), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=rank_env(MOE_HPC_TEST_TAG=tag))


def moe_hpc(*args, ranks: int | None = None, timeout: float = MPI_TIMEOUT, cwd=None, program: str | None = None,
            **env) -> Result:
    """Run ``moe-hpc ARGS`` (see ``moe_hpc_cmd``) to its end; a hang fails the test."""
    cmd = moe_hpc_cmd(*args, ranks=ranks, program=program)
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=rank_env(**env))
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"moe-hpc hung: no exit within {timeout} s (MPI hang?)\ncommand: {cmd}\n"
                    f"stderr so far:\n{exc.stderr}")
    return Result(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - t0)


def run_args(weights, inputs, output, *extra):
    return ["run", TINY, "--weights", weights, "--input", inputs, "--output", output, *CHUNKED, *extra]


# ---------------------------------------------------------------- text prompts

WORDS = ["<unk>", "<s>", "</s>", "hello", "world", "the", "cat", "sat", "on", "mat", "café"]
BOS, EOS = 1, 2


def build_tokenizer(folder, bos: bool = True, size: int = len(WORDS)):
    """tokenizer.json of a word-level model (WORDS, then w11, w12, ... up to ``size`` ids, so
    every id a model of that vocabulary generates decodes); with ``bos`` its post-processor
    prepends <s>. Skips the test when Hugging Face tokenizers (extra [text]) is not installed."""
    tokenizers = pytest.importorskip("tokenizers", reason="Hugging Face tokenizers is not installed (extra [text])")
    words = WORDS + [f"w{i}" for i in range(len(WORDS), size)]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    if bos:
        tok.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    folder.mkdir(exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder


# ---------------------------------------------------------------- outputs

def assert_same_output(a: Path, b: Path, scratch: Path, timing_attr: str = "wall_time_s") -> None:
    """Bit for bit: the two files' bytes are equal once the wall-time attribute (which a resumed
    run cannot share) is set to 0 in copies of both; then every dataset is equal too."""
    copies = []
    for i, path in enumerate((a, b)):
        copy = scratch / f"same-output-{i}.h5"
        shutil.copy(path, copy)
        with h5py.File(copy, "r+") as f:
            f.attrs.modify(timing_attr, 0.0)          # in place: same size, same place
        copies.append(np.fromfile(copy, np.uint8))
    assert copies[0].size == copies[1].size, f"{a} has {copies[0].size} bytes, {b} {copies[1].size}"
    differ = np.flatnonzero(copies[0] != copies[1])
    assert differ.size == 0, f"{a} and {b} differ at byte(s) {differ[:20]}"


def split_difference(a, b, ref, lengths):
    """Worst per-token relative difference between two outputs over tie-clear tokens."""
    L = a.shape[1]
    clear = (np.arange(L)[None, :] < lengths[:, None]) & (ref.margin >= TIE_MARGIN)
    diff = np.linalg.norm(a - b, axis=-1) / np.maximum(np.linalg.norm(b, axis=-1), 1e-30)
    return float(diff[clear].max())


# ---------------------------------------------------------------- the bad-input contract

RUN_TIMEOUT = 60          # subprocess limit: a hang fails the test instead of the job

FAST_ENOUGH = 30.0        # a clean failure must be far quicker than the limit

EXIT_TAG = "[bad-input-test] rank-exit"


# Runs ``moe_hpc.cli.main`` like ``python -m moe_hpc.cli`` does, then reports this rank's exit
# status on stderr (a rank that is aborted or killed reports nothing, which the tests catch).
WRAPPER = f"""
import os
import sys
from moe_hpc.cli import main
rc = main(sys.argv[1:])
try:
    from mpi4py import MPI
    rank = MPI.COMM_WORLD.Get_rank()
except Exception:
    rank = "?"
sys.stderr.flush()
os.write(2, ("{EXIT_TAG} rank=%s rc=%s\\n" % (rank, rc)).encode())   # one write: never split
sys.exit(rc)
"""


EXIT_RE = re.compile(re.escape(EXIT_TAG) + r" rank=(\S+) rc=(-?\d+)\n?")

ERROR_START = re.compile(r"error: ")   # anywhere: merged lines glue it to other text


def error_messages(stderr: str) -> list[str]:
    """Every ``error:`` message in ``stderr``, also when ranks' lines got merged.

    Under mpiexec the ranks share one stderr pipe, and ``print`` writes a message and its
    newline separately, so two ranks' lines can end up on one line ("error: Aerror: B").
    Counting lines that start with ``error:`` would then miss one; this counts each start.
    """
    found = []
    for line in stderr.splitlines():
        starts = [m.start() for m in ERROR_START.finditer(line)]
        for a, b in zip(starts, starts[1:] + [len(line)]):
            found.append(line[a:b].rstrip())
    return found


@dataclass
class Outcome:
    result: Result
    wall_s: float
    rank_codes: dict          # world rank -> exit status reported by that rank
    stderr: str               # stderr without the wrapper's exit reports

    @property
    def error_lines(self) -> list[str]:
        return error_messages(self.stderr)

    def describe(self) -> str:
        return (f"\n--- returncode {self.result.returncode}, {self.wall_s:.1f} s, "
                f"per-rank exit {self.rank_codes}\n--- stderr:\n{self.result.stderr}"
                f"--- stdout:\n{self.result.stdout}")


def run_ranks(*args, ranks: int) -> Outcome:
    """``mpiexec -n ranks moe-hpc ARGS`` with per-rank exit reporting and wall time."""
    r = moe_hpc(*args, ranks=ranks, timeout=RUN_TIMEOUT, program=WRAPPER)
    codes = {rank: int(rc) for rank, rc in EXIT_RE.findall(r.stderr)}
    return Outcome(r, r.wall_s, codes, EXIT_RE.sub("", r.stderr))


def assert_clean_failure(out: Outcome, ranks: int, needles, output: Path,
                         output_is_dir: bool = False) -> None:
    """The whole bad-input contract for one finished run."""
    info = out.describe()
    assert out.wall_s < FAST_ENOUGH, f"failure took {out.wall_s:.1f} s (hang?){info}"
    assert out.result.returncode != 0, f"the run succeeded on bad input{info}"
    assert "Traceback" not in out.stderr, f"a traceback was printed{info}"
    assert len(out.rank_codes) == ranks, \
        f"only ranks {sorted(out.rank_codes)} of {ranks} exited normally (abort/kill?){info}"
    assert all(rc != 0 for rc in out.rank_codes.values()), \
        f"some rank exited 0 on bad input{info}"
    assert len(out.error_lines) == 1, \
        f"expected exactly one 'error:' line over all ranks, got {len(out.error_lines)}{info}"
    line = out.error_lines[0]
    assert "internal error" not in line, f"bad input reported as an internal error (a bug){info}"
    for needle in needles:
        assert str(needle) in line, f"the error line does not name {str(needle)!r}{info}"
    tmp = output.with_name(output.name + ".tmp")
    if output_is_dir:
        assert output.is_dir() and not any(output.iterdir()), f"output directory was altered{info}"
    else:
        assert not output.exists(), f"a file appeared at the output path {output}{info}"
    assert not tmp.exists(), f"a leftover {tmp} remains{info}"
    record = output.with_name(output.name + ".progress.json")
    assert not record.exists(), f"a leftover {record} remains{info}"


def edited(src: Path, dst: Path, edit) -> Path:
    """Copy ``src`` to ``dst`` and apply ``edit(h5py.File)`` to the copy."""
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        edit(f)
    return dst


# ---------------------------------------------------------------- stopping and killing ranks

def progress_record(output: Path) -> dict | None:
    try:
        return json.loads(output.with_name(output.name + ".progress.json").read_text())
    except (OSError, ValueError):
        return None


def wait_for_chunks(output: Path, chunks: int, proc=None, timeout: float = 60) -> int:
    """Poll the progress record until ``chunks`` chunks are recorded; returns how many are."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = progress_record(output)
        if record and record["chunks_done"] >= chunks:
            return record["chunks_done"]
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {chunks} chunks were recorded")
        time.sleep(0.01)
    raise AssertionError(f"{output}: fewer than {chunks} chunks recorded after {timeout} s")


def rank_pids(tag: str) -> dict[int, int]:
    """{MPI rank: pid} of the moe-hpc ranks started with MOE_HPC_TEST_TAG=tag (from /proc).

    Ranks are the Python processes with the tag in their environment (not the launchers).
    """
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv0 = (entry / "cmdline").read_bytes().split(b"\0")[0]
            env = dict(kv.split(b"=", 1) for kv in (entry / "environ").read_bytes().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if env.get(b"MOE_HPC_TEST_TAG") == tag.encode() and "python" in Path(argv0.decode()).name:
            rank = env.get(b"PMI_RANK") or env.get(b"SLURM_PROCID") or b"0"
            found[int(rank)] = int(entry.name)
    return found


def signal_ranks(pids, signum) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def shm_segments() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("mpich_*")}


def remove_stale_shm(before: set[str]) -> None:
    """Remove the MPICH shared-memory segments that appeared since ``before`` and that no
    process maps any more: a killed rank never unlinks its node's segment, and a later job whose
    id hashes to the same name would attach to the stale one and fail in MPI_Init."""
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            mapped |= {line.rsplit("/", 1)[-1] for line in maps.read_text().splitlines() if "/dev/shm/mpich_" in line}
        except OSError:
            pass
    for name in shm_segments() - before - mapped:
        (Path("/dev/shm") / name).unlink(missing_ok=True)


def signal_pending(pid: int, signum: int) -> bool:
    """Is ``signum`` pending for process ``pid`` (e.g. queued while it is stopped)?"""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    masks = [int(line.split()[1], 16) for line in status.splitlines() if line.startswith(("SigPnd:", "ShdPnd:"))]
    return any(mask & (1 << (signum - 1)) for mask in masks)


def stopped(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except OSError:
        return True        # gone: nothing left to wait for


def freeze_ranks(tag: str, ranks: int, timeout: float = 30) -> dict[int, int]:
    """Find the ``ranks`` ranks tagged ``tag`` and stop them (SIGSTOP); returns {rank: pid}.

    Waits until they really are stopped: a signal sent before that could be handled at once.
    """
    deadline = time.monotonic() + timeout
    while len(pids := rank_pids(tag)) < ranks:
        assert time.monotonic() < deadline, f"found ranks {pids}, expected {ranks}"
        time.sleep(0.05)
    signal_ranks(pids.values(), signal.SIGSTOP)
    while not all(stopped(pid) for pid in pids.values()):
        assert time.monotonic() < deadline, "the ranks did not stop"
        time.sleep(0.01)
    return pids


def signal_midway(tag: str, ranks: int, send, signum: int, timeout: float = 30) -> None:
    """Deliver ``signum`` to every rank mid-run, deterministically on any machine speed.

    Freeze the ranks, call ``send()`` (which signals a launcher or the batch script), wait until
    the launcher has passed the signal on to every rank, then let them go on: they see it at
    their next chunk boundary, with chunks left to do.
    """
    pids = freeze_ranks(tag, ranks, timeout)
    deadline = time.monotonic() + timeout
    try:
        send()
        while not all(signal_pending(pid, signum) for pid in pids.values()):
            assert time.monotonic() < deadline, "the launcher did not pass the signal on to every rank"
            time.sleep(0.02)
    finally:
        signal_ranks(pids.values(), signal.SIGCONT)


def kill_rank_midway(tag: str, ranks: int, victim: int = 1) -> float:
    """SIGKILL rank ``victim`` mid-run (the others frozen meanwhile, so the run cannot end
    first), let the others go on; returns the monotonic time of the kill."""
    pids = freeze_ranks(tag, ranks)
    t0 = time.monotonic()
    signal_ranks([pids[victim]], signal.SIGKILL)
    signal_ranks([pid for rank, pid in pids.items() if rank != victim], signal.SIGCONT)
    return t0


# ---------------------------------------------------------------- Hugging Face fixtures
HF_FIXTURES = REPO / "tests" / "fixtures"


def fixture(family: str) -> Path:
    return HF_FIXTURES / f"hf_{family}"


def reference(family: str):
    """-> (transformers' logits [S, L, V] float32, tokens [S, L], lengths [S])."""
    with h5py.File(fixture(family) / "reference.h5", "r") as f:
        return f["hf_logits"][()], f["tokens"][()], f["lengths"][()]


def logit_errors(logits: np.ndarray, family: str) -> np.ndarray:
    """Relative error of each valid position's logit vector against transformers'."""
    want, _, lengths = reference(family)
    valid = np.arange(want.shape[1])[None, :] < lengths[:, None]
    err = np.linalg.norm(logits - want, axis=-1) / np.maximum(np.linalg.norm(want, axis=-1), 1e-30)
    return err[valid]


def bf16_values(dset) -> np.ndarray:
    raw = dset[()]
    return (raw.astype(np.uint32) << 16).view(np.float32) if raw.dtype == np.uint16 else raw


# ---------------------------------------------------------------- generation (moe-hpc generate)

GENERATED = ("generated", "generated_lengths", "generated_logprobs", "finish_reason")

def read_generated(output: Path) -> dict:
    with h5py.File(output, "r") as f:
        return {name: f[name][()] for name in GENERATED}


def prompts_of(path: Path) -> list[np.ndarray]:
    with h5py.File(path, "r") as f:
        tokens, lengths = f["tokens"][()], f["lengths"][()]
    return [tokens[s, :n] for s, n in enumerate(lengths)]


def assert_steps_equal_full_forward(got: dict, model, tmp: Path, new_tokens: int, *run_args) -> None:
    """Each token's log-probability from the cached decode equals ``run``'s over prompt + tokens."""
    prompts = prompts_of(model[4])
    L = max(len(p) for p in prompts) + new_tokens
    tokens, lengths = np.zeros((len(prompts), L), np.int64), np.zeros(len(prompts), np.int64)
    for s, p in enumerate(prompts):
        n = got["generated_lengths"][s]
        seq = np.concatenate([p, got["generated"][s, :n]])
        tokens[s, :len(seq)], lengths[s] = seq, len(seq)
    full = tmp / "full.h5"
    with h5py.File(full, "w") as f:
        f.attrs["format"] = "moe_hpc.input/1"
        f["tokens"], f["lengths"] = tokens, lengths
    out = tmp / "full_out.h5"
    config, args, _, weights, _ = model
    r = moe_hpc("run", config, "--weights", weights, "--input", full, "--output", out, "--progress", "off",
                "--set", "run.logprobs=true", *args, *run_args)
    assert r.returncode == 0, r.stderr
    with h5py.File(out, "r") as f:
        lp = f["logprobs"][()]
    # log p(token i) is read at the position before it: prompt length - 1 + i
    diffs = np.concatenate([got["generated_logprobs"][s, :got["generated_lengths"][s]]
                            - lp[s, len(p) - 1:len(p) - 1 + got["generated_lengths"][s]]
                            for s, p in enumerate(prompts)])
    assert np.median(np.abs(diffs)) < 1e-2 and np.mean(np.abs(diffs) < 5e-2) >= 0.9, diffs


GENERATE_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"]


def assert_generate_equals_transformers(family: str, tmp: Path, *args, ranks: int | None = None) -> int:
    """transformers' own greedy continuations (fp32, six prompts of 1-24 tokens, 16 new tokens;
    tests/fixtures/make_generate_fixtures.py, run on the device) equal ``moe-hpc generate``'s
    (``args``: its extra options), step by step, until the first step near a tie: transformers'
    top-1/top-2 gap under 1e-2, or the float64 reference's own clear steps (gap, or a routing
    margin bf16 may flip). -> the steps compared (at least 4: a test must compare some)."""
    from moe_hpc.model.reference import reference_generate
    from moe_hpc.tools.hf_import import import_hf
    folder = fixture(family)
    ref_file = folder / "generate_reference.h5"
    with h5py.File(ref_file, "r") as f:
        want, gaps, new = f["generated"][()], f["hf_gap"][()], int(f.attrs["new_tokens"])
        want_logprobs = f["hf_logprobs"][()]
    weights = tmp / "weights.h5"
    import_hf(folder, tmp / "model.toml", weights, log=lambda text: None)
    reference = reference_generate(weights, prompts_of(ref_file), new)
    out = tmp / "out.h5"
    r = moe_hpc("generate", folder, "--weights", folder, "--input", ref_file, "--output", out,
                "--max-new-tokens", new, "--ignore-eos", "--progress", "off", *args, ranks=ranks)
    assert r.returncode == 0, r.stderr
    result = read_generated(out)
    got = result["generated"]
    compared = 0
    for s, ref in enumerate(reference):
        near = np.flatnonzero(gaps[s] < 1e-2)
        k = min(ref.clear_steps(), near[0] if near.size else new)
        assert (ref.tokens[:k] == want[s, :k]).all(), ("float64 reference vs transformers", s, k)
        assert (got[s, :k] == want[s, :k]).all(), ("engine vs transformers", s, k, got[s], want[s])
        # and the chosen token's log-probability, bf16 against transformers' fp32
        np.testing.assert_allclose(result["generated_logprobs"][s, :k], want_logprobs[s, :k], atol=5e-2,
                                   err_msg=f"log-probs, engine vs transformers, sequence {s}")
        compared += k
    print(f"{family}: {compared} of {got.size} steps compared")
    assert compared >= 4, compared      # the random fixtures tie often
    return compared
