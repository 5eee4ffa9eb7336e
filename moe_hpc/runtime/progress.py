"""What a person sees of a run: live chunk progress on rank 0, and the JSON summary at the end.

Progress goes to stderr: a bar redrawn in place on a terminal, plain lines elsewhere (a Slurm
log), at most one per ``every`` seconds plus the first and the last chunk.  Rank 0 knows every
chunk's token count up front (from the input's ``/lengths``), so it reports tokens, tokens/s
and ETA without asking the other ranks anything.
"""
from __future__ import annotations

import sys
import time

import numpy as np

# The phases the engine and runner time on each rank (engine.PhaseTimes), in a token's order.
PHASES = ("attention", "dense_mlp", "gating", "exchange", "experts", "final_norm", "logprobs", "io")


def hms(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class ProgressLog:
    """Rank 0's view of the chunk loop.

    chunk_tokens: [chunks] valid tokens of chunk c summed over the dense ranks; ``first`` is the
    first chunk this run computes (later than 0 when resuming). ``mode``: "bar", "lines", "off"
    or "auto" (a bar when ``stream`` is a terminal).
    """

    def __init__(self, chunk_tokens, first: int, mode: str = "auto", every: float = 10.0,
                 stream=None, clock=time.monotonic, unit: str = "tokens"):
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "lines"
        self.mode, self.every, self.clock, self.unit = mode, every, clock, unit
        self.chunk_tokens = [int(t) for t in chunk_tokens]
        self.done = self.start_done = sum(self.chunk_tokens[:first])
        self.total = sum(self.chunk_tokens)
        self.t0, self.last = clock(), -float("inf")
        self.drawn = 0                # length of the bar on screen: a shorter one must cover it

    def chunk_done(self, chunk: int, tokens: int | None = None) -> None:
        """``tokens``: what the chunk did, when its count up front was a bound (generation)."""
        self.done += self.chunk_tokens[chunk] if tokens is None else tokens
        now = self.clock()
        final = chunk + 1 == len(self.chunk_tokens)
        if self.mode == "off" or (now - self.last < self.every and not final and self.mode == "lines"):
            return
        self.last = now
        if self.mode == "bar":
            text = self.bar(chunk, now)
            self.stream.write("\r" + text.ljust(self.drawn) + ("\n" if final else ""))
            self.drawn = len(text)
        else:
            self.stream.write(self.line(chunk, now) + "\n")
        self.stream.flush()

    def _rate_eta(self, now: float) -> tuple[float, float]:
        elapsed = max(now - self.t0, 1e-9)
        rate = (self.done - self.start_done) / elapsed
        return rate, (self.total - self.done) / rate if rate > 0 else float("inf")

    def line(self, chunk: int, now: float) -> str:
        rate, eta = self._rate_eta(now)
        n = len(self.chunk_tokens)
        return (f"progress: chunk {chunk + 1}/{n} ({100 * self.done / max(self.total, 1):.1f}%), "
                f"{self.done}/{self.total} {self.unit}, {rate:.0f} {self.unit}/s, "
                f"elapsed {hms(now - self.t0)}, ETA {hms(eta)}")

    def bar(self, chunk: int, now: float, width: int = 30) -> str:
        rate, eta = self._rate_eta(now)
        frac = self.done / max(self.total, 1)
        filled = int(round(frac * width))
        return (f"[{'#' * filled}{'.' * (width - filled)}] {100 * frac:5.1f}% "
                f"chunk {chunk + 1}/{len(self.chunk_tokens)} {rate:.0f} tok/s ETA {hms(eta)}")


def phase_summary(per_rank: list[dict]) -> dict:
    """[ranks] of {phase: seconds} -> {phase: {"mean", "max", "ranks"}} over the ranks that ran it."""
    out = {}
    for phase in PHASES + tuple(sorted({p for t in per_rank for p in t} - set(PHASES))):
        values = [t[phase] for t in per_rank if t.get(phase, 0.0) > 0.0]
        if values:
            out[phase] = {"mean": round(float(np.mean(values)), 6), "max": round(max(values), 6),
                          "ranks": len(values)}
    return out


def expert_load(expert_tokens: np.ndarray) -> dict:
    """expert_tokens: [moe_layers, experts] int64 -> how evenly tokens spread over experts.

    max_over_mean is the busiest expert's load over the layer's mean (1.0 = perfectly even).
    """
    stats = np.asarray(expert_tokens, dtype=np.float64)
    mean = stats.mean(axis=1)
    ratio = np.where(mean > 0, stats.max(axis=1) / np.maximum(mean, 1e-300), 1.0)
    layer, expert = np.unravel_index(int(np.argmax(stats)), stats.shape)
    return {"tokens_routed": int(stats.sum()),
            "max_over_mean": round(float(ratio.max()), 4) if ratio.size else 1.0,
            "per_layer_max_over_mean": [round(float(r), 4) for r in ratio],
            "hottest": {"moe_layer": int(layer), "expert": int(expert), "tokens": int(stats[layer, expert])}}


__all__ = ["ProgressLog", "phase_summary", "expert_load", "hms", "PHASES"]
