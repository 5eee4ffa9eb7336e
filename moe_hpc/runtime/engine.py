"""One rank's share of the model and its forward pass over a chunk of sequences.

Blocks run in order for each wave of sequences. With ``run.pipeline_waves = p > 1`` a chunk's
sequences are cut into p waves that enter the stack one step apart: at step s wave w is at
block s - w, so one MoE exchange step (``moe/layer.py``) carries tokens of up to p blocks and, with
the per-layer-disjoint placement, up to p blocks' expert ranks compute at once instead of one.
The engine only composes: its blocks, MoE layer and stage links are made by ``assemble.py``.
Generation (``generate.py``) runs the same schedule through ``forward_cached`` with one wave:
the attention blocks fill and read their KV caches, and the last stage returns the next-token
logits.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from ..device.dtypes import BF16
from ..device.kernels import add_rows


@dataclass
class PhaseTimes:
    """Wall seconds per phase on this rank: attention, dense_mlp, gating, exchange, experts,
    final_norm, logprobs (timed by the engine and its MoE layer) and io (timed by the runner); the summary gives mean and max over ranks.
    On the GPU these are host times of asynchronous work: a phase absorbs waits for earlier ones,
    unless ``sync`` (the device's synchronise, set by the bench for one profiled call) makes each
    phase wait for its own work: then they are GPU times, at the cost of the overlap."""
    seconds: dict = field(default_factory=lambda: defaultdict(float))
    sync: object = None
    chunk_ends: list = field(default_factory=list)   # perf_counter at each chunk's end (the runner's)

    def profiled(self, fn, sync) -> dict:
        """Run ``fn`` once with every phase waiting for its own work (``sync``, the device's
        synchronise) -> seconds per phase of that call alone; the run's totals are kept."""
        saved, self.seconds, self.sync = self.seconds, defaultdict(float), sync
        try:
            fn()
            return dict(self.seconds)
        finally:
            self.seconds, self.sync = saved, None

    def add(self, phase: str, t0: float) -> float:
        if self.sync is not None:
            self.sync()
        now = time.perf_counter()
        self.seconds[phase] += now - t0
        return now


class Engine:
    """One rank's share of the model: its stage's blocks (attention blocks, dense MLP blocks, the
    MoE layer that joins dense and expert ranks), the embedding and output head of the first and
    last stage, and the links between stages; ``forward_chunk`` runs the wavefront over them."""

    def __init__(self, cfg, topo, backend, placement, wiring, *, attention, mlps, moe, embedding, head, link,
                 blocks: range, times: PhaseTimes):
        self.cfg, self.topo, self.backend, self.xp, self.placement = cfg, topo, backend, backend.xp, placement
        self.wiring, self.attention, self.mlps, self.moe = wiring, attention, mlps, moe
        self.embedding, self.head, self.link, self.blocks, self.times = embedding, head, link, blocks, times
        self.graphs = None                   # decode_graph.DecodeGraphs once a cache opens where they may run
        stage = topo.stage if topo.is_dense else 0
        self.first_stage, self.last_stage = stage == 0, stage == topo.roles.dense_stages - 1

    def waves(self, num_sequences: int) -> list[tuple[int, int]]:
        """Sequence ranges of the pipeline's waves (some may be empty)."""
        p = self.cfg.run.pipeline_waves
        return [(w * num_sequences // p, (w + 1) * num_sequences // p) for w in range(p)]

    def schedule(self):
        """Steps of the wavefront: for each step, the (wave, block) pairs active in it. The
        same on every rank, so all ranks agree on which steps exchange tokens."""
        p, L = self.cfg.run.pipeline_waves, self.cfg.model.num_layers
        return [[(w, s - w) for w in range(p) if 0 <= s - w < L] for s in range(L + p - 1)]

    def forward_chunk(self, inputs, lengths: np.ndarray, first_seq: int, seq_len: int | None = None):
        """inputs: [s, L, H] bf16 hidden or [s, L] int tokens (the first stage; None on later
        stages, whose activations arrive from the stage before: ``seq_len`` gives L then) ->
        (hidden [s, L, H] bf16 with padding zeroed, logits [s, L, V] bf16 or None) on the last
        stage, (None, None) on the others. Dense ranks only."""
        x = self._stream(inputs, len(lengths), seq_len)
        s, L, _ = x.shape
        valid = np.arange(L)[None, :] < lengths[:, None]
        self._run(x, valid, (first_seq + np.arange(s))[:, None] * L + np.arange(L)[None, :])
        return self._final(x, valid) if self.last_stage else (None, None)

    def open_cache(self, sequences: int, positions: int) -> int:
        """Every attention block's KV cache for a group of sequences (generation) -> its bytes.
        Captured decode graphs hold the old cache's addresses: they go."""
        if self.graphs is not None:
            self.graphs.clear()
        elif self.can_capture_decode:
            from .decode_graph import DecodeGraphs
            self.graphs = DecodeGraphs(self, self.xp)
        return sum(block.allocate(sequences, positions).nbytes for block in self.attention.values())

    @property
    def can_capture_decode(self) -> bool:
        """Whether decode steps may replay CUDA graphs (``run.cuda_graphs``): one GPU rank with
        every block, MHA/GQA attention, experts that run at fixed shapes."""
        cfg, m = self.cfg, self.cfg.model
        return (cfg.run.cuda_graphs and self.xp is not np and self.topo.size == 1 and self.first_stage
                and self.last_stage and self.link is None and cfg.run.pipeline_waves == 1 and not m.mla
                and (m.num_moe_layers == 0 or self.moe.fixed_shape_ok))

    def fixed_shape_decode(self, tokens, at):
        """One decode step of B sequences whose inputs already live on the device (tokens [B],
        ``at``'s rows and positions [B]) -> fp32 logits [B, V] on the device. Nothing in it
        reads the device from the host, and every shape follows from B: a CUDA graph captures
        it (``decode_graph``). One rank with every block (``can_capture_decode``)."""
        m = self.cfg.model
        x = self.embedding(tokens[:, None])                       # [B, 1, H]
        stream = x.reshape(-1, m.hidden_size)
        every = self.xp.arange(stream.shape[0])
        for layer in self.blocks:
            h = self.attention[layer](x, every, at)
            add_rows(stream, every, self.moe.fixed_shape_step(layer, h) if m.is_moe(layer) else self.mlps[layer](h))
        return self.head.logits_of(stream)

    def forward_cached(self, tokens: np.ndarray, lengths: np.ndarray, at, token_ids: np.ndarray):
        """Generation's pass (one wave): tokens [s, L] host ints of sequences at cache rows
        ``at.rows`` from positions ``at.start`` (a prefill: the prompts, L their longest; a decode
        step: L = 1; read by the first stage only, later ones receive the stream), lengths [s]
        valid positions, token_ids [s, L] global ids (the replicas' choice) -> on the last stage
        fp32 logits [s, V] on the host at each one's last valid position, None on the others."""
        if self.graphs is not None and tokens.shape[1] == 1 and self.times.sync is None:
            t0 = time.perf_counter()
            logits = self.graphs.step(tokens[:, 0], at.rows, at.start)
            if logits is not None:
                self.times.add("decode_graph", t0)
                return logits
        x = self._stream(tokens if self.first_stage else None, len(lengths), token_ids.shape[1])
        valid = np.arange(x.shape[1])[None, :] < lengths[:, None]
        self._run(x, valid, token_ids, at)
        return self.head.last_logits(x, lengths - 1) if self.last_stage else None

    def _stream(self, inputs, s: int, seq_len: int | None):
        """The residual stream [s, L, H] bf16: embedded tokens, the hidden inputs, or zeros to be
        filled by the stage before."""
        if inputs is None:
            return self.xp.zeros((s, seq_len, self.cfg.model.hidden_size), BF16)
        return self.embedding(inputs) if inputs.ndim == 2 else self.xp.asarray(inputs)

    def _run(self, x, valid: np.ndarray, token_ids: np.ndarray, at=None) -> None:
        """Every step of the schedule over x (in place)."""
        xp = self.xp
        waves = [(a, b, xp.asarray(np.flatnonzero(valid[a:b])), xp.asarray(token_ids[a:b][valid[a:b]]))
                 for a, b in self.waves(x.shape[0])]
        for step in self.schedule():
            self._step(x, step, waves, at)
        if self.link is not None:
            self.link.wait_sends()

    def _step(self, x, step, waves, at=None) -> None:
        """One wavefront step: each active wave through its block here; the MoE blocks of the
        step (another stage's join with no tokens) in one exchange; waves leaving move on."""
        m, parts, owners = self.cfg.model, [], []
        for w, layer in step:
            a, b, rows, ids = waves[w]
            if layer not in self.blocks:                  # another stage's block: join its exchange
                if m.is_moe(layer):
                    parts.append((layer, self.moe.empty_rows(), ids[:0]))
                    owners.append(None)
                continue
            if layer == self.blocks.start and not self.first_stage:
                self.link.receive(x, a, b)
            h = self._attend(x, a, b, rows, layer, at)
            if m.is_moe(layer):
                parts.append((layer, h, ids))
                owners.append(w)
            elif b > a:
                t0 = time.perf_counter()
                self._residual(x, waves[w], self.mlps[layer](h))
                self.times.add("dense_mlp", t0)
        outputs = self.moe(parts) if parts else []
        for w, f in zip(owners, outputs):
            if w is not None:
                self._residual(x, waves[w], f)
        for w, layer in step:                             # waves leaving this stage
            if layer == self.blocks.stop - 1 and not self.last_stage:
                self.link.send(x, *waves[w][:2])

    def _attend(self, x, a: int, b: int, rows, layer: int, at=None):
        """Block ``layer``'s attention for sequences [a, b) (at: the KV cache's place, generation
        with one wave) -> their normed MLP input [T_w, H]."""
        if b == a:
            return self.moe.empty_rows()
        t0 = time.perf_counter()
        h = self.attention[layer](x[a:b], rows, at)
        self.times.add("attention", t0)
        return h

    def _residual(self, x, wave, f) -> None:
        """x at the wave's valid positions += f."""
        a, b, rows, _ = wave
        if b > a:
            add_rows(x[a:b].reshape(-1, self.cfg.model.hidden_size), rows, f)

    def _final(self, x, valid: np.ndarray):
        t0 = time.perf_counter()
        out = self.head(x, valid, self.cfg.run.logits)
        self.times.add("final_norm", t0)
        return out

    def next_token_logprobs(self, out, tokens: np.ndarray, lengths: np.ndarray):
        """[s, L] float32 host log-probs of each next token (``OutputHead.logprobs``)."""
        t0 = time.perf_counter()
        result = self.head.logprobs(out, tokens, lengths)
        self.times.add("logprobs", t0)
        return result

    def serve_chunk(self) -> None:
        """An expert-only rank's part of one chunk: every exchange step, no tokens of its own."""
        for step in self.schedule():
            layers = [layer for _, layer in step if self.cfg.model.is_moe(layer)]
            if layers:
                self.moe.serve(layers)

    def close(self) -> None:
        self.graphs = None
        self.wiring.exchange.close()
        for group in (self.wiring.tp_group, self.wiring.dense_group):
            if group is not None:
                group.close()


__all__ = ["Engine", "PhaseTimes"]
