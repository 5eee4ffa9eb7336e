"""The fixed-shape pieces of a captured decode step (runtime/decode_graph.py), on the CPU:
routing into per-expert rows without a host count, and every expert over its padded rows."""
import numpy as np
import pytest

from moe_hpc.device.dtypes import BF16
from moe_hpc.device.kernels import combine, grouped_expert_mlp, padded_expert_mlp, static_dispatch

rng = np.random.default_rng(7)


def test_static_dispatch_places_each_choice_after_its_experts_earlier_ones():
    experts = np.array([[2, 0], [0, 2], [1, 0]])
    dst, src = static_dispatch(experts, 3, 4)
    # expert 0 gets (0,1), (1,0), (2,1) at rows 0, 1, 2; expert 1: (2,0) at 3; expert 2: (0,0), (1,1) at 6, 7
    assert dst.tolist() == [[6, 0], [1, 7], [3, 2]]
    assert src.tolist() == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("kind, bias", [("gelu", True), ("gated-silu", False)])
def test_fixed_shape_experts_equal_the_exact_path(kind, bias):
    """Routing by ``static_dispatch`` and every expert over T rows gives the combine the same
    rows as the exact grouped path over only the rows each expert received."""
    T, k, E, H, F = 5, 2, 4, 16, 8
    gated = kind.startswith("gated")
    x = rng.standard_normal((T, H)).astype(BF16)
    w1 = (rng.standard_normal((E, H, 2 * F if gated else F)) * H ** -0.5).astype(BF16)
    b1 = (rng.standard_normal((E, w1.shape[2])) * 0.1).astype(BF16) if bias else None
    w2 = (rng.standard_normal((E, F, H)) * F ** -0.5).astype(BF16)
    experts = np.stack([rng.permutation(E)[:k] for _ in range(T)])
    weights = rng.random((T, k)).astype(np.float32)
    dst, src = static_dispatch(experts, T, E)
    rows = np.zeros((E * T, H), BF16)
    rows[dst.reshape(-1)] = x[src]
    fixed = combine(padded_expert_mlp(rows, w1, b1, w2, kind), dst, weights)
    counts = np.bincount(experts.reshape(-1), minlength=E)
    hidden, out = np.empty((E * T, w1.shape[2]), BF16), np.empty((E * T, H), BF16)
    exact = combine(grouped_expert_mlp(rows, counts, w1, b1, w2, kind, hidden, out), dst, weights)
    np.testing.assert_array_equal(fixed.view(np.uint16), exact.view(np.uint16))
