"""The MoE gate: scores -> top-k experts and their combine weights.

The selection bias only chooses experts, it never weights them (SPEC).  Ties are broken by the
lower expert index, so the choice is the same on every rank and every split.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..device.dtypes import F32
from ..device.kernels import gate_topk, matmul_f32out


@dataclass
class Routing:
    """experts: [T, k] int32, ordered by selection score; weights: [T, k] fp32."""
    experts: object
    weights: object


def gate(m, weight, bias, top_k: int, normalize: bool, xp=np, rule=None) -> Routing:
    """m: [T, H] bf16, weight: [H, E] (the gate), bias: [E] fp32 | None -> Routing. All gate math in fp32:
    the logits straight from the GEMM's fp32 accumulator, then softmax and top-k in one kernel.
    rule: the model's ``gate_rule`` (sigmoid scores, groups, weight scale), None for SPEC's."""
    logits = matmul_f32out(m, weight)
    return Routing(*gate_topk(logits, None if bias is None else xp.asarray(bias, dtype=F32), top_k, normalize,
                              **(rule or {})))


__all__ = ["Routing", "gate"]
