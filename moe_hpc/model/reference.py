"""The float64 reference: SPEC's formulas, read literally, on one process.

It is the oracle for every parallel layout, so it shares no code with the engine: no bf16, no
blocking, no exchange.  It also reports each token's top-k margin, which the acceptance rule
(``compare``) needs to tell tokens near a routing tie from the rest.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import h5py
import numpy as np

from ..config.run_config import MLA_NORM_EPS, ModelConfig, model_from_json

TIE_MARGIN = 0.02


def _f64(dset) -> np.ndarray:
    raw = np.asarray(dset[()])
    tag = dset.attrs.get("dtype")
    tag = tag.decode() if isinstance(tag, bytes) else tag
    if raw.dtype == np.uint16 and tag == "bfloat16":
        return (raw.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return raw.astype(np.float64)


def _rmsnorm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _act(h, kind):
    if kind == "gelu":
        erf = np.vectorize(math.erf)
        return 0.5 * h * (1.0 + erf(h / math.sqrt(2.0)))
    if kind == "gelu_tanh":
        return 0.5 * h * (1.0 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
    return h / (1.0 + np.exp(-h))


def _rope(x, theta, f=None):
    """x: [L, heads, D]; f: inverse frequencies [D/2] (default theta^(-2i/D))."""
    L, _, D = x.shape
    half = D // 2
    f = theta ** (-2.0 * np.arange(half) / D) if f is None else f
    ang = np.arange(L)[:, None] * f[None, :]
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    return np.concatenate([x[..., :half] * c - x[..., half:] * s,
                           x[..., half:] * c + x[..., :half] * s], axis=-1)


def _projections(a, g, m: ModelConfig):
    """q [L, nh, D], k, v [L, kv, D]: biases if present, then the q/k norms of ``m.qk_norm``."""
    L = a.shape[0]
    q, k, v = (a @ g[w] + _opt(g, b, g[w].shape[1]) for w, b in (("wq", "bq"), ("wk", "bk"), ("wv", "bv")))
    if m.qk_norm == "full":
        q, k = _rmsnorm(q, g["q_norm"], m.norm_eps), _rmsnorm(k, g["k_norm"], m.norm_eps)
    q, k, v = (t.reshape(L, -1, m.head_dim) for t in (q, k, v))
    if m.qk_norm == "head":
        q, k = _rmsnorm(q, g["q_norm"], m.norm_eps), _rmsnorm(k, g["k_norm"], m.norm_eps)
    return q, k, v


def _yarn_mscale(factor, mscale=1.0):
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _mla_rope(m: ModelConfig):
    """-> (inverse frequencies [rope/2], cos/sin scale, softmax scale) of MLA's (YaRN) RoPE."""
    R, theta, f = m.qk_rope_head_dim, m.rope_theta, m.rope_factor
    inv = 1.0 / theta ** (np.arange(0, R, 2) / R)
    if m.rope_scaling != "yarn":
        return inv, 1.0, 1.0 / math.sqrt(m.head_dim)
    turns = lambda r: R * math.log(m.rope_original_max_positions / (r * 2 * math.pi)) / (2 * math.log(theta))
    lo, hi = max(math.floor(turns(m.rope_beta_fast)), 0), min(math.ceil(turns(m.rope_beta_slow)), R - 1)
    interpolate = np.clip((np.arange(R // 2) - lo) / ((hi - lo) or 0.001), 0, 1)
    inv = inv / f * interpolate + inv * (1 - interpolate)
    cs = m.rope_attention_factor or (_yarn_mscale(f, m.rope_mscale) / _yarn_mscale(f, m.rope_mscale_all_dim)
                                     if m.rope_mscale and m.rope_mscale_all_dim else _yarn_mscale(f))
    scale = _yarn_mscale(f, m.rope_mscale_all_dim) ** 2 if m.rope_mscale_all_dim else 1.0
    return inv, cs, scale / math.sqrt(m.head_dim)


def _mla_projections(a, g, m: ModelConfig):
    """MLA: q [L, nh, D] and k [L, nh, D] as [nope | rope] with RoPE applied, v [L, nh, Dv]."""
    L, nh, D, R, Rkv = a.shape[0], m.num_heads, m.head_dim, m.qk_rope_head_dim, m.kv_lora_rank
    q = _rmsnorm(a @ g["wq_a"], g["q_a_norm"], MLA_NORM_EPS) @ g["wq_b"] if m.q_lora_rank else a @ g["wq"]
    q = q.reshape(L, nh, D)
    latent = a @ g["wkv_a"]
    kv = (_rmsnorm(latent[:, :Rkv], g["kv_a_norm"], MLA_NORM_EPS) @ g["wkv_b"]).reshape(L, nh, -1)
    inv, cs, _ = _mla_rope(m)
    q_rope = _rope(q[..., D - R:], 0, inv) * cs
    k_rope = np.broadcast_to(_rope(latent[:, None, Rkv:], 0, inv) * cs, (L, nh, R))
    return (np.concatenate([q[..., :D - R], q_rope], -1), np.concatenate([kv[..., :D - R], k_rope], -1),
            kv[..., D - R:])


def _attention(a, g, m: ModelConfig):
    L = a.shape[0]
    nh, nkv, D = m.num_heads, m.kv_heads, m.head_dim
    if m.mla:
        q, k, v = _mla_projections(a, g, m)
        scale = _mla_rope(m)[2]
    else:
        q, k, v = _projections(a, g, m)
        q, k = _rope(q, m.rope_theta), _rope(k, m.rope_theta)
        scale = 1 / math.sqrt(D)
    mask = np.triu(np.full((L, L), -np.inf), 1)
    heads = []
    for h in range(nh):
        kv = h // (nh // nkv)
        s = q[:, h] @ k[:, kv].T * scale + mask
        p = np.exp(s - s.max(-1, keepdims=True))
        heads.append((p / p.sum(-1, keepdims=True)) @ v[:, kv])
    return np.concatenate(heads, axis=-1) @ g["wo"]


def _opt(g, name, like):
    return g[name] if name in g else np.zeros(like)


@dataclass
class Reference:
    """hidden: [S, L, H] float64 (padding 0); margin: [S, L] smallest top-k margin over MoE
    layers, (p_k - p_k+1) / p_k, inf where there is no MoE layer or the position is padding;
    logits: [S, L, V] or None."""
    hidden: np.ndarray
    margin: np.ndarray
    logits: np.ndarray | None = None


@dataclass
class _Model:
    """A checkpoint read into float64: its config, per-block weight dicts, final norm, embed, LM head."""
    m: ModelConfig
    layers: list
    final_norm: np.ndarray
    embed: np.ndarray | None
    lm_head: np.ndarray | None


def _read_model(wf, where: str, with_head: bool) -> _Model:
    m = model_from_json(wf.attrs["config"], where)
    layers = [{k: _f64(v) for k, v in _flatten(wf[f"layers/{l}"]).items()} for l in range(m.num_layers)]
    embed = _f64(wf["embed"]) if "embed" in wf else None
    lm_head = None if not with_head else embed.T if m.tie_embeddings else _f64(wf["lm_head"])
    return _Model(m, layers, _f64(wf["final_norm"]), embed, lm_head)


def _forward(x, model: _Model):
    """x: [n, H] one sequence's inputs -> (out [n, H] after the final norm, margin [n])."""
    m, margin = model.m, np.full(x.shape[0], np.inf)
    for l, g in enumerate(model.layers):
        x = x + _attention(_rmsnorm(x, g["attn_norm"], m.norm_eps), g, m)
        h = _rmsnorm(x, g["mlp_norm"], m.norm_eps)
        if m.is_moe(l):
            f, mg = _moe(h, g, m)
            margin = np.minimum(margin, mg)
        else:
            f = _ffn(h, g, "", m)
        x = x + f
    return _rmsnorm(x, model.final_norm, m.norm_eps), margin


def reference_forward(weights_path, input_path, with_logits: bool = False) -> Reference:
    """Run the float64 reference over the whole input file."""
    with h5py.File(weights_path, "r") as wf, h5py.File(input_path, "r") as inf:
        model = _read_model(wf, str(weights_path), with_logits)
        x_all = _f64(inf["hidden"]) if "hidden" in inf else model.embed[np.asarray(inf["tokens"][()])]
        S, L = x_all.shape[:2]
        lengths = np.asarray(inf["lengths"][()]) if "lengths" in inf else np.full(S, L)
    hidden = np.zeros_like(x_all)
    margin = np.full((S, L), np.inf)
    logits = None if model.lm_head is None else np.zeros((S, L, model.lm_head.shape[1]))
    for s in range(S):
        n = int(lengths[s])
        if n == 0:
            continue
        hidden[s, :n], margin[s, :n] = _forward(x_all[s, :n], model)
        if logits is not None:
            logits[s, :n] = hidden[s, :n] @ model.lm_head
    return Reference(hidden, margin, logits)


@dataclass
class Generated:
    """One sequence's reference continuation: tokens [n] int32, logprobs [n] float64, gaps [n]
    (top-1 minus top-2 float64 logit at each step: below ~1e-2 bf16 may pick the other token),
    margins [n] (the routing margin, as ``Reference.margin``, of the position whose logits pick
    the step's token: below TIE_MARGIN bf16 may route it to another expert), finish reason (0
    end-of-sequence, 1 max_new_tokens, 2 max positions)."""
    tokens: np.ndarray
    logprobs: np.ndarray
    gaps: np.ndarray
    margins: np.ndarray
    finish_reason: int

    def clear_steps(self, gap: float = 1e-2) -> int:
        """Steps before the first one near a tie (logit gap under ``gap`` or routing margin under
        TIE_MARGIN): up to there a bf16 engine must pick the very same tokens."""
        near = np.flatnonzero((self.gaps < gap) | (self.margins < TIE_MARGIN))
        return int(near[0]) if near.size else len(self.tokens)


def reference_generate(weights_path, prompts, max_new_tokens: int, eos=(), params=None,
                       first_seq: int = 0) -> list[Generated]:
    """Greedy (or ``params``'s) continuations of each prompt (a list of int arrays), recomputing
    the whole prompt + tokens so far at every step: no cache, SPEC's "Generation" read literally.
    Sequence s draws as global sequence ``first_seq + s``."""
    from .sampling import SamplingParams, pick_tokens
    params = params or SamplingParams()
    with h5py.File(weights_path, "r") as wf:
        model = _read_model(wf, str(weights_path), with_head=True)
    limit = model.m.max_position_embeddings or np.inf
    result = []
    for s, prompt in enumerate(prompts):
        seq, toks, lps, gaps, margins, reason = [int(t) for t in prompt], [], [], [], [], 1
        for i in range(max_new_tokens):
            out, margin = _forward(model.embed[np.asarray(seq)], model)
            logits = out[-1] @ model.lm_head
            margins.append(margin[-1])
            top2 = np.sort(logits)[-2:]
            tok, _ = pick_tokens(logits[None].astype(np.float32), np.array([first_seq + s]), np.array([i]), params)
            tok = int(tok[0])
            lz = logits.max() + np.log(np.exp(logits - logits.max()).sum())
            seq.append(tok), toks.append(tok), lps.append(logits[tok] - lz), gaps.append(top2[1] - top2[0])
            if tok in eos:
                reason = 0
                break
            if len(seq) >= limit and i + 1 < max_new_tokens:
                reason = 2
                break
        result.append(Generated(np.array(toks, np.int32), np.array(lps), np.array(gaps), np.array(margins), reason))
    return result


def _ffn(h, g, prefix: str, m: ModelConfig, e=None):
    """One MLP of the block, ``prefix`` "" (dense), "experts/" (expert e) or "shared/":
    plain act(h w1 + b1) w2 + b2, or gated (act(h w1) * (h w3)) w2."""
    w = {n: g[prefix + n] if e is None else g[prefix + n][e] for n in ("w1", "w2", "w3", "b1", "b2")
         if prefix + n in g}
    if m.mlp == "gated":
        return (_act(h @ w["w1"], m.activation) * (h @ w["w3"])) @ w["w2"]
    return _act(h @ w["w1"] + w.get("b1", 0.0), m.activation) @ w["w2"] + w.get("b2", 0.0)


def _shared(h, g, m: ModelConfig):
    """The shared expert, scaled by sigmoid(h . shared_gate) when the model has that gate."""
    if not m.shared_expert_ffn_hidden_size:
        return 0.0
    scale = 1.0 / (1.0 + np.exp(-(h @ g["shared_gate"])))[:, None] if m.shared_expert_gate else 1.0
    return scale * _ffn(h, g, "shared/", m)


def _group_limited(score, m: ModelConfig):
    """Only the experts of the ``topk_groups`` groups with the highest top-2 score sums stay
    choosable; the others' scores become -inf."""
    T, E = score.shape
    G = m.expert_groups
    grouped = score.reshape(T, G, E // G)
    best2 = np.sort(grouped, axis=-1)[..., -min(2, E // G):].sum(-1)
    kept = np.argsort(-best2, axis=-1, kind="stable")[:, :m.topk_groups]
    keep = np.zeros((T, G), bool)
    np.put_along_axis(keep, kept, True, -1)
    return np.where(keep[:, :, None], grouped, -np.inf).reshape(T, E)


def _moe(h, g, m: ModelConfig):
    z = h @ g["gate"]
    if m.gate_score == "sigmoid":
        p = 1.0 / (1.0 + np.exp(-z))
    else:
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
    score = p + g.get("gate_bias", 0.0)
    if m.expert_groups > 1:
        score = _group_limited(score, m)
    order = np.argsort(-score, axis=-1, kind="stable")
    chosen = order[:, :m.top_k]
    w = np.take_along_axis(p, chosen, -1)
    if m.normalize_topk:
        w = w / w.sum(-1, keepdims=True)
    w = w * m.routed_scaling_factor
    # margin on the selection scores: how close the k-th pick came to losing to the next one
    sk = np.take_along_axis(score, order[:, m.top_k - 1:m.top_k], -1)[:, 0]
    nxt = (np.take_along_axis(score, order[:, m.top_k:m.top_k + 1], -1)[:, 0]
           if m.top_k < m.num_experts else np.zeros_like(sk))
    with np.errstate(invalid="ignore"):       # a group limit may leave -inf as the next score
        margin = np.where(m.top_k < m.num_experts, (sk - nxt) / sk, np.inf)
    f = np.zeros_like(h)
    for j in range(m.top_k):
        for e in np.unique(chosen[:, j]):
            rows = chosen[:, j] == e
            f[rows] += w[rows, j:j + 1] * _ffn(h[rows], g, "experts/", m, e)
    return f + _shared(h, g, m), margin


def _flatten(group, prefix=""):
    out = {}
    for key, item in group.items():
        if isinstance(item, h5py.Group):
            out.update(_flatten(item, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = item
    return out


@dataclass
class Agreement:
    median: float            # median per-token relative error over valid tokens
    clear_worst: float       # worst error among tokens clear of ties
    clear_over: float        # fraction of clear tokens above the clear tolerance
    tokens: int
    clear_tokens: int

    def ok(self, median_tol=2e-2, clear_tol=5e-2, clear_fraction=0.05) -> bool:
        return self.median < median_tol and self.clear_over <= clear_fraction

    def __str__(self) -> str:
        return (f"median rel err {self.median:.2e} over {self.tokens} tokens; "
                f"{self.clear_over:.1%} of {self.clear_tokens} tie-clear tokens over 5e-2 "
                f"(worst {self.clear_worst:.2e})")


def compare(out: np.ndarray, ref: Reference, lengths: np.ndarray, clear_tol: float = 5e-2) -> Agreement:
    """SPEC's acceptance rule: per-token relative error of the H-vector, valid positions only."""
    out = np.asarray(out, dtype=np.float64)
    S, L, _ = out.shape
    valid = np.arange(L)[None, :] < np.asarray(lengths)[:, None]
    err = np.linalg.norm(out - ref.hidden, axis=-1) / np.maximum(np.linalg.norm(ref.hidden, axis=-1), 1e-30)
    clear = valid & (ref.margin >= TIE_MARGIN)
    e_valid, e_clear = err[valid], err[clear]
    return Agreement(float(np.median(e_valid)) if e_valid.size else 0.0,
                     float(e_clear.max()) if e_clear.size else 0.0,
                     float((e_clear > clear_tol).mean()) if e_clear.size else 0.0,
                     int(valid.sum()), int(clear.sum()))


def read_output_hidden(path) -> np.ndarray:
    """An output file's /hidden as float64 (bf16 or float32 storage)."""
    with h5py.File(path, "r") as f:
        return _f64(f["hidden"])


__all__ = ["Reference", "reference_forward", "Generated", "reference_generate", "compare", "Agreement",
           "read_output_hidden", "TIE_MARGIN"]
