"""Forward FLOPs per token: one home for the count that the planner, the bench's MFU and the
docs all use (2 FLOPs per multiply-add; causal attention reads seq_len / 2 keys on average).
"""
from __future__ import annotations

from ..config.run_config import ModelConfig


def flops_per_token(m: ModelConfig, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token of ONE block of each kind, by operation (2 per multiply-add).

    An MoE token runs top_k experts.
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


__all__ = ["flops_per_token", "model_flops"]
