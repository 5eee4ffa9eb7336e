"""``moe-hpc bench --decode``: generation's decode step on the depth-shrunk model, beside its
HBM roofline (docs/generate.md, "Speed").

Each rank opens the KV cache for ``--decode-batch`` sequences of ``--prompt-len + --new-tokens``
positions, prefills the prompts, then steps them greedily through ``Engine.forward_cached`` as
``generate`` does (the engine hands each step's logits to the host, which takes the argmax: the
host is in the loop exactly as far as generation's is). The model's LM head and embedding are a
``DECODE_VOCAB``-token stand-in: the figure is the blocks' step, as the issue's is.

Roofline of a step: every byte it must read from HBM once, over the datasheet's bandwidth: the
dense weights (attention, dense MLPs, gates, the head), the experts that received rows (bounded
by min(hosted experts, tokens x top_k) per MoE block: all of them at batch 64, top-2 of 64) and
the KV cache up to each sequence's position.
"""
from __future__ import annotations

import math
import statistics
import time

import numpy as np

from ..comm.agree import agree_max
from ..config.errors import ConfigError
from ..device.datasheet import DATASHEET, datasheet_for
from ..model.blocks import CacheAt
from ..planner.memory import dense_weight_bytes, expert_weight_bytes, kv_cache_bytes_per_token

DECODE_VOCAB = 256              # the stand-in head: [H, 256] bf16, a few MB read per step
PREFILL_SEQUENCES = 16          # prompts per prefill call (generate's default group), bounding its activations


def add_decode_arguments(p) -> None:
    p.add_argument("--decode", action="store_true",
                   help="also time generation's decode step on the --model-layers model against its HBM roofline")
    p.add_argument("--decode-batch", type=int, default=64, help="sequences per GPU stepping together")
    p.add_argument("--prompt-len", type=int, default=1024, help="prompt tokens per sequence (one prefill)")
    p.add_argument("--new-tokens", type=int, default=128,
                   help="tokens generated per sequence (the first by the prefill, the rest by timed steps)")


def check_decode_arguments(args) -> None:
    """One ``error:`` line before any GPU work for a decode bench that cannot run."""
    if not args.model_layers:
        raise ConfigError("moe-hpc bench --decode needs --model-layers N (the shrunk model it steps)")
    for flag in ("decode_batch", "prompt_len"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"moe-hpc bench: --{flag.replace('_', '-')} must be >= 1")
    if args.new_tokens < args.warmup + 2:
        raise ConfigError(f"moe-hpc bench: --new-tokens must be >= --warmup + 2 = {args.warmup + 2} "
                          "(the prefill's token, the warm-up steps, at least one timed step)")


def decode_overrides(overrides: list[str]) -> list[str]:
    """The shrunk model's overrides plus the stand-in vocabulary (token inputs, an LM head)."""
    return overrides + [f"model.vocab_size={DECODE_VOCAB}"]


def decode_roofline(m, batch: int, cache_positions: float, hbm_tb_s: float, experts_per_block: int,
                    expert_tp: int = 1) -> dict:
    """The HBM roofline of one decode step of ``batch`` sequences on one GPU holding model ``m``'s
    blocks: weight bytes (dense side with the LM head, plus ``experts_per_block`` experts in each
    MoE block, each its 1/expert_tp share), KV-cache bytes read (``cache_positions`` positions per
    sequence, the mean over the timed steps, in every block) -> bytes and milliseconds."""
    weights = (dense_weight_bytes(m, logits=m.vocab_size > 0)
               + m.num_moe_layers * expert_weight_bytes(m, experts_per_block, expert_tp))
    kv = batch * cache_positions * m.num_layers * kv_cache_bytes_per_token(m)
    return {"weight_bytes": weights, "kv_read_bytes": kv,
            "roofline_ms": (weights + kv) / (hbm_tb_s * 1e12) * 1e3}


def touched_experts_bound(m, hosted_per_block: int, tokens: int) -> int:
    """At most this many of a GPU's experts per MoE block receive rows in a step of ``tokens``
    tokens (each picks top_k distinct experts)."""
    return min(hosted_per_block, tokens * m.top_k)


def bench_decode(engine, args, cp) -> dict:
    """Prefill then greedy decode steps on every rank (collective: each step's MoE exchanges) ->
    the ``decode`` figures (step time: the slowest rank's median over the steps after warm-up)."""
    m, topo = engine.cfg.model, engine.topo
    B, L, N = args.decode_batch, args.prompt_len, args.new_tokens
    P, rows, s0 = L + N, np.arange(B), topo.rank * B
    kv_bytes = engine.open_cache(B, P)
    prompts = np.random.default_rng(topo.rank).integers(0, m.vocab_size, (B, L))
    logits, calls = [], []
    for a in range(0, B, PREFILL_SEQUENCES):
        r = rows[a:a + PREFILL_SEQUENCES]
        topo.world.Barrier()
        t0 = time.perf_counter()
        logits.append(engine.forward_cached(prompts[r], np.full(len(r), L), CacheAt(r, np.zeros(len(r), np.int64)),
                                            (s0 + r)[:, None] * P + np.arange(L)[None, :]))
        calls.append((len(r), time.perf_counter() - t0))       # the logits came to the host: the call is done
    prefill_s = agree_max(topo.world, sum(t for _, t in calls))
    warm = calls[1:] or calls               # the first call builds the kernels' and cuDNN's plans for its shapes
    warm_s_per_token = agree_max(topo.world, sum(t for _, t in warm) / (L * sum(n for n, _ in warm)))
    tokens = np.concatenate(logits).argmax(axis=1)
    times = []
    for step in range(N - 1):               # the prefill picked token 0; step i feeds token i
        pos = np.full(B, L + step, np.int64)
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        out = engine.forward_cached(tokens[:, None], np.ones(B, np.int64), CacheAt(rows, pos),
                                    ((s0 + rows) * P + pos)[:, None])
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end) * 1e-3)
        tokens = out.argmax(axis=1)
    step_s = agree_max(topo.world, statistics.median(times[args.warmup:]))
    phases = profiled_step(engine, tokens, rows, s0, P, L + N - 2, cp)
    timed = range(args.warmup, N - 1)
    positions = L + statistics.mean(timed) + 1      # step i reads positions 0..L+i
    hbm = (datasheet_for(engine.backend.device_name()) or DATASHEET["H200"])[1]
    slots = max(1, topo.num_expert_slots // engine.cfg.parallel.dp)     # one DP replica's expert GPUs
    experts = touched_experts_bound(m, math.ceil(m.num_experts / slots), B * topo.num_dense)
    roof = decode_roofline(m, B, positions, hbm, experts, topo.expert_tp)
    return {"layers": m.num_layers, "batch": B, "prompt_len": L, "new_tokens": N, "timed_steps": len(timed),
            "step_ms": step_s * 1e3, "roofline_ms": roof["roofline_ms"], "ratio": step_s * 1e3 / roof["roofline_ms"],
            "tokens_per_s_per_gpu": B / step_s, "kv_cache_gib": kv_bytes / 2 ** 30, "prefill_ms": prefill_s * 1e3,
            "prefill_tokens_per_s_per_gpu": 1 / warm_s_per_token, "prefill_first_call_ms": calls[0][1] * 1e3,
            "hbm_tb_s": hbm, "experts_per_moe_block": experts,
            "roofline_weight_gb": roof["weight_bytes"] / 1e9, "roofline_kv_read_gb": roof["kv_read_bytes"] / 1e9,
            "profiled_step_phases_ms_rank0": phases,
            "peak_pool_gib": agree_max(topo.world, cp.get_default_memory_pool().total_bytes()) / 2 ** 30,
            "graph_pool_gib": agree_max(topo.world, engine.graphs.pool.total_bytes() if engine.graphs else 0) / 2 ** 30,
            "graph_launch_host_us": (statistics.median(engine.graphs.launch_s) * 1e6
                                     if engine.graphs and engine.graphs.launch_s else None)}


def profiled_step(engine, tokens, rows, s0: int, P: int, last: int, cp) -> dict:
    """One more decode step (at the last timed position again: it overwrites that cache entry)
    with each phase waiting for its own GPU work -> milliseconds per phase (``PhaseTimes``): where
    the step's time goes, at the cost of the overlap the timed steps have."""
    pos = np.full(len(rows), last, np.int64)
    cp.cuda.Device().synchronize()
    t0 = time.perf_counter()
    phases = engine.times.profiled(lambda: engine.forward_cached(tokens[:, None], np.ones(len(rows), np.int64),
                                                                 CacheAt(rows, pos), ((s0 + rows) * P + pos)[:, None]),
                                   cp.cuda.Device().synchronize)
    total = time.perf_counter() - t0
    return {name: round(sec * 1e3, 3) for name, sec in phases.items()} | {"total": round(total * 1e3, 3)}


def decode_rows(d: dict) -> list[tuple[str, str]]:
    """The printed table's decode lines."""
    return [(f"decode ({d['layers']} blocks): batch x prompt + new", f"{d['batch']} x {d['prompt_len']} + "
             f"{d['new_tokens']} ({d['timed_steps']} steps timed)"),
            ("decode: step ms / HBM roofline ms (ratio)",
             f"{d['step_ms']:.2f} / {d['roofline_ms']:.2f} ({d['ratio']:.2f}x at {d['hbm_tb_s']} TB/s)"),
            ("decode: tokens/s per GPU", f"{d['tokens_per_s_per_gpu']:.4g}"),
            ("decode: KV cache GiB, prefill ms", f"{d['kv_cache_gib']:.1f}, {d['prefill_ms']:.0f}"),
            ("decode: prefill tokens/s per GPU (of run's)", f"{d['prefill_tokens_per_s_per_gpu']:.4g}"
             + (f" ({d['prefill_vs_run_tokens_per_s']:.0%})" if "prefill_vs_run_tokens_per_s" in d else "")),
            ("decode: peak pool GiB", f"{d['peak_pool_gib']:.1f}"),
            ("decode: graph launch, host us", "n/a (eager steps)" if d.get("graph_launch_host_us") is None
             else f"{d['graph_launch_host_us']:.0f}"),
            ("decode: one profiled step, ms by phase", ", ".join(f"{k} {v:.2f}" for k, v in
                                                               d["profiled_step_phases_ms_rank0"].items()))]


__all__ = ["add_decode_arguments", "check_decode_arguments", "decode_overrides", "decode_roofline",
           "touched_experts_bound", "bench_decode", "profiled_step", "decode_rows", "DECODE_VOCAB"]
