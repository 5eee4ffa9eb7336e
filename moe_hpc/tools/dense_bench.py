"""The dense path's figures for ``moe-hpc bench --model-layers``: the attention core against a
ceiling measured in the same run (PyTorch's cuDNN SDPA, where torch is importable on the
machine -- only here, never a dependency of the package), the projection GEMMs against cuBLAS
on the same shapes, and the attention core's memory at two sequence lengths of equal tokens.
"""
from __future__ import annotations

from ..device.dtypes import BF16
from ..model.attention import attention
from ..model.flops import flops_per_token
from ..model.mla import softmax_scale


def torch_sdpa_seconds(S: int, L: int, nh: int, nkv: int, D: int, iters: int = 20) -> float | None:
    """Median time of torch's cuDNN SDPA (causal, bf16, inference) on the same GPU, or None."""
    try:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except Exception:
        return None
    import cupy as cp
    torch.cuda.set_device(cp.cuda.Device().id)
    q = torch.randn(S, nh, L, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(S, nkv, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    times = []
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            for i in range(iters + 5):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=nkv != nh)
                end.record()
                end.synchronize()
                if i >= 5:
                    times.append(start.elapsed_time(end) * 1e-3)
    except RuntimeError:          # this torch build's cuDNN backend refuses the shape: no ceiling
        return None
    del q, k, v
    torch.cuda.empty_cache()
    return sorted(times)[len(times) // 2]


def _core_peak_bytes(engine, layer: int, S: int, L: int, cp) -> int:
    """Device bytes one attention call at [S, L] takes: every allocation it makes goes to a pool
    of its own, which keeps (and so counts) the most it held at once. A first call outside that
    pool builds what outlives the call (RoPE tables, cuDNN's graph and workspace), so nothing
    long-lived is taken from the temporary pool and both shapes are measured alike."""
    block = engine.attention[layer]
    m, w, flash = block.local, block.weights, block.flash
    a = (cp.random.standard_normal((S, L, engine.cfg.model.hidden_size), dtype=cp.float32)).astype(BF16)
    attention(a, w, m, engine.cfg.run.attention_block, cp, None, flash)   # cached tables, workspace
    pool = cp.cuda.MemoryPool()
    cp.cuda.Device().synchronize()
    with cp.cuda.using_allocator(pool.malloc):
        attention(a, w, m, engine.cfg.run.attention_block, cp, None, flash)
        cp.cuda.Device().synchronize()
    return pool.total_bytes()


def dense_figures(engine, S: int, L: int, timer, cp) -> dict:
    """Attention and projection figures on block 0's weights at [S, L] tokens per GPU."""
    block = engine.attention[0]
    m, w, flash = block.local, block.weights, block.flash
    H, nh, nkv, D = engine.cfg.model.hidden_size, m.num_heads, m.kv_heads, m.head_dim
    a = (cp.random.standard_normal((S, L, H), dtype=cp.float32)).astype(BF16)
    t_attention = timer(lambda: attention(a, w, m, engine.cfg.run.attention_block, cp, None, flash))
    W = (nh + 2 * nkv) * D
    flat = a.reshape(S * L, H)
    qkv_w = w.wqkv if w.wqkv is not None else cp.concatenate([w.wq, w.wk, w.wv], axis=1)
    t_qkv = timer(lambda: cp.matmul(flat, qkv_w))
    o = (cp.random.standard_normal((S * L, nh * D), dtype=cp.float32)).astype(BF16)
    t_out = timer(lambda: cp.matmul(o, w.wo))
    square = (cp.random.standard_normal((S * L, H), dtype=cp.float32)).astype(BF16)
    big = (cp.random.standard_normal((H, S * L if S * L <= 16384 else 16384), dtype=cp.float32)).astype(BF16)
    t_square = timer(lambda: cp.matmul(square, big))
    per_token = flops_per_token(m, L)              # the one count the MFU and the planner use
    proj_flops, core_flops = (S * L * per_token[k] for k in ("projections", "attention_core"))
    t_core = None
    if flash is not None and w.wqkv is not None:
        qkv = cp.matmul(flat, w.wqkv).reshape(S, L, W)
        out = cp.empty((S, L, nh * D), BF16)
        t_core = timer(lambda: flash(qkv, out, nh, nkv, D, softmax_scale(m)))
    t_torch = torch_sdpa_seconds(S, L, nh, nkv, D)
    # equal tokens, four times the length: a core that holds [L, L] scores would grow 4x
    half_tokens = max(1, S // 4)
    return {"attention_core": engine.wiring.attention_core, "shape": {"S": S, "L": L, "heads": nh, "kv_heads": nkv, "D": D},
            "t_attention_block_ms": t_attention * 1e3,
            "t_attention_core_ms": None if t_core is None else t_core * 1e3,
            "attention_core_tflops": None if t_core is None else core_flops / t_core / 1e12,
            "torch_cudnn_sdpa_tflops": None if t_torch is None else core_flops / t_torch / 1e12,
            "core_vs_torch_sdpa": None if t_core is None or t_torch is None else t_torch / t_core,
            "projections_tflops": proj_flops / (t_qkv + t_out) / 1e12,
            "cublas_square_tflops": 2 * S * L * H * big.shape[1] / t_square / 1e12,
            "attention_pool_bytes": {f"{half_tokens}x{4 * L}": _core_peak_bytes(engine, 0, half_tokens, 4 * L, cp),
                                     f"{S}x{L}": _core_peak_bytes(engine, 0, S, L, cp)}}


__all__ = ["dense_figures", "torch_sdpa_seconds"]
