"""Forward FLOPs per token: one home for the count that the planner, the bench's MFU and the
docs all use (2 FLOPs per multiply-add; causal attention reads seq_len / 2 keys on average).
"""
from __future__ import annotations

from ..config.run_config import ModelConfig


def flops_per_token(m: ModelConfig, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token of ONE block of each kind, by operation (2 per multiply-add).

    An MoE token runs top_k experts, and the shared expert when the model has one (counted with
    the gate: both run on the dense rank); a gated MLP has three [H, F] products, a plain one two.
    """
    H, D = m.hidden_size, m.head_dim
    mats = 3 if m.mlp == "gated" else 2
    return {"projections": _projection_flops(m),
            "attention_core": 2 * m.num_heads * (D + m.attn_out_dim) * seq_len / 2,
            "dense_mlp": 2 * mats * H * m.dense_ffn_hidden_size,
            "gate": 2 * H * m.num_experts + 2 * mats * H * m.shared_expert_ffn_hidden_size,
            "experts": m.top_k * 2 * mats * H * m.moe_ffn_hidden_size}


def _projection_flops(m: ModelConfig) -> float:
    """q, k, v and output projections per token; under MLA the latents' products (q through
    its latent or directly, the k/v latent with the shared RoPE key, its expansion to every
    head's k_nope and v) and wo over the heads' values."""
    H, D, nh = m.hidden_size, m.head_dim, m.num_heads
    if not m.mla:
        return 2 * H * D * (2 * nh + 2 * m.kv_heads)
    q = (H + nh * D) * m.q_lora_rank if m.q_lora_rank else H * nh * D
    kv = H * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank * nh * (D - m.qk_rope_head_dim + m.v_head_dim)
    return 2 * (q + kv + nh * m.v_head_dim * H)


def model_flops(m: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of the whole model."""
    f = flops_per_token(m, seq_len)
    attention = f["projections"] + f["attention_core"]
    return (m.num_layers * attention + m.first_dense_layers * f["dense_mlp"]
            + m.num_moe_layers * (f["gate"] + f["experts"]))


__all__ = ["flops_per_token", "model_flops"]
