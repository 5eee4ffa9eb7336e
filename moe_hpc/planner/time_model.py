"""Deployment planner: seconds per block, from rates, bytes and links.

A step of one block on one GPU costs max(FLOPs / rate, bytes / memory rate) plus a host cost
per GPU operation issued (launch) and per host round trip (sync).  A transfer costs latency +
the bytes of its busiest link over that link's bandwidth, on the link model the placement
optimiser uses (``placement/links.py``: NVLink ports inside a node, the node's rails between).  The MoE block's
double-buffered loop over n micro-batches (moe/layer.py) takes

    t_moe = fill + max(n * c, (n - 1) * x) + loss * min(n * c, (n - 1) * x)

(overlap = max(comm, compute) + exposed fill; ``gpu.overlap_loss`` of the shorter one still
shows, because a transfer and a GEMM running at once on one GPU slow each other down: measured,
not assumed away; docs/plan.md)

c: compute of one micro-batch on the critical path; x: its transfers (dispatch + combine);
fill = x (the first dispatch and the last combine have nothing to hide behind), plus the pack
and the weighted sum when the dense ranks are not the expert ranks.  A rank's rows to itself
are a copy on its own GPU: compute, never hidden.

Every cost is split into the four shares the plan reports: compute, communication (exposed
transfer time), synchronisation (host round trips and collectives) and overhead (launches,
padding rows).  All blocks run in lockstep (every rank steps through every block), so a step
is the sum of its blocks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..comm.exchange import slot_rows
from ..config.cluster import Cluster, GpuSpec
from ..config.roles import stage_blocks
from ..config.run_config import Config, ModelConfig
from ..device.dtypes import BF16_BYTES, F32_BYTES
from ..model.dense_tp import local_model
from ..model.flops import flops_per_token
from ..placement.links import layer_links, layer_seconds, row_bytes
from .deployment import Deployment
from .workload import Workload

CATEGORIES = ("compute", "communication", "synchronisation", "overhead")

# GPU operations and host round trips per step, counted in the runner's code (route, the
# block's expert-token statistics, plan_dispatch, ...). The fitted launch and sync costs absorb
# what these counts get wrong.
LAUNCHES = {"gate": 3, "stats": 3, "plan": 10, "pack": 1, "experts": 3, "weighted_sum": 1,
            "transfer": 1, "norms": 8, "attention": 14, "attention_tile": 12, "attention_flash": 1,
            "dense_mlp": 4}
SYNCS = {"stats": 0, "plan": 1}
SCORE_BYTES = 40        # fp32 bytes moved per attention score: write, mask, max, exp, sum, P.V
NORM_BYTES = 52         # bytes per [T, H] element: two rmsnorms and two residual adds (fp32 temps)


@dataclass(frozen=True)
class Rates:
    """Achieved rates: FLOP/s, B/s, and seconds per launch / per host round trip."""
    gemm: float
    attention: float
    memory: float
    copy: float
    launch: float
    sync: float


def rates_of(gpu: GpuSpec) -> Rates:
    peak, bw = gpu.peak_tflops * 1e12, gpu.memory_tb_s * 1e12
    return Rates(gemm=peak * gpu.mfu, attention=peak * gpu.attention_fraction, memory=bw * gpu.memory_util,
                 copy=bw * gpu.copy_util, launch=gpu.launch_us * 1e-6, sync=gpu.sync_us * 1e-6)


def cost(compute=0.0, communication=0.0, synchronisation=0.0, overhead=0.0) -> dict[str, float]:
    """Seconds by share."""
    return {"compute": compute, "communication": communication, "synchronisation": synchronisation,
            "overhead": overhead}


def add(*costs: dict) -> dict[str, float]:
    return {k: sum(c[k] for c in costs) for k in CATEGORIES}


def scale(c: dict, factor: float) -> dict[str, float]:
    return {k: v * factor for k, v in c.items()}


def seconds(c: dict) -> float:
    return sum(c.values())


def kernel(r: Rates, flops: float, nbytes: float, launches: int, rate: float | None = None, syncs: int = 0):
    """Roofline step: max(flops / rate, bytes / memory) + launches + host round trips."""
    busy = max(flops / (rate or r.gemm), nbytes / r.memory)
    return cost(compute=busy, overhead=launches * r.launch, synchronisation=syncs * r.sync)


# ---------------------------------------------------------------------------- dense-rank steps

def gate(m: ModelConfig, T: int, r: Rates):
    """[T, H] @ [H, E] with fp32 output, then one softmax + top-k kernel (reads the logits)."""
    E = m.num_experts
    return kernel(r, 2 * T * m.hidden_size * E, T * m.hidden_size * BF16_BYTES + 2 * T * E * F32_BYTES,
                  LAUNCHES["gate"])


def stats(m: ModelConfig, T: int, r: Rates):
    """The block's expert-token count (kept on the device) and the flat expert ids."""
    return kernel(r, 0, T * m.top_k * 8, LAUNCHES["stats"], syncs=SYNCS["stats"])


def plan(m: ModelConfig, T: int, r: Rates):
    """plan_dispatch: a counting sort of the T*k (micro-batch, rank, slot) keys in three kernels
    (keys, scan, stable scatter: ~40 bytes per key), the counts to the host once."""
    return kernel(r, 0, 40 * T * m.top_k, LAUNCHES["plan"], syncs=SYNCS["plan"])


def pack(m: ModelConfig, T_mb: int, r: Rates):
    """Gather the micro-batch's T_mb * k rows into send order (read + write)."""
    return kernel(r, 0, 2 * T_mb * m.top_k * m.hidden_size * BF16_BYTES, LAUNCHES["pack"])


def weighted_sum(m: ModelConfig, T_mb: int, r: Rates):
    """Read the k returned rows per token, write [T_mb, H] (the [E, H] output biases it adds
    stay in cache)."""
    return kernel(r, 0, (m.top_k + 1) * T_mb * m.hidden_size * BF16_BYTES, LAUNCHES["weighted_sum"])


def self_copy(m: ModelConfig, rows: float, r: Rates):
    """A transport moving ``rows`` within one GPU (read + write), one direction."""
    busy = 2 * rows * m.hidden_size * BF16_BYTES / r.copy
    return cost(compute=busy, overhead=LAUNCHES["transfer"] * r.launch)


def attention(m: ModelConfig, w: Workload, block: int, r: Rates):
    """Norms, projections (GEMM rate), the core (attention rate) and residual adds of one block
    on a dense rank's chunk. The tiled fp32 core also moves every score through memory, tile by
    tile; the fused flash core (``w.flash``) keeps its scores on chip and reads the bf16 q|k|v
    rows the one QKV GEMM wrote, RoPE applied to them in place."""
    T, L, S, H, D = w.tokens, w.seq_len, w.sequences, m.hidden_size, m.head_dim
    f = flops_per_token(m, L)
    heads = m.num_heads + m.kv_heads
    if w.flash:
        core = T * f["attention_core"] / r.attention
        elementwise = (NORM_BYTES * T * H + 2 * T * heads * D * BF16_BYTES) / r.memory
        launches = LAUNCHES["attention"] + LAUNCHES["attention_flash"]
    else:
        b = min(block, L)
        tiles = sum(q + 1 for q in range(math.ceil(L / b)))      # causal: key tiles up to the query tile
        scores = S * m.num_heads * tiles * b * b
        core = max(T * f["attention_core"] / r.attention, scores * SCORE_BYTES / r.memory)
        elementwise = (NORM_BYTES * T * H + 14 * T * heads * D + 14 * T * m.kv_heads * m.attn_out_dim) / r.memory
        launches = LAUNCHES["attention"] + LAUNCHES["attention_tile"] * tiles
    return cost(compute=T * f["projections"] / r.gemm + core + elementwise,
                overhead=(launches + LAUNCHES["norms"]) * r.launch)


def dense_mlp(m: ModelConfig, T: int, r: Rates):
    Fd = m.dense_ffn_hidden_size
    return kernel(r, 2 * 2 * T * m.hidden_size * Fd, 3 * T * Fd * BF16_BYTES, LAUNCHES["dense_mlp"])


# ---------------------------------------------------------------------------- expert-rank step

def experts(m: ModelConfig, rows, hosted, padding: float, r: Rates):
    """Slot-padded grouped GEMMs over ``rows`` received rows of ``hosted`` local experts.
    rows, hosted: scalars or [X] arrays -> (compute, overhead) seconds, padding as overhead."""
    H, F = m.hidden_size, m.moe_ffn_hidden_size
    padded = slot_rows(rows, hosted, padding)
    nbytes = np.asarray(hosted) * 2 * H * F * BF16_BYTES + padded * (2 * H + 3 * F) * BF16_BYTES
    busy = np.maximum(4 * padded * H * F / r.gemm, nbytes / r.memory)
    real = np.divide(rows, padded, out=np.zeros_like(busy, dtype=float), where=padded > 0)
    launches = np.where(np.asarray(hosted) > 0, LAUNCHES["experts"] * r.launch, 0.0)
    return busy * real, busy * (1 - real) + launches


# ---------------------------------------------------------------------------- transfers

def collectives(layout: Deployment, cluster: Cluster, w: Workload, r: Rates):
    """Per MoE block: allreduce of the micro-batch count and Alltoall of the counts (host MPI)."""
    n = layout.group_size
    if n == 1:
        return cost()
    net = cluster.network
    multi_node = layout.node(n - 1) > 0
    latency = (net.inter_node_latency_us if multi_node else net.intra_node_latency_us) * 1e-6
    bw = (net.inter_node_gb_s if multi_node else net.intra_node_gb_s) * 1e9
    counts = n * w.micro_batches * layout.model.num_experts * 8
    return cost(synchronisation=2 * math.ceil(math.log2(n)) * latency + counts / bw)


def transfer(layout: Deployment, cluster: Cluster, w: Workload, moe_index: int) -> tuple[float, float]:
    """One direction of one micro-batch in MoE layer ``moe_index`` -> (seconds its busiest link
    needs, latency included; most rows any GPU sends to itself).

    The link model is the placement's own (``placement.links``): every dense rank routes
    ``mb_tokens * top_k`` rows spread evenly over the experts, a replicated expert's share split
    over its replicas.  The combine mirrors the dispatch, so it costs the same."""
    m = layout.model
    rows = w.mb_tokens * m.top_k
    table = layout.placement.rank_table()[moe_index]                    # [E, R] expert ranks, -1 pad
    dense = np.asarray(layout.routers_of(m.moe_layers[moe_index]))    # the ranks that route its tokens
    expert = np.asarray(layout.roles.expert_ranks)
    counts = np.full((dense.size, m.num_experts), rows / m.num_experts)  # [S, E]
    replicas = (table >= 0).sum(axis=1)                                 # [E]
    worst, self_rows, crosses_nodes = 0.0, 0.0, False
    for replica in range(layout.replicas):
        base = layout.world_rank(replica, 0)
        holders = np.where(table >= 0, base + expert[np.maximum(table, 0)], -1)
        sources = base + dense
        links = layer_links(holders, counts, sources, cluster.gpus_per_node, cluster.nodes)
        seconds, _ = layer_seconds(links, cluster, row_bytes(m.hidden_size))
        worst = max(worst, seconds)
        own = (holders[None, :, :] == sources[:, None, None]).sum(axis=2)   # [S, E] copies held by the source
        self_rows = max(self_rows, float((counts * own / replicas).sum(axis=1).max(initial=0.0)))
        crosses_nodes |= bool(links.node_up.max(initial=0.0) > 0)
    if worst > 0:
        net = cluster.network
        worst += (net.inter_node_latency_us if crosses_nodes else net.intra_node_latency_us) * 1e-6
    return worst, self_rows


# ---------------------------------------------------------------------------- blocks and steps

@dataclass(frozen=True)
class BlockTime:
    """One block on the critical path. phases: seconds by step (for the layer table);
    cost: seconds by share; expert_busy: [X] seconds each expert rank computes."""
    layer: int
    phases: dict
    cost: dict
    expert_busy: np.ndarray | None = None

    @property
    def seconds(self) -> float:
        return seconds(self.cost)


def moe_block(cfg: Config, cluster: Cluster, layout: Deployment, w: Workload, layer: int, r: Rates) -> BlockTime:
    """Attention, gating, then the double-buffered dispatch/experts/combine loop of one MoE
    block; the slowest expert GPU and the slowest link set each step."""
    m = cfg.model
    mi = layer - m.first_dense_layers
    T, T_mb, n = w.tokens, w.mb_tokens, w.micro_batches
    attn = dense_side(cfg, cluster, w, r, attention)
    gating = add(gate(m, T, r), stats(m, T, r), plan(m, T, r), collectives(layout, cluster, w, r))
    share, count = layout.routing
    rows_in = share[mi] * len(layout.routers) * T_mb * m.top_k                      # [X]
    ex_compute, ex_over = experts(m, rows_in, count[mi], w.slot_padding, r)
    g = int(np.argmax(ex_compute + ex_over))
    ex = cost(compute=float(ex_compute[g]), overhead=float(ex_over[g]))
    network, own_rows = transfer(layout, cluster, w, mi)
    # a one-rank group skips the transport (moe/layer.py: _local_step): its rows are packed
    # straight into the expert slots, which ``pack`` already counts
    copy = scale(self_copy(m, own_rows, r), 2) if own_rows and layout.group_size > 1 else cost()
    local = add(pack(m, T_mb, r), weighted_sum(m, T_mb, r))
    if layout.roles.colocated:
        c, fill = add(local, ex, copy), cost()
    else:
        c, fill = (ex if seconds(ex) >= seconds(local) else local), local
    x = 2 * network
    hidden = min(n * seconds(c), (n - 1) * x)           # what perfect overlap would hide
    moe = x + seconds(fill) + max(n * seconds(c), (n - 1) * x) + cluster.gpu.overlap_loss * hidden
    exposed = moe - n * seconds(c) - seconds(fill)
    pipe = add(scale(c, n), fill, cost(communication=exposed))
    one_way = n * (network + seconds(copy) / 2)
    phases = {"attention": seconds(attn), "gating": seconds(gating), "dispatch": one_way,
              "experts": n * seconds(ex), "combine": one_way, "local": n * seconds(local), "moe": moe}
    return BlockTime(layer, phases, add(attn, gating, pipe), n * (ex_compute + ex_over))


def dense_side(cfg: Config, cluster: Cluster, w: Workload, r: Rates, step):
    """Attention or the dense MLP on one member of a dense group (``parallel.dense_tp = T``): its
    heads' or columns' share of the work, then the group's all-reduce of the fp32 partial [T, H]
    (a ring over NVLink ports: 2 (T-1)/T of the bytes each way, 2 (T-1) latencies)."""
    T = cfg.parallel.dense_tp
    m = local_model(cfg.model, T) if T > 1 else cfg.model
    own = step(m, w, cfg.run.attention_block, r) if step is attention else step(m, w.tokens, r)
    if T == 1:
        return own
    net = cluster.network
    nbytes = w.tokens * m.hidden_size * F32_BYTES
    ring = 2 * (T - 1) / T * nbytes / (net.intra_node_gb_s * 1e9) + 2 * (T - 1) * net.intra_node_latency_us * 1e-6
    return add(own, cost(communication=ring))


def dense_block(cfg: Config, cluster: Cluster, w: Workload, layer: int, r: Rates) -> BlockTime:
    """Attention and the dense MLP on the dense ranks."""
    attn, mlp = dense_side(cfg, cluster, w, r, attention), dense_side(cfg, cluster, w, r, dense_mlp)
    return BlockTime(layer, {"attention": seconds(attn), "dense_mlp": seconds(mlp)}, add(attn, mlp))


@dataclass(frozen=True)
class StepTime:
    """Every block once for one chunk on every dense rank of every replica.

    With dense stages the engine's wavefront schedule (``Engine.schedule``) sets the pace: at
    step s wave w is at block s - w, a wave carries 1/W of the chunk, and every rank joins every
    step's collectives, so the stages advance in lockstep and a step lasts as long as its
    busiest stage's share of the waves it holds. Waves therefore overlap stages only once there
    are about as many waves as blocks per stage. Each stage boundary adds one hand-over of the
    chunk (``send_s``). Experts shared by several stages' blocks in one step are not summed."""
    blocks: list
    tokens: int                     # tokens per step, all replicas
    stage_of: tuple = ()            # block -> its stage (empty: one stage)
    waves: int = 1
    send_s: float = 0.0             # one stage's hand-over of a chunk's activations

    @property
    def stage_seconds(self) -> list[float]:
        """Each stage's busy time for the chunk: its blocks and its hand-over to the next."""
        stages = max(self.stage_of, default=0) + 1
        per = [0.0] * stages
        for b in self.blocks:
            per[self.stage_of[b.layer] if self.stage_of else 0] += b.seconds
        return [t + (self.send_s if s < stages - 1 else 0.0) for s, t in enumerate(per)]

    @property
    def seconds(self) -> float:
        if not self.stage_of:
            return sum(b.seconds for b in self.blocks)
        W, L, P = self.waves, len(self.blocks), max(self.stage_of) + 1
        total = 0.0
        for step in range(L + W - 1):
            per = [0.0] * P
            for layer in range(max(0, step - W + 1), min(L, step + 1)):     # wave step - layer is here
                per[self.stage_of[layer]] += self.blocks[layer].seconds / W
            total += max(per)
        return total + (P - 1) * self.send_s

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def shares(self) -> dict[str, float]:
        """Each category's share of the work (of all stages' busy time together)."""
        total = add(*(b.cost for b in self.blocks))
        busy = sum(b.seconds for b in self.blocks)
        return {k: v / busy for k, v in total.items()}

    def slowest_moe(self) -> BlockTime | None:
        moe = [b for b in self.blocks if "moe" in b.phases]
        return max(moe, key=lambda b: b.seconds) if moe else None

    def expert_busy_fraction(self) -> float:
        """The busiest expert rank's expert compute over the step."""
        busy = sum(b.expert_busy for b in self.blocks if b.expert_busy is not None)
        return float(np.max(busy, initial=0.0)) / self.seconds if np.ndim(busy) else 0.0


def step_time(cfg: Config, cluster: Cluster, layout: Deployment, w: Workload) -> StepTime:
    r = rates_of(cluster.gpu)
    m = cfg.model
    blocks = [moe_block(cfg, cluster, layout, w, l, r) if m.is_moe(l) else dense_block(cfg, cluster, w, l, r)
              for l in range(m.num_layers)]
    tokens = layout.replicas * len(layout.routers) * w.tokens
    P = cfg.parallel.dense_stages
    if P == 1:
        return StepTime(blocks, tokens)
    stage_of = tuple(s for s, blocks_ in enumerate(stage_blocks(m.num_layers, P)) for _ in blocks_)
    return StepTime(blocks, tokens, stage_of, cfg.run.pipeline_waves, stage_send(m, cluster, w))


def stage_send(m, cluster: Cluster, w: Workload) -> float:
    """A chunk's activations [T, H] bf16 from one stage to the next: host-staged MPI between
    nodes (stages sit on different nodes in a large deployment), so the inter-node link."""
    net = cluster.network
    return w.tokens * m.hidden_size * BF16_BYTES / (net.inter_node_gb_s * 1e9) + net.inter_node_latency_us * 1e-6


__all__ = ["Rates", "rates_of", "CATEGORIES", "LAUNCHES", "SYNCS", "cost", "add", "scale", "seconds",
           "gate", "stats", "plan", "pack", "weighted_sum", "self_copy", "attention", "dense_mlp",
           "experts", "transfer", "collectives", "BlockTime", "moe_block", "dense_block", "StepTime",
           "step_time", "stage_send"]
