"""Typed weights per block kind, and the one step that prepares them for the engine.

``files/checkpoint.py`` reads a block into ``BlockWeights`` (its attention, and either its dense
MLP or its MoE gate with the shared expert) and an expert into ``Expert``; ``prepare_block`` then
makes the weights a rank computes with: its dense-TP shard, the gated MLPs' [gate | up] fused
into one GEMM's weight, QKV fused for flash attention, all on the device.  Arrays are bf16-valued
(see ``Backend.weight_dtype``); shapes as in ``checkpoint.layer_shapes``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np


@dataclass
class AttentionWeights:
    """One block's attention and the two norms around it (the MLP's input norm is applied with
    the attention's residual add)."""
    attn_norm: np.ndarray
    wq: np.ndarray
    wk: np.ndarray
    wv: np.ndarray
    wo: np.ndarray
    mlp_norm: np.ndarray
    wq_a: np.ndarray | None = None    # MLA (checkpoint._mla_shapes): q latent [H, Rq], its norm, [Rq, nh D]
    q_a_norm: np.ndarray | None = None
    wq_b: np.ndarray | None = None
    wkv_a: np.ndarray | None = None   # MLA: [H, Rkv + rope] latent and shared RoPE key, its norm [Rkv]
    kv_a_norm: np.ndarray | None = None
    wkv_b: np.ndarray | None = None   # MLA: [Rkv, nh (nope + v)] each head's k_nope and v
    bq: np.ndarray | None = None      # q/k/v biases (Qwen2-MoE)
    bk: np.ndarray | None = None
    bv: np.ndarray | None = None
    q_norm: np.ndarray | None = None  # [D] per head or [nh*D] whole (model.qk_norm)
    k_norm: np.ndarray | None = None
    wqkv: np.ndarray | None = None    # [H, (nh + 2 kv) D] wq|wk|wv fused (GPU flash path; see fuse_qkv)


@dataclass
class MlpWeights:
    """A dense block's MLP: w1 [H, Fd] ([H, 2 Fd] gate | up once prepared), b1 [Fd] | None,
    w2 [Fd, H], b2 [H] | None; w3 the gated MLP's up projection until fused into w1."""
    w1: np.ndarray
    b1: np.ndarray | None
    w2: np.ndarray
    b2: np.ndarray | None
    w3: np.ndarray | None = None


@dataclass
class GateWeights:
    """A MoE block's dense-rank part: the gate [H, E], its selection offsets gate_bias [E] fp32
    (never weights), and the shared expert shared_w1 [H, Fs] (gate | up once prepared),
    shared_w2 [Fs, H], shared_gate [H] | None (its output scaled by sigmoid(m . shared_gate))."""
    gate: np.ndarray
    gate_bias: np.ndarray | None = None
    shared_w1: np.ndarray | None = None
    shared_w3: np.ndarray | None = None
    shared_w2: np.ndarray | None = None
    shared_gate: np.ndarray | None = None


@dataclass
class BlockWeights:
    """What a dense rank holds of one block: attention, and a dense MLP or a MoE gate."""
    attention: AttentionWeights
    mlp: MlpWeights | None = None
    gate: GateWeights | None = None


@dataclass
class Expert:
    """One expert MLP: w1 [H, F] ([H, 2F] gate | up when gated), b1 [F] | None, w2 [F, H], b2 [H] | None."""
    w1: np.ndarray
    b1: np.ndarray | None
    w2: np.ndarray
    b2: np.ndarray | None


def fuse_gate_up(w1, w3):
    """A gated MLP's gate [.., H, F] and up [.., H, F] projections side by side -> [.., H, 2F],
    so one GEMM makes both halves (kernels: activation kind "gated-*")."""
    return w1 if w3 is None else np.concatenate([w1, w3], axis=-1)


def _on_device(weights, put):
    return dataclasses.replace(weights, **{k: None if v is None else put(v) for k, v in vars(weights).items()})


def prepare_block(block: BlockWeights, shard, put, fuse_attention) -> BlockWeights:
    """The checkpoint's block -> the weights a rank computes with, on the device.

    shard: BlockWeights -> this dense-TP member's shard (identity without dense TP);
    put: host array -> device array; fuse_attention: AttentionWeights -> the same with QKV
    fused where the flash path runs it (identity without flash attention)."""
    block = shard(block)
    mlp, gate = block.mlp, block.gate
    if mlp is not None:        # gated: one GEMM makes gate and up
        mlp = _on_device(dataclasses.replace(mlp, w1=fuse_gate_up(mlp.w1, mlp.w3), w3=None), put)
    if gate is not None:
        gate = _on_device(dataclasses.replace(gate, shared_w1=fuse_gate_up(gate.shared_w1, gate.shared_w3),
                                              shared_w3=None), put)
    return BlockWeights(fuse_attention(_on_device(block.attention, put)), mlp, gate)


__all__ = ["AttentionWeights", "MlpWeights", "GateWeights", "BlockWeights", "Expert", "fuse_gate_up",
           "prepare_block"]
