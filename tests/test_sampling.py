"""Token choice (moe_hpc/model/sampling.py) against SPEC.md "Generation", computed directly.

The direct computation here is the SPEC read literally in float64: a full stable sort of all V
logits, softmax, the top-k and top-p masks, renormalise. The module's candidate search
(partition, then growing for top-p) must give exactly that set and those probabilities.
"""
from __future__ import annotations

import numpy as np
import pytest

from moe_hpc.config.errors import ConfigError
from moe_hpc.model.sampling import SamplingParams, check_sampling, kept_tokens, pick_tokens, uniforms


def direct_distribution(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """[V] float64 probabilities sampling draws from, by the SPEC's words."""
    z = logits.astype(np.float64) / p.temperature
    order = sorted(range(len(z)), key=lambda i: (-z[i], i))        # most probable first, ties by id
    probs = np.exp(z[order] - z.max())
    keep = np.ones(len(z), bool)
    if p.top_k:
        keep[p.top_k:] = False
    probs = np.where(keep, probs, 0.0)
    probs /= probs.sum()
    if p.top_p < 1:
        before = np.concatenate([[0.0], np.cumsum(probs)[:-1]])
        keep &= before < p.top_p                                    # the smallest prefix reaching p
    out = np.zeros(len(z))
    out[np.asarray(order)[keep]] = probs[keep] / probs[keep].sum()
    return out


def dense(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    ids, probs = kept_tokens(logits, p)
    out = np.zeros(len(logits))
    out[ids] = probs
    return out


def test_greedy_is_argmax_with_ties_to_the_lowest_id():
    logits = np.array([[0.0, 3.0, 1.0, 3.0],
                       [5.0, 5.0, 5.0, 5.0],
                       [-1.0, -2.0, -1.0, -3.0]], np.float32)
    tokens, _ = pick_tokens(logits, np.arange(3), np.zeros(3, np.int64), SamplingParams())
    assert tokens.dtype == np.int32
    assert tokens.tolist() == [1, 0, 0]


def test_greedy_ignores_seed_and_row_identity():
    logits = np.random.default_rng(0).normal(size=(5, 50)).astype(np.float32)
    a, _ = pick_tokens(logits, np.arange(5), np.zeros(5, np.int64), SamplingParams(seed=1))
    b, _ = pick_tokens(logits, np.arange(5) + 100, np.full(5, 7), SamplingParams(seed=2))
    assert a.tolist() == b.tolist() == np.argmax(logits, axis=1).tolist()


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.6),
    SamplingParams(temperature=0.9, top_k=40, top_p=0.8),
    SamplingParams(temperature=2.0, top_k=1),
    SamplingParams(temperature=1.0, top_p=1e-6),
    SamplingParams(temperature=5.0, top_p=0.999),         # needs more than the first candidates
])
def test_masks_and_probabilities_match_the_direct_computation(params):
    rng = np.random.default_rng(1)
    for V in (7, 1000):
        logits = (3 * rng.normal(size=V)).astype(np.float32)
        np.testing.assert_allclose(dense(logits, params), direct_distribution(logits, params), rtol=1e-12, atol=0)


def test_ties_at_the_top_k_and_top_p_boundaries_keep_the_lower_id():
    logits = np.array([1.0, 2.0, 2.0, 2.0, 0.0], np.float32)
    ids, _ = kept_tokens(logits, SamplingParams(temperature=1.0, top_k=2))
    assert ids.tolist() == [1, 2]
    ids, probs = kept_tokens(logits, SamplingParams(temperature=1.0, top_p=0.5))   # each 2.0 has ~0.3
    assert ids.tolist() == [1, 2] and probs == pytest.approx([0.5, 0.5])
    np.testing.assert_allclose(dense(logits, SamplingParams(temperature=1.0, top_p=0.5)),
                               direct_distribution(logits, SamplingParams(temperature=1.0, top_p=0.5)))


def test_top_p_with_many_tied_tokens_past_the_first_candidates():
    logits = np.zeros(3000, np.float32)                    # all tied: the first ids, by id order
    ids, probs = kept_tokens(logits, SamplingParams(temperature=1.0, top_p=0.5))
    assert ids.tolist() == list(range(1500))
    assert np.allclose(probs, 1 / 1500)


def test_draws_follow_the_distribution():
    """Chi-square over 40,000 draws (fixed seed, so this is a fixed outcome, not a flaky one):
    13 tokens survive top-k 20 and top-p 0.95; the statistic's 99.9% quantile for 12 degrees
    of freedom is 32.9."""
    logits = np.random.default_rng(2).normal(scale=1.5, size=30).astype(np.float32)
    params = SamplingParams(temperature=0.8, top_k=20, top_p=0.95, seed=11)
    want = direct_distribution(logits, params)
    n = 40_000
    tokens, _ = pick_tokens(np.tile(logits, (n, 1)), np.arange(n) % 97, np.arange(n) // 97, params)
    counts = np.bincount(tokens, minlength=len(logits))
    assert not counts[want == 0].any(), "drew a token outside the top-k/top-p set"
    kept = want > 0
    expected = n * want[kept]
    chi2 = ((counts[kept] - expected) ** 2 / expected).sum()
    assert kept.sum() == 13 and chi2 < 32.9, (kept.sum(), chi2)


def test_uniforms_are_uniform_and_keyed():
    u = uniforms(5, np.arange(100_000), np.zeros(100_000, np.int64))
    assert 0 <= u.min() and u.max() < 1
    hist = np.histogram(u, bins=20, range=(0, 1))[0]
    assert np.abs(hist - 5000).max() < 5 * np.sqrt(5000)
    v = uniforms(5, np.zeros(100_000, np.int64), np.arange(100_000))        # along the steps too
    assert np.abs(np.histogram(v, bins=20, range=(0, 1))[0] - 5000).max() < 5 * np.sqrt(5000)
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.02
    assert not np.array_equal(uniforms(6, np.arange(10), np.zeros(10)), u[:10])
    assert not np.array_equal(uniforms(5, np.arange(10), np.ones(10)), u[:10])
    assert uniforms(5, np.array([3]), np.array([0]))[0] == u[3]


def test_tokens_do_not_depend_on_row_order_or_batch_company():
    rng = np.random.default_rng(3)
    logits = rng.normal(scale=2, size=(9, 64)).astype(np.float32)
    seq, step = np.arange(9) * 3 + 1, np.arange(9) % 4
    params = SamplingParams(temperature=1.1, top_k=30, top_p=0.9, seed=123)
    tokens, logprobs = pick_tokens(logits, seq, step, params)
    perm = rng.permutation(9)
    t2, l2 = pick_tokens(logits[perm], seq[perm], step[perm], params)
    assert t2.tolist() == tokens[perm].tolist() and l2.tolist() == logprobs[perm].tolist()
    for r in range(9):                                      # each row alone, and among strangers
        alone, lp_alone = pick_tokens(logits[r:r + 1], seq[r:r + 1], step[r:r + 1], params)
        company = np.concatenate([rng.normal(size=(3, 64)).astype(np.float32), logits[r:r + 1]])
        mixed, lp_mixed = pick_tokens(company, np.array([90, 91, 92, seq[r]]), np.array([0, 1, 2, step[r]]), params)
        assert alone[0] == mixed[3] == tokens[r] and lp_alone[0] == lp_mixed[3] == logprobs[r]
    varied = [pick_tokens(logits[:1], np.array([s]), np.array([0]), params)[0][0] for s in range(40)]
    assert len(set(varied)) > 3, "the sequence id must key the draw"


def test_logprobs_are_of_the_unmodified_distribution():
    rng = np.random.default_rng(4)
    logits = rng.normal(scale=3, size=(6, 40)).astype(np.float32)
    for params in (SamplingParams(), SamplingParams(temperature=0.3, top_k=3, top_p=0.5, seed=9)):
        tokens, logprobs = pick_tokens(logits, np.arange(6), np.zeros(6, np.int64), params)
        x = logits.astype(np.float64)
        want = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
        assert logprobs.dtype == np.float32
        np.testing.assert_allclose(logprobs, want[np.arange(6), tokens], rtol=1e-6)


def test_same_keys_same_tokens_across_calls():
    logits = np.random.default_rng(5).normal(size=(4, 100)).astype(np.float32)
    params = SamplingParams(temperature=1.0, seed=42)
    a = pick_tokens(logits, np.arange(4), np.full(4, 3), params)[0]
    b = pick_tokens(logits, np.arange(4), np.full(4, 3), params)[0]
    assert a.tolist() == b.tolist()


@pytest.mark.parametrize("params, needle", [
    (SamplingParams(temperature=-0.5), "generate.temperature"),
    (SamplingParams(temperature=float("nan")), "generate.temperature"),
    (SamplingParams(top_k=-1), "generate.top_k"),
    (SamplingParams(top_p=0.0), "generate.top_p"),
    (SamplingParams(top_p=1.5), "generate.top_p"),
    (SamplingParams(top_p=-0.1), "generate.top_p"),
    (SamplingParams(seed=1.5), "generate.seed"),
])
def test_check_sampling_names_the_key(params, needle):
    with pytest.raises(ConfigError, match=needle):
        check_sampling(params)


def test_check_sampling_accepts_the_edges():
    for params in (SamplingParams(), SamplingParams(temperature=2.0, top_k=0, top_p=1.0, seed=-3),
                   SamplingParams(temperature=1e-3, top_k=1, top_p=1e-9)):
        check_sampling(params)


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=1.0, top_k=5, top_p=0.9)])
def test_no_rows_gives_empty_arrays(params):
    """A rank whose sequences have all finished still takes part in the step, with no rows."""
    tokens, logprobs = pick_tokens(np.zeros((0, 10), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64), params)
    assert (tokens.dtype, tokens.shape, logprobs.dtype, logprobs.shape) == (np.int32, (0,), np.float32, (0,))


def test_uniforms_bits_are_pinned():
    """The draws' bits are part of the contract (a resumed or upgraded run repeats its tokens):
    these values are SplitMix64 chained over (seed, sequence, step) as first released."""
    got = uniforms(0, np.array([0, 1, 2 ** 40]), np.array([0, 0, 7]))
    assert [float(v).hex() for v in got] == ["0x1.1c13ade1c7e5cp-3", "0x1.1396e6040319ep-2", "0x1.38229c2eec7d5p-1"]
    assert float(uniforms(np.int64(-3), np.array([5]), np.array([1]))[0]).hex() == "0x1.0428340638e44p-3"
