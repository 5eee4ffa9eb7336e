"""Synthetic routing traces with skew, co-activation clusters and drift (``moe-hpc make-trace``).

The generative model, per MoE layer (independent draws per layer, all from one seed):

- popularity: expert logits ``-zipf * log(rank)`` over a random ranking of the experts, so
  expert loads follow a Zipf law; every later time window adds ``drift * N(0, 1)`` to each
  logit (a random walk: hot experts cool down, others heat up);
- clusters: the experts are split at random into ``clusters`` equal groups (topics); a topic
  is as popular as its experts together, and a token of topic c picks each of its k distinct
  experts inside c with probability ``cluster_share`` (by popularity), else outside c — which
  makes experts of one cluster co-activated;
- sources: source ranks own contiguous runs of sequences, and sorted data puts one topic on
  neighbouring ranks: source i of S prefers topic ``i * clusters // S`` with weight
  ``affinity`` (the rest follows topic popularity).

Counts are of real sampled tokens, so ``coactivation`` agrees with ``source_expert``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config.cluster import load_cluster
from ..config.errors import ConfigError
from ..config.roles import dense_gpus, role_layout
from ..config.run_config import Config, ModelConfig, config_files
from ..files.atomic import check_output
from ..placement.traces import Trace, pair_counts, write_trace


@dataclass(frozen=True)
class TraceShape:
    """The knobs of the generator (see the module docstring)."""
    tokens_per_source: int = 512
    zipf: float = 0.8
    clusters: int = 8
    cluster_share: float = 0.7
    affinity: float = 0.3
    drift: float = 0.2
    windows: int = 4


def check_shape(shape: TraceShape, num_experts: int) -> None:
    """Raise ConfigError naming the first bad knob."""
    checks = [("tokens_per_source", shape.tokens_per_source >= shape.windows, ">= windows"),
              ("zipf", shape.zipf >= 0, ">= 0"),
              ("clusters", 1 <= shape.clusters <= num_experts and num_experts % shape.clusters == 0,
               f"in [1, {num_experts}] and divide num_experts"),
              ("cluster_share", 0 <= shape.cluster_share <= 1, "in [0, 1]"),
              ("affinity", 0 <= shape.affinity <= 1, "in [0, 1]"),
              ("drift", shape.drift >= 0, ">= 0"),
              ("windows", shape.windows >= 1, ">= 1")]
    for name, ok, why in checks:
        if not ok:
            raise ConfigError(f"make-trace: --{name.replace('_', '-')} must be {why}, "
                              f"got {getattr(shape, name)}")


def sample_distinct(rng, p: np.ndarray, n: int, k: int) -> np.ndarray:
    """n draws of k distinct indices from distribution p [E] (successive sampling) -> [n, k]."""
    cdf = np.cumsum(p)
    cdf /= cdf[-1]
    draw = lambda size: np.minimum(np.searchsorted(cdf, rng.random(size), side="right"), len(p) - 1)
    out = np.empty((n, k), np.int64)
    for j in range(k):
        out[:, j] = draw(n)
        clash = (out[:, :j] == out[:, j:j + 1]).any(axis=1)
        while clash.any():                       # redraw only the rows that repeated an expert
            out[clash, j] = draw(int(clash.sum()))
            clash = (out[:, :j] == out[:, j:j + 1]).any(axis=1)
    return out


def topic_choice(popularity: np.ndarray, cluster_of: np.ndarray, share: float) -> np.ndarray:
    """popularity [E], cluster_of [E] -> [C, E]: each topic's expert distribution, ``share``
    inside its cluster (by popularity) and the rest outside it."""
    C = int(cluster_of.max()) + 1
    inside = cluster_of[None, :] == np.arange(C)[:, None]
    p_in = np.where(inside, popularity, 0.0)
    p_out = np.where(inside, 0.0, popularity)
    p_in /= p_in.sum(axis=1, keepdims=True)
    if C == 1:
        return p_in
    p_out /= p_out.sum(axis=1, keepdims=True)
    return share * p_in + (1 - share) * p_out


def source_topics(num_sources: int, topic_popularity: np.ndarray, affinity: float) -> np.ndarray:
    """-> [S, C] topic distribution of each source: neighbouring sources share a topic."""
    C = topic_popularity.shape[0]
    preferred = np.arange(num_sources) * C // num_sources
    return (1 - affinity) * topic_popularity[None, :] + affinity * np.eye(C)[preferred]


def layer_counts(rng, logits: np.ndarray, cluster_of: np.ndarray, tokens: np.ndarray, k: int,
                 shape: TraceShape):
    """One layer, one window. logits [E]; tokens [S] per source ->
    (source_expert [S, E], coactivation [E, E], expert_tokens [E])."""
    E, S = logits.shape[0], tokens.shape[0]
    popularity = np.exp(logits - logits.max())
    popularity /= popularity.sum()
    C = int(cluster_of.max()) + 1
    topic_pop = np.bincount(cluster_of, weights=popularity, minlength=C)
    per_topic = rng.multinomial(tokens, source_topics(S, topic_pop, shape.affinity))   # [S, C]
    choice = topic_choice(popularity, cluster_of, shape.cluster_share)
    source_expert = np.zeros((S, E), np.int64)
    coact = np.zeros((E, E), np.int64)
    for c in range(C):
        n = int(per_topic[:, c].sum())
        if n == 0:
            continue
        picks = sample_distinct(rng, choice[c], n, k)
        src = np.repeat(np.arange(S), per_topic[:, c])
        source_expert += np.bincount((src[:, None] * E + picks).reshape(-1),
                                     minlength=S * E).reshape(S, E)
        coact += pair_counts(picks, E)
    return source_expert, coact, source_expert.sum(axis=0)


def synthetic_trace(model: ModelConfig, world_size: int, source_ranks, shape: TraceShape,
                    seed: int = 0) -> Trace:
    """A seeded synthetic Trace for ``model`` with the given source (dense) ranks."""
    check_shape(shape, model.num_experts)
    rng = np.random.default_rng(seed)
    M, E, k, W = model.num_moe_layers, model.num_experts, model.top_k, shape.windows
    sources = np.asarray(source_ranks, np.int64)
    S = sources.shape[0]
    per_window = np.full(W, shape.tokens_per_source // W)
    per_window[: shape.tokens_per_source % W] += 1
    source_expert = np.zeros((M, S, E), np.int64)
    coact = np.zeros((M, E, E), np.int64)
    windows = np.zeros((W, M, E), np.int64)
    for m in range(M):
        logits = -shape.zipf * np.log1p(rng.permutation(E).astype(np.float64))
        cluster_of = rng.permutation(E) % shape.clusters
        for w in range(W):
            if w:
                logits = logits + shape.drift * rng.standard_normal(E)
            se, co, et = layer_counts(rng, logits, cluster_of, np.full(S, per_window[w]), k, shape)
            source_expert[m] += se
            coact[m] += co
            windows[w, m] = et
    return Trace(model, world_size, sources, source_expert, coact, windows)


def make_trace_file(cfg: Config, cluster_path, output, shape: TraceShape, seed: int, overwrite: bool) -> None:
    """``moe-hpc make-trace``: a synthetic trace whose sources are the layout's dense ranks."""
    check_output(output, overwrite, (*config_files(cfg), cluster_path))
    cluster = load_cluster(cluster_path)
    roles = role_layout(cluster.num_gpus, dense_gpus(cluster, cfg.parallel.dense_ranks))
    write_trace(output, synthetic_trace(cfg.model, cluster.num_gpus, roles.dense_ranks, shape, seed))


__all__ = ["TraceShape", "synthetic_trace", "sample_distinct", "topic_choice", "source_topics",
           "check_shape", "make_trace_file"]
