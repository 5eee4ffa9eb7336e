"""Deployment planner, part 1: who runs what where, memory per GPU, FLOPs per token.

Pure functions of (run config, cluster).  The layout calls the runner's own ``role_layout``
and ``make_placement`` (never a copy), so a plan cannot disagree with a run.  Data parallelism
(``deployment.data_parallel = R``, not in the runner yet) is modelled as R contiguous blocks of
ranks, each an independent run of N/R ranks with its own expert set and its share of the
sequences; exchanges stay inside a block.

Units: bytes, FLOPs; "per GPU" everywhere.  Routing is assumed uniform over experts (the
bench's random gate is), replicated experts get their tokens split evenly (token index modulo
replicas), and the busiest GPU sets the pace.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .checkpoint import global_shapes, layer_shapes
from .config import Config, ModelConfig
from .errors import ConfigError
from .placement import Placement, gpu_to_node, make_placement
from .plan_cluster import Cluster
from .topology import RoleLayout, role_layout

BF16_BYTES, F32_BYTES = 2, 4
GIB = 2 ** 30
SLOT_ROUND = 8                    # exchange.slot_capacity rounds each expert slot up to 8 rows
DEFAULT_SLOT_PADDING = 0.12       # busiest expert over the mean, measured 11-12.5% (bench JSONs)


@dataclass(frozen=True)
class Layout:
    """R replicas of one run: ``roles`` and ``placement`` describe replica 0's local ranks."""
    model: ModelConfig
    world_size: int
    gpus_per_node: int
    replicas: int
    roles: RoleLayout
    placement: Placement

    @property
    def group_size(self) -> int:
        return self.world_size // self.replicas

    def world_rank(self, replica: int, local: int) -> int:
        return replica * self.group_size + local

    def node(self, rank: int) -> int:
        return gpu_to_node(rank, self.gpus_per_node)

    @cached_property
    def hosted(self) -> dict[int, list[tuple[int, int]]]:
        """Expert-rank index -> its (block, expert) pairs: Placement.experts_on for every rank,
        inverted in one pass over the placement value."""
        out: dict[int, list[tuple[int, int]]] = {g: [] for g in range(self.placement.num_expert_ranks)}
        for m, row in enumerate(self.placement.ranks):
            for e, holders in enumerate(row):
                for g in holders:
                    out[g].append((m + self.placement.first_moe_layer, e))
        return out

    @cached_property
    def expert_index(self) -> dict[int, int]:
        """Local rank -> its position among the expert ranks (the placement's GPU index)."""
        return {rank: i for i, rank in enumerate(self.roles.expert_ranks)}

    @cached_property
    def dense_set(self) -> frozenset[int]:
        return frozenset(self.roles.dense_ranks)

    @cached_property
    def routing(self) -> tuple[np.ndarray, np.ndarray]:
        """(share, count), both [M, X]: the fraction of one dense rank's routed rows that expert
        rank g receives in MoE layer m (1 / (E * replicas) per (expert, replica) it holds), and
        how many experts of layer m it holds."""
        shape = (self.placement.num_moe_layers, self.placement.num_expert_ranks)
        if not shape[0]:
            return np.zeros(shape), np.zeros(shape, dtype=np.int64)
        table = self.placement.rank_table()                        # [M, E, R], -1 padded
        held = table >= 0
        reps = held.sum(axis=2, keepdims=True)
        share, count = np.zeros(shape), np.zeros(shape, dtype=np.int64)
        m_idx = np.broadcast_to(np.arange(table.shape[0])[:, None, None], table.shape)[held]
        weight = np.broadcast_to(1.0 / (self.model.num_experts * reps), table.shape)[held]
        np.add.at(share, (m_idx, table[held]), weight)
        np.add.at(count, (m_idx, table[held]), 1)
        return share, count


def make_layout(cfg: Config, cluster: Cluster, placement_kind: str | None = None) -> Layout:
    """Config + cluster -> Layout, through the runner's role_layout and make_placement."""
    dep, where = cluster.deployment, cluster.source
    dense = dep.dense_gpus if dep.dense_gpus >= 0 else cfg.parallel.dense_ranks * dep.data_parallel
    if dense % dep.data_parallel:
        raise ConfigError(f"{where}: deployment.dense_gpus ({dense}) must be a multiple of "
                          f"deployment.data_parallel ({dep.data_parallel})")
    group = cluster.world_size // dep.data_parallel
    if dense // dep.data_parallel >= group:
        raise ConfigError(f"{where}: deployment.dense_gpus ({dense}) leaves no expert GPU among the "
                          f"{group} GPUs of each of the {dep.data_parallel} replica(s)")
    roles = role_layout(group, dense // dep.data_parallel)
    placement = make_placement(cfg.model, len(roles.expert_ranks), placement_kind or cfg.parallel.placement)
    return Layout(cfg.model, cluster.world_size, cluster.gpus_per_node, dep.data_parallel, roles, placement)


# ---------------------------------------------------------------------------- rank table

@dataclass(frozen=True)
class RankRow:
    """One world rank: where it sits and what it runs. expert_rank -1: hosts no experts."""
    rank: int
    node: int
    local_gpu: int
    replica: int
    role: str
    expert_rank: int
    experts: tuple[tuple[int, int], ...]    # (block, expert) pairs


def rank_rows(layout: Layout) -> list[RankRow]:
    """Every world rank, replica-major: [world_size] rows."""
    rows = []
    for rank in range(layout.world_size):
        replica, local = divmod(rank, layout.group_size)
        g = layout.expert_index.get(local, -1)
        dense, expert = local in layout.dense_set, g >= 0
        role = "dense+expert" if dense and expert else ("dense" if dense else "expert")
        rows.append(RankRow(rank, layout.node(rank), rank % layout.gpus_per_node, replica, role, g,
                            tuple(layout.hosted[g]) if expert else ()))
    return rows


# ---------------------------------------------------------------------------- workload

@dataclass(frozen=True)
class Workload:
    """One step of one dense rank: a chunk of ``sequences`` x ``seq_len`` tokens.

    tokens: T = sequences * seq_len; micro_batches: ceil(T / micro_batch_tokens);
    mb_tokens: tokens of the largest micro-batch.
    """
    sequences: int
    seq_len: int
    micro_batch_tokens: int
    slot_padding: float = DEFAULT_SLOT_PADDING

    @property
    def tokens(self) -> int:
        return self.sequences * self.seq_len

    @property
    def micro_batches(self) -> int:
        return math.ceil(self.tokens / self.micro_batch_tokens)

    @property
    def mb_tokens(self) -> int:
        return min(self.tokens, self.micro_batch_tokens)


def workload_of(cfg: Config, cluster: Cluster, slot_padding: float = DEFAULT_SLOT_PADDING) -> Workload:
    return Workload(cfg.run.chunk_sequences, cluster.deployment.seq_len, cfg.run.micro_batch_tokens,
                    slot_padding)


# ---------------------------------------------------------------------------- FLOPs

def flops_per_token(m: ModelConfig, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token of ONE block of each kind, by operation (2 per multiply-add).

    Causal attention reads seq_len / 2 keys on average; an MoE token runs top_k experts.
    Summed over the blocks this is ``bench.model_flops_per_token`` (a test checks it).
    """
    H, D = m.hidden_size, m.head_dim
    return {"projections": 2 * H * D * (2 * m.num_heads + 2 * m.kv_heads),
            "attention_core": 2 * 2 * m.num_heads * D * seq_len / 2,
            "dense_mlp": 2 * 2 * H * m.dense_ffn_hidden_size,
            "gate": 2 * H * m.num_experts,
            "experts": m.top_k * 2 * 2 * H * m.moe_ffn_hidden_size}


def model_flops(m: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of the whole model."""
    f = flops_per_token(m, seq_len)
    attention = f["projections"] + f["attention_core"]
    return (m.num_layers * attention + m.first_dense_layers * f["dense_mlp"]
            + m.num_moe_layers * (f["gate"] + f["experts"]))


# ---------------------------------------------------------------------------- memory

@dataclass(frozen=True)
class Memory:
    """Bytes one GPU holds, by what holds them."""
    dense_weights: int = 0
    expert_weights: int = 0
    activations: int = 0
    token_buffers: int = 0
    transport: int = 0
    reserved: int = 0

    @property
    def total(self) -> int:
        return (self.dense_weights + self.expert_weights + self.activations + self.token_buffers
                + self.transport + self.reserved)


def _nbytes(shape: tuple[int, ...], itemsize: int = BF16_BYTES) -> int:
    return math.prod(shape) * itemsize


def dense_weight_bytes(m: ModelConfig, logits: bool = False) -> int:
    """What a dense rank loads (engine.load): every block's non-expert weights plus the experts'
    output biases (added at the combine), final_norm, embed, and lm_head when logits are on."""
    total = 0
    for layer in range(m.num_layers):
        for name, shape in layer_shapes(m, layer).items():
            if name == "gate_bias":
                total += _nbytes(shape, F32_BYTES)
            elif not name.startswith("experts/") or name == "experts/b2":
                total += _nbytes(shape)
    glob = global_shapes(m)
    return total + sum(_nbytes(s) for n, s in glob.items() if n != "lm_head" or logits)


def expert_weight_bytes(m: ModelConfig, experts: int, tp: int = 1) -> int:
    """``experts`` hosted experts (w1, b1, w2 slices of the checkpoint's [E, ...] datasets; b2
    stays on the dense ranks), split ``tp`` ways along F if tensor-parallel (not in the runner)."""
    shapes = layer_shapes(m, m.first_dense_layers)
    one = sum(_nbytes(shapes[f"experts/{n}"][1:]) for n in ("w1", "b1", "w2"))
    return experts * math.ceil(one / tp)


def activation_bytes(m: ModelConfig, w: Workload, attention_block: int) -> int:
    """Peak activations of a dense rank for one chunk (T tokens), following the runner's code.

    Resident: x [T, H] bf16.  Attention (the peak): a [T, H]; q, k, v in bf16 and fp32
    ([T, (nh + 2 kv) D]); out and its transpose [T, nh D] bf16; the projected result [T, H];
    per query tile three fp32 score tiles [S, nh, b, b] (scores, masked, exp) and two fp32
    accumulators [S, nh, b, D].  Then the residual add's two fp32 [T, H] temporaries, the MoE
    block's [T, H] copies, or the dense MLP's [T, Fd] hidden (bf16 + fp32 accumulation).
    """
    T, S, H, D = w.tokens, w.sequences, m.hidden_size, m.head_dim
    nh, kv, b = m.num_heads, m.kv_heads, min(attention_block, w.seq_len)
    qkv = T * (nh + 2 * kv) * D * (BF16_BYTES + F32_BYTES)
    attention = 2 * T * H * BF16_BYTES + qkv + 2 * T * nh * D * BF16_BYTES
    tiles = 3 * S * nh * b * b * F32_BYTES + 2 * S * nh * b * D * F32_BYTES
    residual = 2 * T * H * F32_BYTES
    moe = 3 * T * H * BF16_BYTES + T * m.top_k * 8 * 4          # xv, h, f + plan index arrays
    dense_mlp = T * m.dense_ffn_hidden_size * (BF16_BYTES + F32_BYTES) if m.first_dense_layers else 0
    return T * H * BF16_BYTES + max(attention + tiles, residual, moe, dense_mlp)


def slot_rows(rows, experts, padding: float):
    """Rows an expert rank's receive buffer spans: each hosted expert's slot holds the busiest
    expert's rows (mean x (1 + padding)), rounded up to SLOT_ROUND.  Scalars or arrays."""
    experts = np.asarray(experts)
    per_slot = np.asarray(rows, dtype=float) / np.maximum(experts, 1) * (1 + padding)
    out = np.where((experts > 0) & (per_slot > 0),
                   experts * SLOT_ROUND * np.ceil(per_slot / SLOT_ROUND), 0).astype(np.int64)
    return int(out) if out.ndim == 0 else out


def token_buffer_bytes(m: ModelConfig, w: Workload, send_rows: int, recv_extent: int, tp: int = 1) -> int:
    """The Exchange's buffers (engine.MoeBlock): two slots per direction (one when a single
    micro-batch), [rows, H] bf16 each, plus one [extent, F] hidden buffer for the expert GEMMs.

    send_rows: rows a dense rank routes per micro-batch (T_mb * k); recv_extent: slot-padded
    rows an expert rank receives per micro-batch (0 for a rank of the other role).
    """
    slots = min(2, w.micro_batches)
    H, F = m.hidden_size, m.moe_ffn_hidden_size
    rows = slots * 2 * (send_rows + recv_extent)        # dispatch-send/combine-recv, dispatch-recv/combine-send
    return rows * H * BF16_BYTES + recv_extent * math.ceil(F / tp) * BF16_BYTES


@dataclass(frozen=True)
class GpuMemory:
    """Memory of one local rank of a replica (every replica holds the same)."""
    local: int
    role: str
    experts: int
    memory: Memory


def plan_memory(cfg: Config, cluster: Cluster, layout: Layout, w: Workload, expert_tp: int = 1) -> list[GpuMemory]:
    """[group_size] per-rank memory of one replica."""
    m = cfg.model
    dense_w = dense_weight_bytes(m, cfg.run.logits)
    act = activation_bytes(m, w, cfg.run.attention_block)
    send = w.mb_tokens * m.top_k
    share, count = layout.routing
    recv_rows = share.max(axis=0, initial=0) * len(layout.roles.dense_ranks) * send
    per_layer = count.max(axis=0, initial=0)
    fixed = dict(transport=int(cluster.network.transport_buffer_gib * GIB),
                 reserved=int(cluster.gpu.reserved_gib * GIB))
    cache: dict[tuple, GpuMemory] = {}      # ranks alike in role and load share one computation
    out = []
    for local in range(layout.group_size):
        g = layout.expert_index.get(local, -1)
        dense = local in layout.dense_set
        key = (dense, len(layout.hosted[g]) if g >= 0 else 0, int(per_layer[g]) if g >= 0 else 0,
               float(recv_rows[g]) if g >= 0 else 0.0)
        if key not in cache:
            _, hosted, most, rows = key
            extent = slot_rows(rows, most, w.slot_padding)
            mem = Memory(dense_weights=dense_w if dense else 0,
                         expert_weights=expert_weight_bytes(m, hosted, expert_tp),
                         activations=act if dense else 0,
                         token_buffers=token_buffer_bytes(m, w, send if dense else 0, extent, expert_tp),
                         **fixed)
            role = "dense+expert" if dense and g >= 0 else ("dense" if dense else "expert")
            cache[key] = (role, hosted, mem)
        out.append(GpuMemory(local, *cache[key]))
    return out


def fits(memory: list[GpuMemory], cluster: Cluster) -> bool:
    return max(g.memory.total for g in memory) <= cluster.gpu.memory_gib * GIB


__all__ = ["Layout", "make_layout", "RankRow", "rank_rows", "Workload", "workload_of", "flops_per_token",
           "model_flops", "Memory", "GpuMemory", "plan_memory", "fits", "dense_weight_bytes",
           "expert_weight_bytes", "activation_bytes", "token_buffer_bytes", "slot_rows", "GIB"]
