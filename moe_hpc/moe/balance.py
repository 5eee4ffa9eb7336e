"""Run-time load balancing (``run.balance = true``): selection biases moved against the load.

Per MoE block, the gate routes a chunk's tokens micro-batch by micro-batch.  After each, the
per-expert token counts are summed over all ranks (one small Allreduce, so every rank makes the
same update and the output is deterministic for a given layout); when that micro-batch's
max/mean expert load exceeds ``run.balance_threshold``, every expert's bias moves by
``gamma * sign(mean_load - load_e)``.  The bias only chooses experts (SPEC's ``bias[l]``, added
to the checkpoint's ``gate_bias``); the combine weights stay the gate's probabilities.

With replicas, each expert's tokens of the next micro-batch are shared among its replicas so
as to even out what the replicas received so far (water-filling); a token picks its replica
from a hash of its global index, so the choice is the same whichever rank routes it.
Off (the default), nothing here runs and routing is the model's own.
"""
from __future__ import annotations

from collections import deque

import numpy as np

from ..device.kernels import choice_counts

GOLDEN = 0.6180339887498949     # token index -> well-spread fraction in [0, 1)
REPORT_WINDOW = 4               # "after" = the last few micro-batches together: less noise than one


def with_bias(base, extra: np.ndarray, xp=np):
    """The gate's selection bias: the checkpoint's ``gate_bias`` [E] (on the device, or None)
    plus the balancer's host-side ``extra`` [E] fp32."""
    return extra if base is None else base + xp.asarray(extra)


def waterfill(loads: np.ndarray, replicas: np.ndarray, amount: np.ndarray) -> np.ndarray:
    """Shares of ``amount`` per replica that level the replicas' loads as far as it goes.

    Parameters:
        loads: [E, R] tokens each replica received so far (entries past ``replicas[e]`` unused)
        replicas: [E] replicas of each expert; amount: [E] tokens about to be shared (> 0)
    Returns:
        share: [E, R] fractions summing to 1 over each expert's replicas, 0 past them
    """
    R = loads.shape[1]
    live = np.arange(R)[None, :] < replicas[:, None]
    level = np.where(live, loads, np.inf)
    s = np.sort(level, axis=1)
    fill = (amount[:, None] + np.cumsum(s, axis=1)) / np.arange(1, R + 1)   # level if i+1 are filled
    filled = (fill > s).sum(axis=1)              # how many replicas the water reaches (>= 1)
    water = fill[np.arange(loads.shape[0]), filled - 1]
    give = np.where(live, np.maximum(water[:, None] - level, 0.0), 0.0)
    return give / give.sum(axis=1, keepdims=True)


def choose_replicas(experts: np.ndarray, token_ids: np.ndarray, share: np.ndarray,
                    replicas: np.ndarray) -> np.ndarray:
    """experts: [T, k]; token_ids: [T] global token index; share: [E, R]; replicas: [E]
    -> replica [T, k]: the share interval that the token's hash falls in."""
    u = np.modf(token_ids.astype(np.float64) * GOLDEN)[0]
    edges = np.cumsum(share, axis=1)[experts]                        # [T, k, R]
    pick = (edges <= u[:, None, None]).sum(axis=-1)
    return np.minimum(pick, replicas[experts] - 1)                   # rounding at the top edge


def max_over_mean(counts: np.ndarray) -> float:
    """counts: [E] tokens per expert -> max / mean (1.0 = perfectly even)."""
    mean = counts.sum() / counts.shape[0]
    return float(counts.max() / mean) if mean else 1.0


class Balancer:
    """Biases, replica loads and the record of one run's balancing, identical on every rank.
    placement: the run's Placement value (placement/table.py); comm: every rank of the run."""

    def __init__(self, placement, top_k: int, threshold: float, gamma: float, comm,
                 to_host=np.asarray, xp=np, log=None):
        M, E = placement.num_moe_layers, placement.num_experts
        self.first, self.k, self.threshold, self.gamma = placement.first_moe_layer, top_k, threshold, gamma
        self.comm, self.to_host, self.xp = comm, to_host, xp
        self.log = log if comm.Get_rank() == 0 else None
        self.replicas = np.array([[len(h) for h in row] for row in placement.ranks], np.int64)   # [M, E]
        self.bias = np.zeros((M, E), np.float32)
        self.received = np.zeros((M, E, int(self.replicas.max(initial=1))))                    # [M, E, R]
        self.last = np.zeros((M, E))
        self.history: list[list[float]] = [[] for _ in range(M)]     # max/mean of each micro-batch
        self.recent = [deque(maxlen=REPORT_WINDOW) for _ in range(M)]  # their counts [E], newest last
        self.updates = np.zeros(M, np.int64)

    def route(self, layer: int, m, token_ids: np.ndarray, bounds, gate):
        """Route [T, H] tokens one micro-batch (``bounds``) at a time. Collective: every rank
        calls it with the same number of micro-batches. ``gate(x, bias)`` -> Routing.

        Returns experts [T, k] int64 (host), weights [T, k] fp32 (device) or None when T = 0,
        and replica [T, k] int64: which replica of each chosen expert gets the token."""
        i = layer - self.first
        E, R = self.bias.shape[1], self.received.shape[2]
        experts, weights, replica = [], [], []
        steps, updates = len(self.history[i]), int(self.updates[i])
        for a, b in bounds:
            ex = np.zeros((0, self.k), np.int64)
            if b > a:
                routing = gate(m[a:b], self.bias[i])
                ex = self.to_host(routing.experts)
                weights.append(routing.weights)
            share = waterfill(self.received[i], self.replicas[i], np.maximum(self.last[i], 1.0))
            rep = choose_replicas(ex, token_ids[a:b], share, self.replicas[i])
            local = choice_counts(ex * R + rep, E * R)
            total = np.empty_like(local)
            self.comm.Allreduce(local, total)
            self.observe(i, total.reshape(E, R))
            experts.append(ex)
            replica.append(rep)
        self._log_call(layer, steps, updates)
        out = self.xp.concatenate(weights) if weights else None
        return np.concatenate(experts), out, np.concatenate(replica)

    def observe(self, i: int, counts: np.ndarray) -> None:
        """counts: [E, R] tokens of one micro-batch summed over ranks: record, then maybe act."""
        self.received[i] += counts
        per_expert = counts.sum(axis=1)
        self.last[i] = per_expert
        self.recent[i].append(per_expert)
        ratio = max_over_mean(per_expert)
        self.history[i].append(ratio)
        if ratio > self.threshold:
            mean = per_expert.sum() / per_expert.shape[0]
            self.bias[i] += np.float32(self.gamma) * np.sign(mean - per_expert).astype(np.float32)
            self.updates[i] += 1

    def _log_call(self, layer: int, steps: int, updates: int) -> None:
        i = layer - self.first
        acted = int(self.updates[i]) - updates
        if self.log is None or not acted:
            return
        seen = self.history[i][steps:]
        self.log(f"balance: block {layer}: max/mean {seen[0]:.2f} -> {seen[-1]:.2f} over "
                 f"{len(seen)} micro-batch(es), {acted} bias update(s), bias in "
                 f"[{self.bias[i].min():+.4f}, {self.bias[i].max():+.4f}]")

    def report(self) -> dict:
        """Per MoE block: max/mean expert load of the first micro-batch (routed with zero bias:
        the model's own routing) and of the last REPORT_WINDOW micro-batches together."""
        blocks = [{"block": i + self.first, "before": h[0], "after": max_over_mean(sum(self.recent[i])),
                   "micro_batches": len(h), "updates": int(self.updates[i])}
                  for i, h in enumerate(self.history) if h]
        return {"threshold": self.threshold, "gamma": self.gamma, "window": REPORT_WINDOW, "blocks": blocks}


__all__ = ["Balancer", "waterfill", "choose_replicas", "with_bias", "max_over_mean"]
