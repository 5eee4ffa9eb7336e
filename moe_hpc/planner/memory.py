"""Deployment planner: memory per GPU, by what holds it, following the runner's code.

Units: bytes (GIB = 2^30 for reporting); "per GPU" everywhere.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..comm.exchange import slot_rows
from ..config.cluster import GIB, Cluster
from ..config.run_config import Config, ModelConfig
from ..device.dtypes import BF16_BYTES, F32_BYTES
from ..files.checkpoint import global_shapes, layer_shapes
from ..config.roles import stage_blocks
from ..model.dense_tp import local_model
from .deployment import Deployment
from .workload import Workload


@dataclass(frozen=True)
class Memory:
    """Bytes one GPU holds, by what holds them."""
    dense_weights: int = 0
    expert_weights: int = 0
    activations: int = 0
    token_buffers: int = 0
    kv_cache: int = 0          # generation only: the group's KV cache (kv_cache_bytes)
    transport: int = 0
    reserved: int = 0

    @property
    def total(self) -> int:
        return (self.dense_weights + self.expert_weights + self.activations + self.token_buffers
                + self.kv_cache + self.transport + self.reserved)


def _nbytes(shape: tuple[int, ...], itemsize: int = BF16_BYTES) -> int:
    return math.prod(shape) * itemsize


def dense_weight_bytes(m: ModelConfig, logits: bool = False, dense_tp: int = 1, stage: int = 0,
                       stages: int = 1) -> int:
    """What a dense rank loads (runtime/assemble.load_weights): its stage's blocks' non-expert weights, every
    expert's output bias (added at the combine), embed on the first stage, final_norm (and
    lm_head when logits or log-probs are on: ``logits``) on the last; with ``dense_tp`` its share of the attention heads
    and dense-MLP columns (model/dense_tp.py)."""
    m = local_model(m, dense_tp) if dense_tp > 1 else m
    blocks = stage_blocks(m.num_layers, stages)[stage]
    total = 0
    for layer in range(m.num_layers):
        for name, shape in layer_shapes(m, layer).items():
            if name == "experts/b2":
                total += _nbytes(shape)
            elif layer in blocks and name == "gate_bias":
                total += _nbytes(shape, F32_BYTES)
            elif layer in blocks and not name.startswith("experts/"):
                total += _nbytes(shape)
    first, last = stage == 0, stage == stages - 1
    keep = {"embed": first, "final_norm": last, "lm_head": last and logits}
    total += sum(_nbytes(s) for n, s in global_shapes(m).items() if keep.get(n, True))
    if m.vocab_size and m.tie_embeddings and last and logits:     # the head: a transposed copy of embed
        total += _nbytes((m.hidden_size, m.vocab_size))
    return total


def expert_weight_bytes(m: ModelConfig, experts: int, tp: int = 1) -> int:
    """``experts`` hosted experts (w1, b1, w2 slices of the checkpoint's [E, ...] datasets; b2
    stays on the dense ranks; w3 too for a gated MLP), split ``tp`` ways along F with ``parallel.expert_tp``."""
    shapes = layer_shapes(m, m.first_dense_layers)
    one = sum(_nbytes(shapes[f"experts/{n}"][1:]) for n in ("w1", "b1", "w2", "w3") if f"experts/{n}" in shapes)
    return experts * math.ceil(one / tp)


def kv_cache_bytes_per_token(m: ModelConfig) -> int:
    """One position's KV cache in one attention block (model/blocks.KvCache, bf16): k and v of
    every kv head for MHA/GQA; the normed latent and the shared RoPE key for MLA."""
    width = m.kv_lora_rank + m.qk_rope_head_dim if m.mla else 2 * m.kv_heads * m.head_dim
    return width * BF16_BYTES


def kv_cache_bytes(m: ModelConfig, sequences: int, positions: int, dense_tp: int = 1, stage: int = 0,
                   stages: int = 1) -> int:
    """A dense rank's KV cache for a group of ``sequences`` of ``positions`` positions (prompt +
    new tokens; runtime/engine.open_cache): one KvCache per attention block of its stage, of
    this dense-TP member's kv heads (the MLA latent is whole on every member)."""
    local = local_model(m, dense_tp) if dense_tp > 1 else m
    blocks = len(stage_blocks(m.num_layers, stages)[stage])
    return sequences * positions * blocks * kv_cache_bytes_per_token(local)


def activation_bytes(m: ModelConfig, w: Workload, attention_block: int, dense_tp: int = 1) -> int:
    """Peak activations of a dense rank for one chunk (T tokens), following the runner's code.

    Resident: x [T, H] bf16.  Attention (the peak): a [T, H]; q, k, v in bf16 and fp32
    ([T, (nh + 2 kv) D]); out and its transpose [T, nh D] bf16; the projected result [T, H];
    per query tile three fp32 score tiles [S, nh, b, b] (scores, masked, exp) and two fp32
    accumulators [S, nh, b, D].  Under MLA v is [T, nh Dv] and the latents and each head's
    [k_nope | v] are held too.  Then the residual add's two fp32 [T, H] temporaries, the MoE
    block's [T, H] copies, or the dense MLP's [T, Fd] hidden (bf16 + fp32 accumulation).
    With ``dense_tp`` a member holds its heads' and columns' share, plus the fp32 partial output
    [T, H] its group sums.

    The fused flash core (``w.flash``) holds instead one bf16 q|k|v [T, (nh + 2 kv) D] (the QKV
    GEMM's output, RoPE in place) and its output [T, nh D]; its scores never leave the chip.
    """
    partial = w.tokens * m.hidden_size * F32_BYTES if dense_tp > 1 else 0
    m = local_model(m, dense_tp) if dense_tp > 1 else m
    T, S, H, D, Dv = w.tokens, w.sequences, m.hidden_size, m.head_dim, m.attn_out_dim
    nh, kv, b = m.num_heads, m.kv_heads, min(attention_block, w.seq_len)
    if w.flash:
        attention = 2 * T * H * BF16_BYTES + T * (2 * nh + 2 * kv) * D * BF16_BYTES + partial
        tiles = 0
    else:
        qkv = T * ((nh + kv) * D + kv * Dv) * (BF16_BYTES + F32_BYTES)
        if m.mla:   # the latents and [k_nope | v] of every head, in bf16, beside q, k, v
            qkv += T * (m.q_lora_rank + m.kv_lora_rank + m.qk_rope_head_dim
                        + nh * (D - m.qk_rope_head_dim + Dv)) * BF16_BYTES
        attention = 2 * T * H * BF16_BYTES + qkv + 2 * T * nh * Dv * BF16_BYTES + partial
        tiles = 3 * S * nh * b * b * F32_BYTES + 2 * S * nh * b * Dv * F32_BYTES
    residual = 2 * T * H * F32_BYTES
    moe = 3 * T * H * BF16_BYTES + T * m.top_k * 8 * 4          # xv, h, f + plan index arrays
    dense_mlp = T * m.dense_ffn_hidden_size * (BF16_BYTES + F32_BYTES) if m.first_dense_layers else 0
    return T * H * BF16_BYTES + max(attention + tiles, residual, moe, dense_mlp)


def token_buffer_bytes(m: ModelConfig, w: Workload, send_rows: int, recv_extent: int, tp: int = 1,
                       local: bool = False) -> int:
    """The Exchange's buffers (moe/layer.py): two slots per direction (one when a single
    micro-batch), [rows, H] bf16 each, plus one [extent, F] hidden buffer for the expert GEMMs.

    send_rows: rows a dense rank routes per micro-batch (T_mb * k); recv_extent: slot-padded
    rows an expert rank receives per micro-batch (0 for a rank of the other role).
    local: a group of one rank without expert TP (``MoeLayer._local_step``), which moves its
    rows itself: one buffer per direction, the experts' input and output, no send buffers (and
    its packed rows pad less than the slot-padded extent counted here).
    """
    slots = min(2, w.micro_batches)
    H, F = m.hidden_size, m.moe_ffn_hidden_size
    if local:
        rows = 2 * recv_extent                          # dispatch-recv, combine-send
    else:
        rows = slots * 2 * (send_rows + recv_extent)    # dispatch-send/combine-recv, dispatch-recv/combine-send
    return rows * H * BF16_BYTES + recv_extent * math.ceil(F / tp) * BF16_BYTES


@dataclass(frozen=True)
class GpuMemory:
    """Memory of one local rank of a replica (every replica holds the same)."""
    local: int
    role: str
    experts: int
    memory: Memory


def plan_memory(cfg: Config, cluster: Cluster, layout: Deployment, w: Workload,
                expert_tp: int | None = None, new_tokens: int = 0) -> list[GpuMemory]:
    """[group_size] per-rank memory of one replica (expert_tp: the config's unless given;
    new_tokens > 0: a generate job, whose dense ranks also hold the group's KV cache, of its
    ``generate.cache_rows`` sequences)."""
    m, dense_tp, stages = cfg.model, cfg.parallel.dense_tp, cfg.parallel.dense_stages
    expert_tp = expert_tp or cfg.parallel.expert_tp
    # load_weights reads lm_head for logits or log-probs, and generate always (it picks tokens)
    head = cfg.run.logits or cfg.run.logprobs or new_tokens > 0
    dense_w = [dense_weight_bytes(m, head, dense_tp, s, stages) for s in range(stages)]
    act = activation_bytes(m, w, cfg.run.attention_block, dense_tp)
    send = w.mb_tokens * m.top_k
    share, count = layout.routing
    recv_rows = share.max(axis=0, initial=0) * len(layout.routers) * send
    per_layer = count.max(axis=0, initial=0)
    fixed = dict(transport=int(cluster.network.transport_buffer_gib * GIB),
                 reserved=int(cluster.gpu.reserved_gib * GIB))
    one_rank = layout.group_size == 1 and expert_tp == 1              # moe/layer.py: MoeLayer.local
    cache: dict[tuple, GpuMemory] = {}      # ranks alike in role and load share one computation
    out = []
    for local in range(layout.group_size):
        g = layout.expert_index.get(local, -1)
        dense = local in layout.dense_set
        stage = layout.roles.stage_of(local) if dense else 0
        key = (dense, len(layout.placement.hosted()[g]) if g >= 0 else 0, int(per_layer[g]) if g >= 0 else 0,
               float(recv_rows[g]) if g >= 0 else 0.0, stage)
        if key not in cache:
            _, hosted, most, rows, _ = key
            extent = slot_rows(rows, most, w.slot_padding)
            mem = Memory(dense_weights=dense_w[stage] if dense else 0,
                         expert_weights=expert_weight_bytes(m, hosted, expert_tp),
                         activations=act if dense else 0,
                         token_buffers=token_buffer_bytes(m, w, send if dense else 0, extent, expert_tp, one_rank),
                         kv_cache=kv_cache_bytes(m, cfg.generate.cache_rows(w.sequences), w.seq_len + new_tokens,
                                                 dense_tp, stage, stages)
                         if dense and new_tokens else 0,
                         **fixed)
            role = "dense+expert" if dense and g >= 0 else ("dense" if dense else "expert")
            cache[key] = (role, hosted, mem)
        out.append(GpuMemory(local, *cache[key]))
    return out


def cache_rows_fitting(need: Memory, rows: int, free: int) -> int:
    """How many sequences' KV caches fit in ``free`` bytes beside the rest of ``need`` (which
    holds a cache of ``rows`` sequences): the cache is linear in its rows; may be < 1."""
    return (free - (need.total - need.kv_cache)) // (need.kv_cache // rows)


def fits(memory: list[GpuMemory], cluster: Cluster) -> bool:
    return max(g.memory.total for g in memory) <= cluster.gpu.memory_gib * GIB


__all__ = ["Memory", "GpuMemory", "plan_memory", "fits", "cache_rows_fitting", "dense_weight_bytes", "expert_weight_bytes",
           "kv_cache_bytes_per_token", "kv_cache_bytes", "activation_bytes", "token_buffer_bytes", "GIB"]
