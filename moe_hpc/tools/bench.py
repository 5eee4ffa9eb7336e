"""``moe-hpc bench``: one MoE layer and a depth-shrunk whole model on the GPU, beside the
ceilings they are judged against, all measured in the same run.

Run one rank per GPU, e.g. ``mpiexec -n 2 moe-hpc bench --json bench.json``.  Figures per rank
are reduced to the slowest rank (max), which is what a synchronous layer costs.

Layer figures:
  t_layer     gate + dispatch + experts + combine, double-buffered (what the engine runs)
  t_experts   the engine's expert step on the same token counts, alone (two strided-batched
              GEMMs over slot-padded rows + the fused bias/activation kernel)
  t_cublas    one plain cuBLAS product pair per expert over exactly its rows, no activation:
              the GEMM ceiling for the same shapes (TFLOP/s counted on real rows for both)
  t_exchange  dispatch + combine of the same rows, alone (block-wise, as the engine sends)
  t_a2a       one plain all-to-all of the same bytes through the same transport: its ceiling
  overlap     max(t_exchange, t_experts) / t_layer (1.0: the shorter one is fully hidden)
  t_plain     the same layer written the plain way (tools/plain_ep.py: sort, counts to the host,
              one all-to-all of rows, per-expert GEMMs, all-to-all back, no overlap); the
              speedup is t_plain / t_layer (not timed with expert TP, nor with ranks sharing a GPU,
              which NCCL refuses: the ``ipc`` transport's one-GPU correctness set-up)

With ``--expert-tp t`` the experts alone include the TP group's broadcast and fp32 reduction, and
expert FLOPs count the work each GPU did: its F / t columns of the leader's rows.

With ``--decode`` the shrunk model also steps generation's decode against its HBM roofline
(``decode_bench.py``).
"""
from __future__ import annotations

import gc
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np

from ..comm.agree import agree_max
from ..comm.exchange import peer_major
from ..comm.failure import collective
from ..comm.topology import build_topology
from ..config.errors import ConfigError
from ..config.run_config import load_config
from ..device.backend import free_memory_bytes, make_backend
from ..device.datasheet import HOPPER_BF16_TFLOPS, datasheet_for
from ..device.dtypes import BF16
from ..files.atomic import write_text_atomic
from ..model.experts import LocalExperts
from ..model.attention import fuse_qkv, fused_core_expected
from ..model.flops import model_flops
from ..model.weights import AttentionWeights, BlockWeights, Expert, GateWeights, MlpWeights, prepare_block
from ..moe.expert_tp import tensor_parallel_experts
from ..moe.router import run_step
from ..placement.file import make_placement
from ..planner.fit import check_memory, with_chunk
from ..runtime.assemble import RankWeights, assemble, wire
from ..runtime.engine import Engine
from .decode_bench import add_decode_arguments, bench_decode, check_decode_arguments, decode_overrides, decode_rows
from .dense_bench import dense_figures
from .plain_ep import PlainEpLayer

SEED_MFU_TARGET = 0.60
WEIGHTS_SEED = 61


def add_arguments(p) -> None:
    p.add_argument("--config", default=str(Path(__file__).resolve().parents[2] / "inputs" / "seed61.toml"),
                   help="model preset (default: inputs/seed61.toml)")
    p.add_argument("--tokens", type=int, default=16384, help="tokens per GPU for the layer")
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--transport", default="auto")
    p.add_argument("--expert-tp", type=int, default=1,
                   help="tensor parallelism inside experts (the TP row: e.g. 2 ranks, seed16.toml)")
    p.add_argument("--dp", type=int, default=1, help="data-parallel replica groups (the DP row)")
    p.add_argument("--set", action="append", default=[], metavar="TABLE.KEY=VALUE",
                   help="any run-config override, e.g. run.expert_gemm_carveout=16 (repeatable)")
    p.add_argument("--model-layers", type=int, default=0,
                   help="also time the whole model shrunk to this many blocks (0: skip)")
    p.add_argument("--sequences", type=int, default=4, help="sequences per GPU for the whole model")
    p.add_argument("--seq-len", type=int, default=1024)
    add_decode_arguments(p)
    p.add_argument("--timeline", action="store_true",
                   help="also record one layer call's GPU timeline (CUDA events on both streams; rank 0's in the JSON)")
    p.add_argument("--json", help="write every figure here (rank 0)")


def _random(cp, shape, std):
    return (cp.random.standard_normal(shape, dtype=cp.float32) * std).astype(BF16)


def _random_weights(cfg, topo, placement, flash, layers, cp) -> RankWeights:
    """Random device weights for ``layers``: what this rank's roles hold, with every expert's
    output bias for the dense side (and an embedding and LM head when the model has a vocabulary)."""
    m = cfg.model
    # one fixed draw per rank: the routing, and with it the experts' skew, the buffers and the
    # GEMM shapes, is then the same in every run (unseeded, runs of the same code differed in
    # skew and in memory by up to 16 GiB, docs/performance.md)
    cp.random.seed(WEIGHTS_SEED + topo.rank)
    out = RankWeights(experts=LocalExperts(m.ffn_kind, cp))
    for layer in layers:
        out.blocks[layer] = _random_block(m, topo, placement, layer, out.experts, flash, cp)
    out.experts.stack()
    out.expert_b2 = _random(cp, (m.num_moe_layers * m.num_experts, m.hidden_size), 0.02)
    out.final_norm = cp.ones(m.hidden_size, cp.float32).astype(BF16)
    if m.vocab_size:
        out.embed = _random(cp, (m.vocab_size, m.hidden_size), 1.0)
        out.lm_head = _random(cp, (m.hidden_size, m.vocab_size), m.hidden_size ** -0.5)
    return out


def _random_block(m, topo, placement, layer: int, experts: LocalExperts, flash, cp) -> BlockWeights:
    """One block's random weights (and this rank's experts of it, added to ``experts``)."""
    H, D = m.hidden_size, m.head_dim
    s = H ** -0.5
    ones = cp.ones(H, cp.float32).astype(BF16)
    attention = AttentionWeights(attn_norm=ones, mlp_norm=ones, wq=_random(cp, (H, m.num_heads * D), s),
                                 wk=_random(cp, (H, m.kv_heads * D), s), wv=_random(cp, (H, m.kv_heads * D), s),
                                 wo=_random(cp, (m.num_heads * D, H), 0.02))
    block = BlockWeights(attention)
    if m.is_moe(layer):
        block.gate = GateWeights(_random(cp, (H, m.num_experts), s))
        F = m.moe_ffn_hidden_size // topo.expert_tp     # this rank's column block
        for f in placement.hosted()[topo.expert_slot]:
            if f // m.num_experts == layer - m.first_dense_layers:
                experts.add(f, Expert(_random(cp, (H, F), s), _random(cp, F, 0.02), _random(cp, (F, H), F ** -0.5),
                                      None))
    else:
        Fd = m.dense_ffn_hidden_size
        block.mlp = MlpWeights(_random(cp, (H, Fd), s), _random(cp, Fd, 0.02), _random(cp, (Fd, H), Fd ** -0.5),
                               _random(cp, H, 0.02))
    fuse = (lambda a: fuse_qkv(a, cp)) if flash is not None else (lambda a: a)
    return prepare_block(block, lambda b: b, lambda a: a, fuse)


def _engine(cfg, topo, backend, layers, hook=run_step) -> Engine:
    """A bench engine: the run's own assembly over random weights (shared placement)."""
    placement = make_placement(cfg.model, topo.num_expert_slots, "shared")
    wiring = wire(cfg, topo, backend)
    weights = _random_weights(cfg, topo, placement, wiring.flash, layers, backend.xp)
    return assemble(cfg, topo, backend, placement, wiring, weights, hook=hook)


class Timer:
    """Median wall time of a GPU region over iterations (events, after warm-up), slowest rank."""

    def __init__(self, cp, comm, warmup: int, iters: int):
        self.cp, self.comm, self.warmup, self.iters = cp, comm, warmup, iters

    def __call__(self, fn) -> float:
        cp, times = self.cp, []
        for i in range(self.warmup + self.iters):
            self.comm.Barrier()
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            fn()
            end.record()
            end.synchronize()
            if i >= self.warmup:
                times.append(cp.cuda.get_elapsed_time(start, end) * 1e-3)
        return agree_max(self.comm, statistics.median(times))


def bench_layer(engine: Engine, args, timer: Timer, cp) -> dict:
    """The engine's MoE layer (block ``first_dense_layers``) and its parts, each timed alone on
    the token counts of the layer's last call (its ``DispatchLayout``)."""
    cfg = engine.cfg.model
    layer = cfg.first_dense_layers
    T, H, F = args.tokens, cfg.hidden_size, cfg.moe_ffn_hidden_size
    m = _random(cp, (T, H), 1.0)
    ids = cp.asarray(engine.topo.rank * T + np.arange(T))
    moe = engine.moe
    t_layer = timer(lambda: moe([(layer, m, ids)]))
    layouts, sends = moe.last_layout.receives, moe.last_layout.sends
    rows = [_random(cp, (lay.extent, H), 1.0) for lay in layouts]
    outs = [cp.empty_like(r) for r in rows]
    t_experts, t_cublas = _expert_times(engine, layouts, rows, outs, timer, cp)
    t_exchange, t_a2a, moved = _exchange_times(engine, sends, layouts, outs, timer, cp)
    phases = _local_phases(engine, layer, m, ids, timer, cp)
    timeline = layer_timeline(engine, layer, m, ids, cp) if isinstance(moe.hook, StepTimeline) else None
    t_plain = None                              # the plain layer has no tensor parallelism
    # nor does it run with ranks sharing a GPU (NCCL refuses that; the ipc transport's correctness set-up)
    shared_gpu = agree_max(engine.topo.world, int(engine.topo.node.Get_size() > cp.cuda.runtime.getDeviceCount()))
    if moe.tp is None and not shared_gpu:
        plain = PlainEpLayer(engine.topo.exchange, cp, moe.tables, moe.experts, moe.gates[layer].gate, cfg.top_k,
                             cfg.normalize_topk, (layer - cfg.first_dense_layers) * cfg.num_experts)
        t_plain = timer(lambda: plain(m))
        plain.close()
    received = int(sum(lay.rows for lay in layouts))
    padded = int(sum(lay.extent for lay in layouts))
    tp = engine.topo.expert_tp
    if moe.tp is not None:                      # every TP member computes on its leader's rows
        received, padded = moe.tp.bcast((received, padded), root=0)
    flops = 2 * 2 * received * H * (F // tp)    # this GPU's share: F / tp columns
    big_m = 16384
    a, b = _random(cp, (big_m, H), 1.0), _random(cp, (H, F), H ** -0.5)
    t_big = timer(lambda: cp.matmul(a, b))
    comm = engine.topo.world
    return {
        "tokens_per_gpu": T, "micro_batches": len(layouts), "rows_received_max": agree_max(comm, received),
        "slot_padding": padded / max(received, 1) - 1,
        "t_layer_ms": t_layer * 1e3, "t_experts_ms": t_experts * 1e3, "t_cublas_ms": t_cublas * 1e3,
        "t_exchange_ms": t_exchange * 1e3, "t_a2a_ms": t_a2a * 1e3, "t_plain_ep_ms": t_plain and t_plain * 1e3,
        "speedup_vs_plain_ep": t_plain and t_plain / t_layer,
        "tokens_per_s_per_gpu": T / t_layer,
        "expert_tflops": flops / t_experts / 1e12, "cublas_same_shapes_tflops": flops / t_cublas / 1e12,
        "gemm_vs_cublas": t_cublas / t_experts,
        "cublas_16384x7168x2048_tflops": 2 * big_m * H * F / t_big / 1e12,
        "exchange_gb_s_per_gpu": moved / t_exchange / 1e9, "a2a_gb_s_per_gpu": moved / t_a2a / 1e9,
        "overlap_efficiency": max(t_exchange, t_experts) / t_layer,
        "peak_pool_gib": agree_max(comm, cp.get_default_memory_pool().total_bytes()) / 2**30,
        "local_phases_ms": phases,
        **({"timeline_rank0": timeline} if timeline is not None else {}),
    }


def _expert_times(engine: Engine, layouts, rows, outs, timer: Timer, cp) -> tuple[float, float]:
    """The layer's expert step over the received layouts alone, and its cuBLAS ceiling."""
    moe = engine.moe
    ex, experts = moe.exchange, moe.experts
    if moe.tp is None:
        t_experts = timer(lambda: [experts.forward(r, lay, o, ex.buffer) for r, lay, o in zip(rows, layouts, outs)])
    else:       # partners compute on the leader's rows: time the whole TP step on every member
        t_experts = timer(lambda: [tensor_parallel_experts(moe.tp, moe.tp_group, engine.backend, experts, r, lay, o,
                                                           ex.buffer) for r, lay, o in zip(rows, layouts, outs)])

    some = experts.experts[0]                        # every expert has the same shapes

    def plain_gemms():
        """One plain cuBLAS product pair per expert over exactly its rows (no padding)."""
        for lay, r in zip(layouts, rows):
            for s, n in enumerate(lay.counts.sum(axis=0).tolist()):
                if n:
                    base = int(lay.offsets[0, s])
                    cp.matmul(cp.matmul(r[base:base + n], some.w1), some.w2)
    return t_experts, timer(plain_gemms)


def _exchange_times(engine: Engine, sends, layouts, outs, timer: Timer, cp) -> tuple[float, float, int]:
    """Dispatch + combine of the layer's rows alone, one plain all-to-all of the same bytes, and
    the bytes this rank moved (both directions)."""
    ex, H = engine.moe.exchange, engine.cfg.model.hidden_size
    send_bufs = [_random(cp, (s.rows, H), 1.0) for s in sends]
    routes = ex.prepare(list(zip(sends, layouts)))       # as the layer does, once per step

    def exchange_alone():
        """Into the exchange's own receive buffers, as the layer does (the ipc transport maps
        them for its peers: rows land there, with no copy out)."""
        for i, (sl, sb, rl, ob, route) in enumerate(zip(sends, send_bufs, layouts, outs, routes)):
            ex.post(sb, sl, ex.buffer("dispatch-recv", i % 2, rl.extent), rl, route).wait()
            ex.post(ob, rl, ex.buffer("combine-recv", i % 2, sl.rows), sl, route).wait()
    t_exchange = timer(exchange_alone)
    me = engine.topo.exchange.Get_rank()
    moved = int(sum(s.rows - s.per_peer[me] for s in sends)) * H * 2 * 2        # both directions
    per_peer = sum(s.per_peer for s in sends)
    flat_send = peer_major(per_peer[:, None])
    flat_recv = peer_major(sum(r.per_peer for r in layouts)[:, None])
    big_send = _random(cp, (flat_send.rows, H), 1.0)
    flat, = ex.prepare([(flat_send, flat_recv)])         # both sides peer-major: nothing to permute

    def a2a():
        there = ex.post(big_send, flat_send, ex.buffer("dispatch-recv", 0, flat_recv.rows), flat_recv, flat).wait()
        ex.post(there, flat_recv, ex.buffer("combine-recv", 0, flat_send.rows), flat_send, flat).wait()
    return t_exchange, timer(a2a), moved


class StepTimeline:
    """The MoE layer's timing hook for ``--timeline``: while ``events`` is a list, each step of a
    call is bracketed by CUDA events on the compute stream (a transfer's end by an event on the
    transport's stream, behind its work); otherwise each step just runs."""

    def __init__(self, cp):
        self.cp, self.events, self.transport_stream = cp, None, None

    def __call__(self, label: str, fn, *args, **kwargs):
        if self.events is None:
            return fn(*args, **kwargs)
        start, host = self.cp.cuda.Event(), time.perf_counter()
        start.record()
        out = fn(*args, **kwargs)
        end = self.cp.cuda.Event()
        end.record(self.transport_stream if label == "transfer" else None)
        self.events.append((label, start, end, host, time.perf_counter()))
        return out


def layer_timeline(engine: Engine, layer: int, m, ids, cp) -> list[dict]:
    """One layer call with CUDA events around each step: when each started and ended on the GPU,
    in ms from the call's start, and when the host called and left each (host_*: a step whose GPU
    start trails its host call waited for the GPU; one whose host call trails the previous GPU
    end left the GPU idle). Compute-stream steps (route, plan, counts, prepare, pack, experts,
    combine) carry their own start and end; a transfer's start is when it was posted (a point on
    the compute stream) and its end is an event on the transport's stream. For finding what waits
    on what; the steps are timed through the layer's hook (``StepTimeline``)."""
    hook, t0 = engine.moe.hook, cp.cuda.Event()
    hook.events, hook.transport_stream = [], engine.moe.exchange.transport.stream
    try:
        t0.record()
        h0 = time.perf_counter()
        engine.moe([(layer, m, ids)])
        cp.cuda.get_current_stream().synchronize()
        cp.cuda.Device().synchronize()
        events = hook.events
    finally:
        hook.events = None
    ms = lambda e: cp.cuda.get_elapsed_time(t0, e)
    return [{"step": label, "start_ms": round(ms(s), 3), "end_ms": round(ms(e), 3),
             "host_call_ms": round((a - h0) * 1e3, 3), "host_return_ms": round((b - h0) * 1e3, 3)}
            for label, s, e, a, b in events]


def _local_phases(engine: Engine, layer: int, m, ids, timer: Timer, cp) -> dict:
    """The layer's work that is neither exchange nor expert GEMMs, each step timed alone."""
    from ..device.kernels import combine, take_rows
    from ..model.gate import gate
    from ..moe.dispatch import plan_dispatch
    cfg, e, moe = engine.cfg.model, engine, engine.moe
    w, k, T = moe.gates[layer], cfg.top_k, m.shape[0]
    routing = gate(m, w.gate, None, k, cfg.normalize_topk, cp)
    flat = routing.experts.astype(np.int64) + (layer - cfg.first_dense_layers) * cfg.num_experts
    plan_args = (flat, cp.asarray(ids), moe.tables, moe.micro_batch_tokens, moe.micro_batches(T),
                 e.topo.exchange.Get_size(), cp, cp.asnumpy)
    plan = plan_dispatch(*plan_args)
    packed = cp.empty((T * k, cfg.hidden_size), BF16)
    back = _random(cp, (T * k, cfg.hidden_size), 1.0)
    f = cp.empty((T, cfg.hidden_size), BF16)
    return {"gate_topk": timer(lambda: gate(m, w.gate, None, k, cfg.normalize_topk, cp)) * 1e3,
            "plan_and_counts_d2h": timer(lambda: plan_dispatch(*plan_args)) * 1e3,
            "pack_rows": timer(lambda: take_rows(m, plan.order // k, out=packed)) * 1e3,
            "weighted_combine": timer(lambda: combine(back, plan.positions, routing.weights, flat,
                                                      moe.expert_b2, out=f)) * 1e3}


def bench_model(engine: Engine, args, timer: Timer, cp) -> dict:
    m = engine.cfg.model
    S, L = args.sequences, args.seq_len
    x = (np.random.default_rng(engine.topo.rank).standard_normal((S, L, m.hidden_size), dtype=np.float32)).astype(BF16)
    lengths = np.full(S, L)
    first = engine.topo.rank * S
    pool = cp.get_default_memory_pool()
    # the forward over inputs already on the GPU (what the model costs: a run overlaps reading
    # and uploading the next chunk with this one), and once more over host inputs, uploaded by
    # the call from pageable memory (235 MB at 16 x 1,024). The forward works in place on its
    # input, so each call gets a fresh device copy (a device-to-device copy, timed with it):
    # fed its own output, the routing would drift from call to call.
    pristine, on_device = cp.asarray(x), cp.empty(x.shape, x.dtype)

    def fresh():
        on_device[...] = pristine
        return on_device
    t = timer(lambda: engine.forward_chunk(fresh(), lengths, first))
    t_host_input = timer(lambda: engine.forward_chunk(x, lengths, first))
    peak_pool = pool.total_bytes()
    memory = memory_figures(cp, lambda: engine.forward_chunk(fresh(), lengths, first))
    cp.cuda.Device().synchronize()
    t0 = time.perf_counter()                                 # one call, each phase waiting for its work
    phases = engine.times.profiled(lambda: engine.forward_chunk(fresh(), lengths, first), cp.cuda.Device().synchronize)
    phases["profiled_call_total"] = time.perf_counter() - t0
    tps = S * L / t
    flops = model_flops(m, L) * tps
    peak = datasheet_for(engine.backend.device_name())
    return {"layers": m.num_layers, "moe_layers": m.num_moe_layers, "sequences_per_gpu": S, "seq_len": L,
            "t_forward_s": t, "tokens_per_s_per_gpu": tps, "model_tflops_per_gpu": flops / 1e12,
            "t_forward_host_input_s": t_host_input, "tokens_per_s_per_gpu_host_input": S * L / t_host_input,
            "mfu_vs_datasheet": flops / ((peak or (HOPPER_BF16_TFLOPS, 0))[0] * 1e12), "seed_mfu_target": SEED_MFU_TARGET,
            "peak_pool_gib": peak_pool / 2 ** 30, **memory, "phase_s_rank0": phases,
            "dense": dense_figures(engine, S, L, timer, cp)}


def memory_figures(cp, call) -> dict:
    """GiB of CuPy's pool around one ``call``, the pool emptied of cached blocks first:
    live_before (weights and buffers the engine keeps), peak_live (the most bytes in use at
    once during the call: what the run needs), pool_after (what the pool holds after it: live
    plus the freed blocks it caches, per stream and split). The timed runs' pool is larger
    still when sizes vary between calls; ``run.memory_limit_gib`` caps it."""
    pool = cp.get_default_memory_pool()

    class Peak(cp.cuda.MemoryHook):
        name = "moe_hpc_peak_live"

        def __init__(self):
            self.used = self.peak = pool.used_bytes()

        def malloc_postprocess(self, **kw):
            self.used += kw["mem_size"]
            self.peak = max(self.peak, self.used)

        def free_postprocess(self, **kw):
            self.used -= kw["mem_size"]
    cp.cuda.Device().synchronize()
    pool.free_all_blocks()
    live_before = pool.used_bytes()
    with Peak() as hook:
        call()
        cp.cuda.Device().synchronize()
    gib = 2 ** 30
    return {"live_before_gib": live_before / gib, "peak_live_gib": hook.peak / gib,
            "pool_after_one_call_gib": pool.total_bytes() / gib,
            "pool_limit_gib": pool.get_limit() / gib if pool.get_limit() else None,
            "largest_live_gib": largest_live(cp)}


def largest_live(cp, top: int = 12) -> dict:
    """GiB held by the live CuPy allocations (each counted once, however many arrays view it),
    summed by the shape and dtype of the first array seen on each: where memory outside the
    planner's count lives."""
    gc.collect()
    seen, by_shape = set(), {}
    for obj in gc.get_objects():
        if not isinstance(obj, cp.ndarray) or obj.data.mem is None or id(obj.data.mem) in seen:
            continue
        seen.add(id(obj.data.mem))
        key = f"{list(obj.shape)} {obj.dtype}"
        by_shape[key] = by_shape.get(key, 0) + obj.data.mem.size
    ranked = sorted(by_shape.items(), key=lambda kv: -kv[1])[:top]
    return {k: round(v / 2 ** 30, 3) for k, v in ranked}


def _memory_released(cp) -> None:
    """Called once the last engine is closed and its name deleted: its memory goes back before
    the next part builds its own, so each part's pool figures are its own. An engine's objects
    refer to each other, so deleting its name frees its arrays only when Python's cycle collector
    runs."""
    gc.collect()
    cp.get_default_memory_pool().free_all_blocks()


def _shrunk(args, overrides: list[str]):
    """The config of the whole-model bench: the preset cut to ``--model-layers`` blocks."""
    m = load_config(args.config, overrides).model
    return load_config(args.config, overrides + [f"model.num_layers={args.model_layers}",
                                                 f"model.first_dense_layers={min(m.first_dense_layers, args.model_layers - 1)}"])


def run_bench(comm, args, log=print) -> dict:
    overrides = ["run.device=gpu", f"run.transport={args.transport}",
                 f"parallel.expert_tp={args.expert_tp}", f"parallel.dp={args.dp}",
                 f"run.micro_batch_tokens={math.ceil(args.tokens / args.micro_batches)}", "parallel.placement=shared"]
    overrides += list(getattr(args, "set", []) or [])
    decode = getattr(args, "decode", False)
    if decode:
        check_decode_arguments(args)
    cfg = load_config(args.config, overrides)
    if cfg.model.mla:
        raise ConfigError("moe-hpc bench does not time MLA (DeepSeek-V3) attention yet; its blocks run through "
                          "moe-hpc run (docs/models.md)")
    topo = build_topology(comm, cfg)
    backend = make_backend("gpu", topo.local_rank, cfg.run.memory_limit_gib)
    shrunk = _shrunk(args, overrides) if args.model_layers else None
    if shrunk is not None:           # the whole model must fit: refuse it now, not after minutes of filling
        collective(topo.world, check_memory, with_chunk(shrunk, args.sequences), topo.size, topo.group_rank,
                   topo.rank, args.seq_len, free_memory_bytes(backend),
                   fused_core=fused_core_expected(cfg.run.attention, backend))
    cp = backend.xp
    timer = Timer(cp, topo.world, args.warmup, args.iters)
    hook = StepTimeline(cp) if getattr(args, "timeline", False) else run_step
    engine = _engine(cfg, topo, backend, [cfg.model.first_dense_layers], hook)
    result = {"ranks": topo.size, "expert_tp": args.expert_tp, "dp": args.dp, "device": backend.device_name(),
              "transport": engine.wiring.exchange.transport_name, "config": args.config, "sets": list(args.set or []),
              "layer": bench_layer(engine, args, timer, cp)}
    engine.close()
    del engine
    _memory_released(cp)
    if shrunk is not None:
        engine = _engine(shrunk, topo, backend, range(shrunk.model.num_layers))
        result["model"] = bench_model(engine, args, timer, cp)
        engine.close()
        del engine
        _memory_released(cp)
    if decode:
        stepped = _shrunk(args, decode_overrides(overrides))
        engine = _engine(stepped, topo, backend, range(stepped.model.num_layers))
        result["decode"] = bench_decode(engine, args, cp)
        if "model" in result:       # generate's prefill against run's forward, same GPU, same run
            d = result["decode"]
            d["prefill_vs_run_tokens_per_s"] = d["prefill_tokens_per_s_per_gpu"] / result["model"]["tokens_per_s_per_gpu"]
        engine.close()
    if topo.rank == 0:
        log(format_table(result))
        if args.json:
            write_text_atomic(args.json, json.dumps(result, indent=2))
    topo.free()
    return result


def format_table(r: dict) -> str:
    L = r["layer"]
    rows = [("ranks / device / transport", f"{r['ranks']} x {r['device']} / {r['transport']}"),
            ("expert TP / DP", f"{r['expert_tp']} / {r['dp']}"),
            ("layer: ms (tokens/GPU)", f"{L['t_layer_ms']:.2f} ({L['tokens_per_gpu']})"),
            ("layer: tokens/s per GPU", f"{L['tokens_per_s_per_gpu']:.3g}"),
            ("experts: ms, TFLOP/s", f"{L['t_experts_ms']:.2f}, {L['expert_tflops']:.0f}"),
            ("  cuBLAS same shapes: ms, TFLOP/s", f"{L['t_cublas_ms']:.2f}, {L['cublas_same_shapes_tflops']:.0f}"
                                                  f" (ours {L['gemm_vs_cublas']:.0%})"),
            ("  cuBLAS 16384x7168x2048 TFLOP/s", f"{L['cublas_16384x7168x2048_tflops']:.0f}"),
            ("exchange alone: ms, GB/s per GPU", f"{L['t_exchange_ms']:.2f}, {L['exchange_gb_s_per_gpu']:.0f}"),
            ("  plain all-to-all: ms, GB/s", f"{L['t_a2a_ms']:.2f}, {L['a2a_gb_s_per_gpu']:.0f}"),
            ("overlap efficiency", f"{L['overlap_efficiency']:.2f}"),
            ("plain EP layer: ms (ours faster by)", "n/a (expert TP or a shared GPU)" if L["t_plain_ep_ms"] is None else
             f"{L['t_plain_ep_ms']:.2f} ({L['speedup_vs_plain_ep']:.2f}x)"),
            ("peak pool GiB per GPU", f"{L['peak_pool_gib']:.1f}"),
            ("local steps ms (gate, plan, pack, combine)",
             ", ".join(f"{v:.2f}" for v in L["local_phases_ms"].values()))]
    if "model" in r:
        M = r["model"]
        rows += [(f"model ({M['layers']} blocks): tokens/s per GPU", f"{M['tokens_per_s_per_gpu']:.3g}"
                  f" ({M['tokens_per_s_per_gpu_host_input']:.3g} with host inputs uploaded by the call)"),
                 ("model: TFLOP/s per GPU, MFU", f"{M['model_tflops_per_gpu']:.0f}, {M['mfu_vs_datasheet']:.1%} "
                                                 f"(seed target {M['seed_mfu_target']:.0%})"),
                 ("model: sequences x length per GPU, peak pool GiB",
                  f"{M['sequences_per_gpu']} x {M['seq_len']}, {M['peak_pool_gib']:.1f}"
                  + (f" (limit {M['pool_limit_gib']:.0f})" if M.get("pool_limit_gib") else "")),
                 ("model: GiB live before / peak live / pool after one call",
                  f"{M['live_before_gib']:.1f} / {M['peak_live_gib']:.1f} / {M['pool_after_one_call_gib']:.1f}")]
        rows += _dense_rows(M["dense"])
    if "decode" in r:
        rows += decode_rows(r["decode"])
    width = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{width}}  {b}" for a, b in rows)


def _dense_rows(d: dict) -> list[tuple[str, str]]:
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)
    return [("attention core / block ms", f"{d['attention_core']} / {d['t_attention_block_ms']:.2f}"),
            ("  core TFLOP/s (torch cuDNN SDPA, ours of it)",
             f"{fmt(d['attention_core_tflops'], '.0f')} ({fmt(d['torch_cudnn_sdpa_tflops'], '.0f')}, "
             f"{fmt(d['core_vs_torch_sdpa'], '.0%')})"),
            ("  projections TFLOP/s (cuBLAS square GEMM)",
             f"{d['projections_tflops']:.0f} ({d['cublas_square_tflops']:.0f})"),
            ("  core pool MiB at equal tokens", ", ".join(f"{k}: {v / 2 ** 20:.0f}"
                                                           for k, v in d["attention_pool_bytes"].items()))]


__all__ = ["run_bench", "add_arguments", "format_table"]
