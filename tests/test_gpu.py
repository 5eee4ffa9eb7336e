"""GPU path: CUDA kernels against their NumPy twins, and whole runs on the GPU (every transport)
against the float64 reference. Skipped, with the reason, where CuPy or a GPU is missing."""
import json

import h5py
import numpy as np
import pytest

from moe_hpc.device.backend import cupy_or_none
from moe_hpc.device.dtypes import BF16
from moe_hpc.model.reference import compare, read_output_hidden, reference_forward

from helpers import (GENERATE_FAMILIES, REPO, TINY, assert_generate_equals_transformers, assert_steps_equal_full_forward,
                     moe_hpc, needs_mpiexec, read_generated)

cp = cupy_or_none()
needs_gpu = pytest.mark.skipif(cp is None, reason="no CuPy or no CUDA GPU on this machine (CPU CI)")
rng = np.random.default_rng(7)


def gpus() -> int:
    return cp.cuda.runtime.getDeviceCount() if cp is not None else 0


def bf(shape, std=1.0):
    return (rng.standard_normal(shape) * std).astype(BF16)


def rel(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@needs_gpu
@pytest.mark.parametrize("kind", ["gelu", "gelu_tanh", "silu"])
@pytest.mark.parametrize("bias", [True, False])
def test_expert_mlp_kernel(kind, bias):
    from moe_hpc.device import kernels
    x, w1, w2 = bf((300, 256)), bf((256, 512), 256 ** -0.5), bf((512, 256), 512 ** -0.5)
    b1 = bf(512, 0.1) if bias else None
    host = kernels.expert_mlp(x, w1, b1, w2, kind)
    dev = kernels.expert_mlp(*(None if a is None else cp.asarray(a) for a in (x, w1, b1, w2)), kind)
    assert rel(cp.asnumpy(dev).astype(np.float32), host.astype(np.float32)) < 1e-2


@needs_gpu
def test_combine_kernel():
    from moe_hpc.device import kernels
    rows, pos = bf((90, 128)), rng.permutation(90)[:60].reshape(30, 2)
    w = rng.random((30, 2)).astype(np.float32)
    ex, b2 = rng.integers(0, 8, (30, 2)).astype(np.int32), bf((8, 128), 0.1)
    host = kernels.combine(rows, pos, w, ex, b2)
    dev = kernels.combine(cp.asarray(rows), cp.asarray(pos), cp.asarray(w), cp.asarray(ex), cp.asarray(b2))
    assert rel(cp.asnumpy(dev).astype(np.float32), host.astype(np.float32)) < 4e-3


@needs_gpu
@pytest.mark.parametrize("kv, group, D, Dv", [(4, 1, 64, 64), (4, 2, 128, 128), (2, 8, 128, 128), (2, 1, 256, 256),
                                              (2, 3, 64, 32)])
@pytest.mark.parametrize("view", [False, True])
def test_decode_attention_on_the_gpu_equals_the_fp32_path(kv, group, D, Dv, view):
    """The GPU decode (the fused kernel where it takes the shapes, cuBLAS for D != Dv) against
    the host's fp32 path, ragged ``last``; ``view``: k and v are a slice of a longer cache, as
    ``cached_attention`` passes them, and the sequences sit at scattered cache rows."""
    from moe_hpc.device.kernels_cuda import fused_decode_supports
    from moe_hpc.model.attention import decode_attention
    S, Lk, scale = 3, 37, D ** -0.5
    positions, cache_rows = Lk + 11 * view, S + 2 * view
    q, k, v = bf((S, 1, kv * group, D)), bf((cache_rows, positions, kv, D)), bf((cache_rows, positions, kv, Dv))
    last, rows = np.array([36, 0, 20]), (np.array([4, 0, 2]) if view else None)
    want = decode_attention(q, k[:, :Lk], v[:, :Lk], last, scale, np, rows=rows)
    kd, vd = cp.asarray(k)[:, :Lk], cp.asarray(v)[:, :Lk]
    assert fused_decode_supports(q, kd, vd) == (D == Dv)
    got = decode_attention(cp.asarray(q), kd, vd, cp.asarray(last), scale, cp, rows=rows)
    assert got.shape == want.shape == (S, 1, kv * group * Dv) and got.dtype == BF16
    assert rel(cp.asnumpy(got).astype(np.float32), want.astype(np.float32)) < 1e-2


@needs_gpu
def test_fused_decode_attention_splits_long_caches():
    """Few sequences over a long cache: the positions split over blocks and merge (the second
    kernel); a sequence that has seen one position and one that has seen them all."""
    from moe_hpc.device.kernels_cuda import _decode_splits, fused_decode_attention
    from moe_hpc.model.attention import decode_attention
    S, kv, group, D, Lk = 2, 2, 4, 128, 5000
    assert _decode_splits(S * kv, Lk) > 1
    q, k, v = bf((S, 1, kv * group, D)), bf((S, Lk, kv, D)), bf((S, Lk, kv, D))
    last = np.array([Lk - 1, 0])
    want = decode_attention(q, k, v, last, D ** -0.5, np)
    got = fused_decode_attention(cp.asarray(q), cp.asarray(k), cp.asarray(v), cp.asarray(last), D ** -0.5)
    assert rel(cp.asnumpy(got).astype(np.float32), want.astype(np.float32)) < 1e-2


@needs_gpu
def test_gate_matmul_fp32_output():
    from moe_hpc.device import kernels
    a, b = bf((513, 384)), bf((384, 64), 384 ** -0.5)
    dev = kernels.matmul_f32out(cp.asarray(a), cp.asarray(b))
    assert dev.dtype == cp.float32
    assert rel(cp.asnumpy(dev), kernels.matmul_f32out(a, b)) < 1e-5


def _run_gpu(tiny_files, tmp_path, ranks, transport, extra=()):
    weights, inputs = tiny_files
    out = tmp_path / f"gpu-{ranks}-{transport}.h5"
    args = ["run", TINY, "--weights", weights, "--input", inputs, "--output", out,
            "--set", "run.device=gpu", "--set", f"run.transport={transport}", *extra]
    r = moe_hpc(*args, ranks=ranks)
    assert r.returncode == 0, r.stderr
    ref = reference_forward(weights, inputs)
    with h5py.File(inputs, "r") as f:
        lengths = f["lengths"][()]
    agreement = compare(read_output_hidden(out), ref, lengths)
    assert agreement.ok(), str(agreement)
    return agreement


@needs_gpu
def test_gpu_single_process(tiny_files, tmp_path):
    _run_gpu(tiny_files, tmp_path, None, "auto")


@needs_mpiexec
@pytest.mark.parametrize("ranks", [1, 2, 4, 8])
@pytest.mark.parametrize("transport", ["nccl", "mpi-staged", "mpi"])
@needs_gpu
def test_gpu_transports(tiny_files, tmp_path, ranks, transport):
    if transport == "nccl" and ranks > gpus():
        # NCCL refuses two ranks on one GPU; the MPI transports can share one for correctness
        pytest.skip(f"nccl with {ranks} ranks needs {ranks} GPUs; this machine has {gpus()}")
    extra = ("--set", "run.cuda_aware_mpi=yes") if transport == "mpi" else ()
    if transport == "mpi":
        from moe_hpc.comm.transports import mpi_is_cuda_aware
        if not mpi_is_cuda_aware():
            pytest.skip("this MPI is not CUDA-aware (device buffers would crash it)")
    _run_gpu(tiny_files, tmp_path, ranks, transport, extra + ("--set", "run.micro_batch_tokens=16"))


IPC_CASES = [(1, []), (2, []), (4, []), (2, ["parallel.dense_ranks=1", "parallel.placement=disjoint"]),
             (2, ["run.pipeline_waves=2", "run.chunk_sequences=6"])]


@needs_mpiexec
@pytest.mark.parametrize("ranks, sets", IPC_CASES, ids=[f"n{n}-{'-'.join(s) or 'plain'}" for n, s in IPC_CASES])
@needs_gpu
def test_gpu_ipc_transport(tiny_files, tmp_path, ranks, sets):
    """Rows written straight into peers' CUDA-IPC-mapped slots: the float64 reference, and the same
    bits as the mpi-staged transport (both land the rows in the same slot layout). Ranks may share
    one GPU: CUDA IPC maps memory between processes on one device, and each rank's spin-waits give
    way to the others' kernels by time slicing."""
    extra = tuple(a for s in sets + ["run.micro_batch_tokens=16"] for a in ("--set", s))
    _run_gpu(tiny_files, tmp_path, ranks, "ipc", extra)
    _run_gpu(tiny_files, tmp_path, ranks, "mpi-staged", extra)
    ipc, staged = (read_output_hidden(tmp_path / f"gpu-{ranks}-{t}.h5") for t in ("ipc", "mpi-staged"))
    np.testing.assert_array_equal(ipc, staged)


@needs_mpiexec
@needs_gpu
def test_bench_runs_the_ipc_transport_on_two_ranks(tmp_path):
    """The bench's layer, exchange and plain all-to-all through ipc (unprepared transfers land in
    the spare area), two ranks, on one GPU if that is all there is (the plain EP layer is then skipped)."""
    import json
    out = tmp_path / "bench_ipc.json"
    r = moe_hpc("bench", "--config", TINY, "--transport", "ipc", "--tokens", "512", "--micro-batches", "2",
                "--iters", "2", "--warmup", "1", "--json", out, ranks=2)
    assert r.returncode == 0, r.stderr
    layer = json.loads(out.read_text())
    assert layer["transport"] == "ipc"
    assert layer["layer"]["t_exchange_ms"] > 0 and layer["layer"]["t_a2a_ms"] > 0



@needs_gpu
def test_bench_decode_steps_the_shrunk_model_and_reports_its_roofline(tmp_path):
    """``--decode`` on the tiny preset: a prefill, greedy steps, the ``decode`` figures."""
    import json
    out = tmp_path / "bench_decode.json"
    r = moe_hpc("bench", "--config", TINY, "--tokens", "512", "--iters", "1", "--warmup", "2", "--model-layers", "3",
                "--sequences", "2", "--seq-len", "32", "--decode", "--decode-batch", "4", "--prompt-len", "16",
                "--new-tokens", "8", "--json", out)
    assert r.returncode == 0, r.stderr
    d = json.loads(out.read_text())["decode"]
    assert (d["batch"], d["prompt_len"], d["new_tokens"], d["timed_steps"]) == (4, 16, 8, 5)
    assert d["step_ms"] > 0 and d["roofline_ms"] > 0 and d["ratio"] == d["step_ms"] / d["roofline_ms"]
    assert d["kv_cache_gib"] * 2 ** 30 == 4 * 24 * 3 * 2 * 4 * 16 * 2        # s x P x blocks x (k, v) x kv x D x bf16
    assert "decode: step ms / HBM roofline ms" in r.stdout

PARALLEL = [(2, ["parallel.expert_tp=2"]), (4, ["parallel.expert_tp=2"]), (2, ["parallel.dp=2"]),
            (4, ["parallel.dp=2"]), (4, ["parallel.dp=2", "parallel.expert_tp=2"]),
            (4, ["parallel.dense_ranks=1", "parallel.placement=disjoint"]),
            (4, ["run.pipeline_waves=2", "run.chunk_sequences=6"])]


@needs_mpiexec
@pytest.mark.parametrize("ranks, sets", PARALLEL, ids=[f"n{n}-{'-'.join(s)}" for n, s in PARALLEL])
@needs_gpu
def test_gpu_nccl_parallel_layouts(tiny_files, tmp_path, ranks, sets):
    """TP inside experts (NCCL broadcast and fp32 reduce), DP groups, dense ranks, the pipeline:
    one rank per GPU over NCCL, each against the float64 reference."""
    if ranks > gpus():
        pytest.skip(f"nccl with {ranks} ranks needs {ranks} GPUs; this machine has {gpus()}")
    extra = [a for s in sets for a in ("--set", s)]
    _run_gpu(tiny_files, tmp_path, ranks, "nccl", tuple(extra) + ("--set", "run.micro_batch_tokens=16"))


@pytest.mark.parametrize("sorted_fallback", [False, True])
@needs_gpu
def test_dispatch_plan_kernel_matches_numpy(sorted_fallback, monkeypatch):
    """The counting-sort plan (and the radix-sort one it falls back to for huge steps): same
    order (stable), positions and counts as the NumPy sort."""
    from moe_hpc.device import kernels, kernels_cuda
    if sorted_fallback:
        monkeypatch.setattr(kernels_cuda, "_PLAN_MAX_HIST", 0)
    for T, k, P, S, R, mbt in ((1000, 2, 4, 16, 1, 256), (4097, 2, 3, 5, 2, 1000), (7, 1, 2, 1, 1, 3), (0, 2, 2, 2, 1, 4)):
        F = P * S
        holders = rng.integers(0, P, (F, R))
        slot = rng.integers(0, S, (F, R))
        replicas = rng.integers(1, R + 1, F)
        experts = rng.integers(0, F, (T, k))
        ids = rng.integers(0, 10 ** 6, T)
        nmb = max(1, -(-T // mbt))
        for replica in (None, rng.integers(0, 1, (T, k))):
            host = kernels.dispatch_plan(experts, ids, holders, replicas, slot, mbt, nmb, P, S, replica)
            dev = kernels.dispatch_plan(*(cp.asarray(a) for a in (experts, ids, holders, replicas, slot)), mbt, nmb, P, S,
                                        None if replica is None else cp.asarray(replica))
            for h, d in zip(host, dev):
                np.testing.assert_array_equal(cp.asnumpy(d), h)


@pytest.mark.parametrize("width", [64, 100])           # 16-byte vectors, and 2-byte words
@needs_gpu
def test_permute_blocks_kernel_matches_numpy(width):
    from moe_hpc.device import kernels
    src = bf((300, width))
    table = np.array([[0, 100, 250, 7], [60, 0, 290, 7], [30, 50, 10, 0]], dtype=np.int64)   # disjoint targets
    host = np.zeros((300, width), BF16)
    kernels.permute_blocks(src, host, table, 4)
    dev = cp.zeros((300, width), BF16)
    kernels.permute_blocks(cp.asarray(src), dev, cp.asarray(table), 4)
    np.testing.assert_array_equal(cp.asnumpy(dev).view(np.uint16), host.view(np.uint16))
    assert (host[60:90].view(np.uint16) == src[0:30].view(np.uint16)).all()


@needs_mpiexec
@needs_gpu
def test_gpu_dense_ranks(tiny_files, tmp_path):
    if gpus() < 2:
        pytest.skip("needs 2 GPUs")
    _run_gpu(tiny_files, tmp_path, 2, "auto", ("--set", "parallel.dense_ranks=1"))


@pytest.mark.parametrize("kind", ["gelu", "gated-silu", "silu"])
@pytest.mark.parametrize("bias", [True, False])
@needs_gpu
@pytest.mark.parametrize("counts", [[24, 0, 7, 13, 1], [1000, 3, 5, 2, 9, 4], [900, 3, 700, 2, 300, 4, 650, 0, 5000]],
                         ids=["mixed", "one-hot-expert", "tails-of-three-sizes"])
def test_grouped_expert_mlp_kernel(bias, counts, kind):
    """Every slot's rows against NumPy, balanced-ish and skewed (the hot slot's tail runs alone),
    gated and not (the vector bias + activation kernel over every slot's rows)."""
    from moe_hpc.device import kernels
    from moe_hpc.device.expert_batches import SLOT_ROUND, batched_rows, tail_windows
    counts = np.array(counts)
    gated = kind == "gated-silu"
    S, C, H, F = len(counts), int(-(-counts.max() // SLOT_ROUND) * SLOT_ROUND), 128, 256
    m, heavy = batched_rows(counts, C)
    if max(counts) == 1000:
        assert len(heavy) == 1
    if max(counts) == 5000:      # windows of several sizes, some moved back over batched rows
        starts, sizes = tail_windows(counts[heavy], m, C)
        assert len(np.unique(sizes)) >= 2 and (starts < m).any(), (m, starts, sizes)
    x, w1, w2 = bf((S * C, H)), bf((S, H, F * (1 + gated)), H ** -0.5), bf((S, F, H), F ** -0.5)
    b1 = bf((S, F * (1 + gated)), 0.1) if bias else None
    host = kernels.grouped_expert_mlp(x, counts, w1, b1, w2, kind, np.empty((S * C, F * (1 + gated)), BF16),
                                      np.zeros((S * C, H), BF16))
    dev = kernels.grouped_expert_mlp(cp.asarray(x), counts, cp.asarray(w1), None if b1 is None else cp.asarray(b1),
                                     cp.asarray(w2), kind, cp.empty((S * C, F * (1 + gated)), BF16),
                                     cp.empty((S * C, H), BF16))
    dev = cp.asnumpy(dev)
    for s, n in enumerate(counts):
        if n:
            rows = slice(s * C, s * C + n)
            assert rel(dev[rows].astype(np.float32), host[rows].astype(np.float32)) < 1e-2


@pytest.mark.parametrize("kind", ["gelu", "gated-silu"])
@needs_gpu
@pytest.mark.parametrize("counts", [[24, 0, 7, 13, 1], [900, 3, 700, 0, 2, 300, 4, 650, 0, 5000]],
                         ids=["mixed", "runs-and-tails"])
def test_packed_expert_mlp_kernel(counts, kind):
    """The one-rank packed layout (runs of consecutive busy slots at stride m, tails apart)
    against NumPy, slot by slot."""
    from moe_hpc.device import kernels
    from moe_hpc.device.expert_batches import pack_slots
    counts = np.array(counts)
    gated = kind == "gated-silu"
    packed = pack_slots(counts)
    if counts.max() == 5000:
        assert len(packed.runs()) >= 2 and len(np.unique(packed.tail_rows)) >= 2, packed
    S, R, H, F = len(counts), packed.extent, 128, 256
    x, w1, w2 = bf((R, H)), bf((S, H, F * (1 + gated)), H ** -0.5), bf((S, F, H), F ** -0.5)
    b1 = bf((S, F * (1 + gated)), 0.1)
    host = kernels.packed_expert_mlp(x, packed, w1, b1, w2, kind, None, np.zeros((R, H), BF16))
    dev = cp.asnumpy(kernels.packed_expert_mlp(cp.asarray(x), packed, cp.asarray(w1), cp.asarray(b1), cp.asarray(w2),
                                               kind, cp.empty((R, F * (1 + gated)), BF16), cp.empty((R, H), BF16)))
    for p in range(packed.slots.size):
        rows = packed.slot_rows(p)
        assert rel(dev[rows].astype(np.float32), host[rows].astype(np.float32)) < 1e-2


@pytest.mark.skipif(cp is not None, reason="checks the message a machine without a GPU gives")
def test_bench_without_gpu_says_why():
    from helpers import moe_hpc as run_cli
    r = run_cli("bench", "--iters", "1")
    assert r.returncode == 1 and len(r.error_lines) == 1 and "run.device" in r.error_lines[0], r.stderr


@needs_gpu
def test_gate_topk_and_count_kernels_match_numpy():
    """The fused softmax + top-k (choice by p + bias, weights from p) and the device counter."""
    from moe_hpc.device import kernels
    logits = (rng.standard_normal((3000, 64)) * 3).astype(np.float32)
    logits[:10, :4] = 5.0              # exact ties: the lower index must win on both
    bias = (rng.standard_normal(64) * 0.01).astype(np.float32)
    for b in (None, bias):
        for k, norm in ((2, True), (6, False)):
            e_h, w_h = kernels.gate_topk(logits, b, k, norm)
            e_d, w_d = kernels.gate_topk(cp.asarray(logits), None if b is None else cp.asarray(b), k, norm)
            np.testing.assert_array_equal(cp.asnumpy(e_d), e_h)
            np.testing.assert_allclose(cp.asnumpy(w_d), w_h, rtol=1e-5, atol=1e-7)
    for T, E in ((7, 16), (5, 60), (1, 160)):       # experts not a multiple of the warp, a partial block
        few = (rng.standard_normal((T, E)) * 3).astype(np.float32)
        e_h, w_h = kernels.gate_topk(few, None, 2, True)
        e_d, w_d = kernels.gate_topk(cp.asarray(few), None, 2, True)
        np.testing.assert_array_equal(cp.asnumpy(e_d), e_h)
        np.testing.assert_allclose(cp.asnumpy(w_d), w_h, rtol=1e-5, atol=1e-7)
    # DeepSeek-V3's rule (sigmoid, 8 groups of which 4 are kept, scaled weights) through CuPy's ops
    rule = {"score": "sigmoid", "groups": 8, "keep_groups": 4, "scale": 2.5}
    e_h, w_h = kernels.gate_topk(logits, bias, 8, True, **rule)
    e_d, w_d = kernels.gate_topk(cp.asarray(logits), cp.asarray(bias), 8, True, **rule)
    np.testing.assert_array_equal(cp.asnumpy(e_d), e_h)
    np.testing.assert_allclose(cp.asnumpy(w_d), w_h, rtol=1e-5, atol=1e-7)
    ids = rng.integers(0, 64, (3000, 2)).astype(np.int32)
    host, dev = np.zeros(64, np.int64), cp.zeros(64, cp.int64)
    kernels.count_into(host, ids)
    kernels.count_into(dev, cp.asarray(ids))
    np.testing.assert_array_equal(cp.asnumpy(dev), host)
    assert host.sum() == ids.size


def _needs_cudnn():
    from moe_hpc.device.flash_cudnn import flash_attention_or_reason
    flash, why = flash_attention_or_reason()
    if flash is None:
        pytest.skip(why)
    return flash


@needs_gpu
@pytest.mark.parametrize("H", [64, 66, 7168])         # 66: not a multiple of 4, the 2-byte kernel
def test_add_rmsnorm_kernel_matches_numpy(H):
    from moe_hpc.device.kernels import add_rmsnorm
    x, y, w = bf((37, H)), bf((37, H)), bf(H)
    host_x = x.copy()
    want = add_rmsnorm(host_x, y, w, 1e-6)
    dev_x = cp.asarray(x)
    got = add_rmsnorm(dev_x, cp.asarray(y), cp.asarray(w), 1e-6)
    np.testing.assert_array_equal(cp.asnumpy(dev_x), host_x)          # the residual: exact
    assert rel(cp.asnumpy(got), want) < 1e-3
    assert rel(cp.asnumpy(add_rmsnorm(cp.asarray(x), None, cp.asarray(w), 1e-6)), add_rmsnorm(x, None, w, 1e-6)) < 1e-3


@needs_gpu
def test_rope_heads_kernel_matches_numpy():
    from moe_hpc.device.kernels import rope_heads
    from moe_hpc.model.layers import rope_tables
    qkv = bf((3, 50, 6 * 64))
    cos, sin = rope_tables(np.arange(50), 64, 10000.0)
    host = qkv.copy()
    rope_heads(host, cos, sin, 4, 64)
    dev = cp.asarray(qkv)
    rope_heads(dev, cp.asarray(cos), cp.asarray(sin), 4, 64)
    got = cp.asnumpy(dev)
    np.testing.assert_array_equal(got[..., 4 * 64:], qkv[..., 4 * 64:])   # v untouched
    assert rel(got, host) < 1e-3


@needs_gpu
@pytest.mark.parametrize("S, L, nh, nkv, D", [(2, 77, 8, 8, 64), (3, 300, 8, 2, 128), (1, 1024, 16, 4, 128),
                                              (2, 5, 4, 1, 64)])
def test_cudnn_attention_matches_numpy(S, L, nh, nkv, D):
    """The fused path (QKV GEMM, RoPE kernel, cuDNN SDPA) against the tiled NumPy attention:
    MHA and GQA, head sizes 64 and 128, lengths that are not a multiple of any tile."""
    from moe_hpc.config.run_config import build_config
    from moe_hpc.model.weights import AttentionWeights
    from moe_hpc.model.attention import attention, fuse_qkv
    flash = _needs_cudnn()
    H = 256
    cfg = build_config({}, [f"model.hidden_size={H}", f"model.num_heads={nh}", f"model.num_kv_heads={nkv}",
                            f"model.head_dim={D}"]).model       # a real model config: every field the code reads
    w = AttentionWeights(attn_norm=None, mlp_norm=None, wq=bf((H, nh * D), H ** -0.5), wk=bf((H, nkv * D), H ** -0.5),
                         wv=bf((H, nkv * D), H ** -0.5), wo=bf((nh * D, H), (nh * D) ** -0.5))
    a = bf((S, L, H))
    want = attention(a, w, cfg, block=64)
    dev_w = fuse_qkv(AttentionWeights(**{k: None if v is None else cp.asarray(v) for k, v in vars(w).items()}), cp)
    calls = []

    class Counted:                        # the fused kernel must be what ran, not the tiled fallback
        supports = flash.supports

        def __call__(self, *args):
            calls.append(args[2:])
            return flash(*args)

    got = cp.asnumpy(attention(cp.asarray(a), dev_w, cfg, block=64, xp=cp, flash=Counted()))
    assert calls == [(nh, nkv, D, 1.0 / np.sqrt(D))]
    assert rel(got, want) < 1e-2


GQA_SILU = ["model.num_kv_heads=2", "model.activation=silu", "model.head_dim=64"]


@needs_mpiexec
@pytest.mark.parametrize("ranks", [None, 2])
@needs_gpu
def test_gpu_cudnn_runs_gqa_silu_ragged(tmp_path, ranks):
    """A GQA, SiLU, ragged model through cuDNN attention (asked for, so never silently tiled),
    one process and two ranks, against the float64 reference."""
    from moe_hpc.config.run_config import build_config
    from moe_hpc.tools.synth import write_checkpoint, write_inputs
    _needs_cudnn()
    if ranks and ranks > gpus():
        pytest.skip(f"nccl with {ranks} ranks needs {ranks} GPUs; this machine has {gpus()}")
    m = build_config({}, GQA_SILU).model
    weights, inputs, out = tmp_path / "w.h5", tmp_path / "in.h5", tmp_path / "out.h5"
    write_checkpoint(weights, m, seed=5)
    write_inputs(inputs, m, sequences=5, seq_len=77, seed=6, ragged=True)
    sets = [a for s in GQA_SILU + ["run.device=gpu", "run.attention=cudnn", "run.transport=nccl"] for a in ("--set", s)]
    r = moe_hpc("run", TINY, "--weights", weights, "--input", inputs, "--output", out, *sets, ranks=ranks)
    assert r.returncode == 0, r.stderr
    assert "tiled core" not in r.stderr
    with h5py.File(inputs, "r") as f:
        lengths = f["lengths"][()]
    agreement = compare(read_output_hidden(out), reference_forward(weights, inputs), lengths)
    assert agreement.ok(), str(agreement)


@pytest.mark.parametrize("width", [7168, 100])     # 16-byte vectors, and the scalar fallback
@needs_gpu
def test_add_bias_kernel_matches_numpy_bit_for_bit(width):
    from moe_hpc.device.kernels import add_bias
    y, b = bf((37, width)), bf((width,))
    dev = cp.asnumpy(add_bias(cp.asarray(y), cp.asarray(b)))
    host = add_bias(y, b)                   # in place on both devices: the device copy went first
    np.testing.assert_array_equal(dev.view(np.uint16), host.view(np.uint16))


@needs_gpu
def test_add_rows_kernel_matches_numpy():
    from moe_hpc.device.kernels import add_rows
    x, f = bf((40, 7168)), bf((9, 7168))
    rows = rng.permutation(40)[:9]
    host = x.copy()
    add_rows(host, rows, f)
    dev = cp.asarray(x)
    add_rows(dev, cp.asarray(rows), cp.asarray(f))
    np.testing.assert_array_equal(cp.asnumpy(dev), host)


@needs_gpu
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("counts", [[24, 0, 7, 13, 1], [1000, 3, 5, 2, 9, 4], [900, 3, 700, 2, 300, 4, 650, 0, 5000]],
                         ids=["mixed", "one-hot-expert", "tails-of-three-sizes"])
def test_gated_expert_kernels_match_numpy(bias, counts):
    """Gated (SwiGLU) experts: one expert and a rank's slots, [gate | up] fused, against NumPy."""
    from moe_hpc.device import kernels
    counts = np.array(counts)
    S, C, H, F = len(counts), int(-(-counts.max() // 8) * 8), 128, 96
    x, w1, w2 = bf((S * C, H)), bf((S, H, 2 * F), H ** -0.5), bf((S, F, H), F ** -0.5)
    b1 = bf((S, 2 * F), 0.1) if bias else None
    dev = lambda a: None if a is None else cp.asarray(a)
    one = kernels.expert_mlp(x[:50], w1[0], None if b1 is None else b1[0], w2[0], "gated-silu")
    got = cp.asnumpy(kernels.expert_mlp(dev(x[:50]), dev(w1[0]), None if b1 is None else dev(b1[0]), dev(w2[0]),
                                        "gated-silu"))
    assert rel(got.astype(np.float32), one.astype(np.float32)) < 1e-2
    host = kernels.grouped_expert_mlp(x, counts, w1, b1, w2, "gated-silu", np.empty((S * C, 2 * F), BF16),
                                      np.zeros((S * C, H), BF16))
    grouped = cp.asnumpy(kernels.grouped_expert_mlp(dev(x), counts, dev(w1), dev(b1), dev(w2), "gated-silu",
                                                    cp.empty((S * C, 2 * F), BF16), cp.empty((S * C, H), BF16)))
    for s, n in enumerate(counts):
        if n:
            rows = slice(s * C, s * C + n)
            assert rel(grouped[rows].astype(np.float32), host[rows].astype(np.float32)) < 1e-2


HF_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe",
               "deepseek_v3", "deepseek_v3_direct", "deepseek_v3_fp8"]   # MLA (tiled core), grouped sigmoid gate, FP8 read


@needs_mpiexec
@pytest.mark.parametrize("ranks", [None, 2])
@pytest.mark.parametrize("family", HF_FAMILIES)
@needs_gpu
def test_gpu_runs_hf_checkpoints_like_transformers(tmp_path, family, ranks):
    """Each Hugging Face fixture straight from its directory on the GPU (gated experts, shared
    experts, q/k norms, biases): logits against transformers' own, as on the CPU."""
    if ranks and ranks > gpus():
        pytest.skip(f"nccl with {ranks} ranks needs {ranks} GPUs; this machine has {gpus()}")
    folder = REPO / "tests" / "fixtures" / f"hf_{family}"
    out = tmp_path / "out.h5"
    sets = ["run.device=gpu", "run.transport=nccl", "run.logits=true", "run.micro_batch_tokens=16"]
    r = moe_hpc("run", folder, "--weights", folder, "--input", folder / "reference.h5", "--output", out,
                *[a for s in sets for a in ("--set", s)], "--progress", "off", ranks=ranks)
    assert r.returncode == 0, r.stderr
    with h5py.File(folder / "reference.h5", "r") as f:
        want, lengths = f["hf_logits"][()], f["lengths"][()]
    with h5py.File(out, "r") as f:
        raw = f["logits"][()]
    got = (raw.astype(np.uint32) << 16).view(np.float32) if raw.dtype == np.uint16 else raw
    valid = np.arange(want.shape[1])[None, :] < lengths[:, None]
    err = np.linalg.norm(got[valid] - want[valid], axis=-1) / np.linalg.norm(want[valid], axis=-1)
    assert np.median(err) < 2e-2 and np.mean(err > 5e-2) <= 0.05, (np.median(err), np.mean(err > 5e-2))


@needs_gpu
def test_bench_refuses_a_model_larger_than_the_gpu_before_loading():
    """Issue 21 item 12: the 61-layer seed model (~264 GiB on one GPU) is refused in seconds with
    the planner's figure, the GPU's free memory and the smallest rank count that fits."""
    r = moe_hpc("bench", "--config", REPO / "inputs" / "seed61.toml", "--model-layers", "61", "--iters", "1",
                timeout=300)
    assert r.returncode == 1 and len(r.error_lines) == 1, r.stderr
    line = r.error_lines[0]
    assert "the model does not fit: rank 0 needs" in line and "GiB free" in line, line
    assert "smallest layout that fits:" in line and "internal error" not in line, line
    assert r.wall_s < 120, f"the refusal took {r.wall_s:.0f} s"


@needs_gpu
@pytest.mark.parametrize("family, graphs, slots", [("mixtral", True, 0), ("mixtral", True, 2), ("mixtral", False, 0),
                                                  ("deepseek_v3", False, 0)])
def test_gpu_generate_steps_equal_a_full_forward(tmp_path, family, graphs, slots):
    """``moe-hpc generate`` on the GPU (KV cache; for DeepSeek-V3 the MLA latent cache): each new
    token's log-probability from the cached decode equals ``run``'s full forward of prompt +
    tokens so far on the same GPU, the oracle that needs no tie rule (as tests/test_generate.py
    does on the CPU). ``graphs``: the decode steps replay CUDA graphs (run.cuda_graphs, one
    rank, MHA/GQA), and the summary shows they did; else every step runs eagerly. ``slots``:
    continuous batching over that many cache rows (0: the whole group)."""
    folder = REPO / "tests" / "fixtures" / f"hf_{family}"
    prompts, out, new = tmp_path / "prompts.h5", tmp_path / "gen.h5", 8
    with h5py.File(folder / "reference.h5", "r") as src, h5py.File(prompts, "w") as dst:
        dst.attrs["format"] = src.attrs["format"]
        lengths = np.maximum(src["lengths"][()] // 2, 1)
        dst["tokens"], dst["lengths"] = src["tokens"][()], lengths
    gpu = ["--set", "run.device=gpu", "--set", "run.transport=nccl"]
    r = moe_hpc("generate", folder, "--weights", folder, "--input", prompts, "--output", out,
                "--max-new-tokens", new, "--ignore-eos", "--progress", "off", *gpu,
                "--set", f"run.cuda_graphs={str(graphs).lower()}", "--decode-slots", slots)
    assert r.returncode == 0, r.stderr
    assert ("decode_graph" in json.loads(r.stdout)["summary"]["phases_s"]) == graphs, r.stdout
    got = read_generated(out)
    assert (got["generated_lengths"] == new).all(), got["generated_lengths"]
    assert_steps_equal_full_forward(got, (folder, [], None, folder, prompts), tmp_path, new, *gpu)


@needs_gpu
@pytest.mark.parametrize("graphs", [True, False])
@pytest.mark.parametrize("family", GENERATE_FAMILIES)
def test_gpu_greedy_continuations_equal_transformers(family, graphs, tmp_path):
    """transformers' own greedy continuations (the CPU test's fixtures and tie rule) equal
    ``moe-hpc generate``'s on one GPU, with the decode steps replayed as CUDA graphs or eager."""
    assert_generate_equals_transformers(family, tmp_path, "--set", "run.device=gpu", "--set", "run.transport=nccl",
                                        "--set", f"run.cuda_graphs={str(graphs).lower()}")
