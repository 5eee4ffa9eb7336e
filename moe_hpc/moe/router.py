"""The gate of every MoE block on this rank, and the routing state it owns.

``Router`` turns each part of an exchange step (one block's tokens) into flat expert ids
(m*E + e over all MoE blocks, so one step may carry several blocks), combine weights and, with
run-time balancing, the replica of each choice.  It keeps what routing learns over a run: the
per-expert token counts (``expert_tokens``), the balancer's biases (``balancer``) and the
routing trace (``trace``), both handed in at construction.
"""
from __future__ import annotations

import numpy as np

from ..config.run_config import ModelConfig
from ..device.dtypes import BF16, F32
from ..device.kernels import count_into
from ..model.gate import gate
from .balance import with_bias
from .dispatch import micro_batch_count


def run_step(label: str, fn, *args, **kwargs):
    """The default timing hook: just run the step (a tool's hook may time it, by ``label``)."""
    return fn(*args, **kwargs)


class Router:
    """gates: block index -> that block's weights.GateWeights (``.gate`` [H, E], ``.gate_bias``
    [E]) on this rank; world: every rank (the balancer's collectives span the run); balancer:
    balance.Balancer when run.balance is on; trace: traces.TraceRecorder under ``--trace``."""

    def __init__(self, model: ModelConfig, micro_batch_tokens: int, gates, backend, world, balancer=None,
                 trace=None, hook=run_step):
        self.model, self.micro_batch_tokens = model, micro_batch_tokens
        self.gates, self.backend, self.xp, self.world = gates, backend, backend.xp, world
        self.balancer, self.trace, self.hook = balancer, trace, hook
        # counted where the choices are (the device): reading them here would stall every step
        self._tokens = self.xp.zeros((model.num_moe_layers, model.num_experts), dtype=np.int64)

    @property
    def expert_tokens(self) -> np.ndarray:
        """[M, E] int64 host: tokens this rank routed to each expert so far (one small copy)."""
        return self.backend.to_host(self._tokens)

    def _route_part(self, layer: int, m, tok):
        """One part's routing -> (flat experts [T, k] device, weights [T, k], replica [T, k] host
        or None). With run-time balancing on, the balancer routes micro-batch by micro-batch (a
        collective: every rank calls it for every part, empty or not)."""
        xp, cfg = self.xp, self.model
        k, first = cfg.top_k, cfg.first_dense_layers
        T = m.shape[0]
        replica = None
        if self.balancer is not None:
            mbt = self.micro_batch_tokens
            # over the world, not the exchange communicator: the balancer's per-micro-batch bias
            # updates must happen in the same number of steps on every replica group, so all
            # biases stay equal (the layer's own count, over its exchange, sizes the transfers)
            nmb = micro_batch_count(self.world, T, mbt)
            bounds = [(min(T, i * mbt), min(T, (i + 1) * mbt)) for i in range(nmb)]
            w = self.gates.get(layer)
            choose = lambda x, bias: gate(x, w.gate, with_bias(w.gate_bias, bias, xp), k, cfg.normalize_topk, xp,
                                          cfg.gate_rule)
            experts, weights, replica = self.balancer.route(layer, m, self.backend.to_host(tok), bounds, choose)
            experts = xp.asarray(experts)
            weights = xp.zeros((0, k), F32) if weights is None else weights
        elif T:
            w = self.gates[layer]
            r = gate(m, w.gate, w.gate_bias, k, cfg.normalize_topk, xp, cfg.gate_rule)
            experts, weights = r.experts, r.weights
        else:
            experts, weights = xp.zeros((0, k), np.int64), xp.zeros((0, k), F32)
        count_into(self._tokens[layer - first], experts)
        if self.trace is not None:
            self.trace.record(layer, self.backend.to_host(experts).astype(np.int64))
        return experts.astype(np.int64) + (layer - first) * cfg.num_experts, weights, replica

    def __call__(self, parts):
        """parts: list of (block index, m [T_i, H] bf16, token_ids [T_i]) -> (m [T, H] all parts'
        rows, flat experts [T, k], weights [T, k], token ids [T] (on the device), replica [T, k]
        host or None)."""
        xp, cfg = self.xp, self.model
        k = cfg.top_k
        rows, experts, weights, ids, replicas = [], [], [], [], []
        for layer, m, tok in parts:
            ex, w, rep = self.hook("route", self._route_part, layer, m, tok)
            if rep is not None:
                replicas.append(rep)
            if not m.shape[0]:
                continue
            rows.append(m)
            experts.append(ex)
            weights.append(w)
            ids.append(xp.asarray(tok))
        replica = np.concatenate(replicas) if replicas else None
        if not rows:
            return (xp.empty((0, cfg.hidden_size), BF16), xp.zeros((0, k), np.int64),
                    xp.zeros((0, k), F32), xp.zeros(0, np.int64), replica)
        if len(rows) == 1:
            return rows[0], experts[0], weights[0], ids[0], replica
        m = xp.empty((sum(r.shape[0] for r in rows), cfg.hidden_size), BF16)
        a = 0
        for r in rows:                    # raw 16-bit copies: no bf16 kernels needed
            m.view(np.uint16)[a:a + r.shape[0]] = r.view(np.uint16)
            a += r.shape[0]
        return m, xp.concatenate(experts), xp.concatenate(weights), xp.concatenate(ids), replica


__all__ = ["Router", "run_step"]
