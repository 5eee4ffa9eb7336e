"""Model pieces against the float64 formulas, one at a time (tighter than end-to-end)."""
import math

import numpy as np
import pytest

from moe_hpc.comm.exchange import peer_major, slot_major
from moe_hpc.config.run_config import build_config
from moe_hpc.device.dtypes import BF16
from moe_hpc.device.kernels import activation
from moe_hpc.model.weights import AttentionWeights
from moe_hpc.model import reference as ref
from moe_hpc.model.attention import attention
from moe_hpc.model.layers import apply_rope, mlp, rmsnorm, rope_tables
from moe_hpc.model.gate import gate
from moe_hpc.moe.dispatch import plan_dispatch, route_tables
from moe_hpc.runtime.job import num_chunks, sequence_range

rng = np.random.default_rng(0)


def bf(shape, std=1.0):
    return (rng.standard_normal(shape) * std).astype(BF16)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_rmsnorm():
    x, w = bf((5, 64)), bf(64)
    got = rmsnorm(x, w, 1e-6)
    assert got.dtype == BF16
    assert rel(got, ref._rmsnorm(x.astype(np.float64), w.astype(np.float64), 1e-6)) < 4e-3


@pytest.mark.parametrize("kind", ["gelu", "gelu_tanh", "silu"])
def test_activations(kind):
    h = np.linspace(-6, 6, 1001).astype(np.float32)
    assert np.abs(activation(h, kind) - ref._act(h.astype(np.float64), kind)).max() < 1e-6


def test_rope_matches_spec_formula():
    x = bf((24, 3, 16))
    cos, sin = rope_tables(np.arange(24), 16, 10000.0)
    got = apply_rope(x, cos, sin)
    want = ref._rope(x.astype(np.float64), 10000.0)
    assert rel(got, want) < 4e-3
    # position 0 is the identity; the rotation keeps each (i, i + D/2) pair's norm
    np.testing.assert_array_equal(got[0], x[0])
    half = x.shape[-1] // 2
    pair_norm = lambda a: np.hypot(a[..., :half].astype(np.float64), a[..., half:].astype(np.float64))
    np.testing.assert_allclose(pair_norm(got), pair_norm(x), rtol=8e-3, atol=1e-6)   # bf16: 2^-8 per value


def _attn_weights(H, nh, nkv, D):
    return AttentionWeights(attn_norm=None, mlp_norm=None, wq=bf((H, nh * D), H ** -0.5),
                            wk=bf((H, nkv * D), H ** -0.5), wv=bf((H, nkv * D), H ** -0.5),
                            wo=bf((nh * D, H), (nh * D) ** -0.5))


@pytest.mark.parametrize("nkv", [4, 2, 1])
def test_attention_matches_reference_and_blocking(nkv):
    cfg = build_config({}, [f"model.num_kv_heads={nkv}"]).model
    w = _attn_weights(cfg.hidden_size, cfg.num_heads, nkv, cfg.head_dim)
    a = bf((2, 19, cfg.hidden_size))
    full = attention(a, w, cfg, block=512)
    for block in (1, 5):   # tiling changes only the fp32 summation order
        assert rel(attention(a, w, cfg, block=block), full) < 4e-3
    g = {k: getattr(w, k).astype(np.float64) for k in ("wq", "wk", "wv", "wo")}
    for s in range(2):
        assert rel(full[s], ref._attention(a[s].astype(np.float64), g, cfg)) < 1e-2


class _SdpaStandIn:
    """What the flash kernel computes (causal SDPA, reading q, k, v from the fused QKV rows and
    writing [S, L, nh D]), in float64: checks the fused path's layout without a GPU."""

    def supports(self, *shape) -> bool:
        return True

    def __call__(self, qkv, out, nh, nkv, D, scale):
        S, L, _ = qkv.shape
        heads = qkv.astype(np.float64).reshape(S, L, nh + 2 * nkv, D)
        q, k, v = heads[:, :, :nh], heads[:, :, nh:nh + nkv], heads[:, :, nh + nkv:]
        kv_of = np.arange(nh) // (nh // nkv)
        s = np.einsum("sqhd,skhd->shqk", q, k[:, :, kv_of]) * scale
        s = np.where(np.tril(np.ones((L, L), bool)), s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        o = np.einsum("shqk,skhd->sqhd", p / p.sum(-1, keepdims=True), v[:, :, kv_of])
        out[...] = o.reshape(S, L, nh * D).astype(BF16)


@pytest.mark.parametrize("nkv", [4, 2, 1])
def test_fused_qkv_path_matches_tiles(nkv):
    from moe_hpc.model.attention import fuse_qkv
    cfg = build_config({}, [f"model.num_kv_heads={nkv}"]).model
    w = _attn_weights(cfg.hidden_size, cfg.num_heads, nkv, cfg.head_dim)
    fused = fuse_qkv(w)
    np.testing.assert_array_equal(fused.wk, w.wk)          # views of the one fused weight
    assert np.shares_memory(fused.wv, fused.wqkv)
    a = bf((3, 23, cfg.hidden_size))
    tiles = attention(a, w, cfg, block=8)
    assert rel(attention(a, fused, cfg, block=8, flash=_SdpaStandIn()), tiles) < 4e-3
    # a kernel that writes nothing sensible would be caught: the stand-in is what is used
    class Zero(_SdpaStandIn):
        def __call__(self, qkv, out, *rest):
            out[...] = 0
    assert rel(attention(a, fused, cfg, block=8, flash=Zero()), tiles) > 0.5


def test_add_rmsnorm_updates_the_residual_in_place():
    from moe_hpc.device.kernels import add_rmsnorm
    x, y, w = bf((3, 5, 64)), bf((3, 5, 64)), bf(64)
    want_sum = (x.astype(np.float32) + y.astype(np.float32)).astype(BF16)
    got = add_rmsnorm(x, y, w, 1e-6)
    np.testing.assert_array_equal(x, want_sum)
    np.testing.assert_array_equal(got, rmsnorm(want_sum, w, 1e-6))


def test_batched_rows_splits_only_under_skew():
    from moe_hpc.device.expert_batches import batched_rows
    balanced = np.array([500, 480, 512, 470])
    m, heavy = batched_rows(balanced, 512)
    assert m == 512 and heavy.size == 0                # one GEMM over the busiest slot's rows
    skewed = np.array([8000] + [100] * 63)
    m, heavy = batched_rows(skewed, 8000)
    assert m == 128 and heavy.tolist() == [0]          # 63 small slots no longer padded to 8,000
    padded, split = 64 * 8000, 64 * m + (8000 - m)
    assert split < padded / 30


@pytest.mark.parametrize("seed", range(4))
def test_tail_windows_cover_each_heavy_slots_rows_inside_its_slot(seed):
    """Whatever the counts: the batched GEMM's m rows plus each heavy slot's window cover every
    row it received, the window stays inside the slot, and the windows come in few sizes
    (SLOT_ROUND times 1-7, or 4-7 times a power of two, or the whole slot), so cuBLAS sees
    shapes it has seen before; the choice of m is the cheapest by the cost model."""
    from moe_hpc.device.expert_batches import BATCH_LAUNCH_ROWS, SLOT_ROUND, batched_rows, tail_windows
    rng = np.random.default_rng(seed)
    for _ in range(200):
        S, C = int(rng.choice([1, 8, 60, 64, 160])), SLOT_ROUND * int(rng.integers(1, 130))
        counts = rng.integers(0, C + 1, S) if rng.random() < 0.5 else np.minimum(rng.poisson(C / 8, S), C)
        m, heavy = batched_rows(counts, C)
        assert m % SLOT_ROUND == 0 and 0 <= m <= C
        assert heavy.tolist() == np.flatnonzero(counts > m).tolist()
        start, size = tail_windows(counts[heavy], m, C)
        assert (start >= 0).all() and (start <= m).all() and (start + size <= C).all()
        assert (start + size >= counts[heavy]).all()              # every row past m is in the window
        units = size // SLOT_ROUND
        odd = units // 2 ** np.maximum(np.floor(np.log2(np.maximum(units, 1))).astype(int) - 2, 0)
        assert ((size % SLOT_ROUND == 0) & (odd <= 7) | (size == C)).all()

        def cost(mm):
            h = counts > mm
            sz = tail_windows(counts[h], mm, C)[1]
            return S * mm + sz.sum() + BATCH_LAUNCH_ROWS * len(np.unique(sz))
        others = np.unique(np.minimum(-(-counts // SLOT_ROUND) * SLOT_ROUND, C))
        assert cost(m) == min(cost(mm) for mm in others)


def test_packed_slots_place_every_row_once_and_compute_as_the_padded_layout():
    """pack_slots: each busy slot's rows are distinct, inside the extent, its first m at stride
    m; the row tables agree with slot_rows; and the experts over the packed rows give each row
    the bits the padded layout (every slot the busiest's rows) gives it."""
    from moe_hpc.device.expert_batches import SLOT_ROUND, pack_slots
    from moe_hpc.device.kernels import grouped_expert_mlp, packed_expert_mlp
    counts = np.array([900, 3, 700, 0, 2, 300, 4, 650, 0, 5000, 0])
    packed = pack_slots(counts)
    assert packed.slots.tolist() == np.flatnonzero(counts).tolist() and packed.heavy.size >= 2
    assert packed.extent < counts.size * 5056 / 3                     # the padded layout: every slot 5,056 rows
    every = np.concatenate([packed.slot_rows(p) for p in range(packed.slots.size)])
    assert every.size == counts.sum() == np.unique(every).size and every.max() < packed.extent
    below, past = packed.row_bases(counts.size)
    for p, s in enumerate(packed.slots):
        j = np.arange(counts[s])
        np.testing.assert_array_equal(np.where(j < packed.m, below[s], past[s]) + j, packed.slot_rows(p))
        assert (packed.slot_rows(p)[:packed.m] == p * packed.m + j[:packed.m]).all()
    S, H, F = counts.size, 16, 8
    C = int(-(-counts.max() // SLOT_ROUND) * SLOT_ROUND)
    w1, b1, w2 = bf((S, H, F), H ** -0.5), bf((S, F), 0.1), bf((S, F, H), F ** -0.5)
    padded = bf((S * C, H))
    x = np.zeros((packed.extent, H), BF16)
    for p, s in enumerate(packed.slots):
        x[packed.slot_rows(p)] = padded[s * C:s * C + counts[s]]
    want = grouped_expert_mlp(padded, counts, w1, b1, w2, "gelu", None, np.zeros((S * C, H), BF16))
    got = packed_expert_mlp(x, packed, w1, b1, w2, "gelu", None, np.zeros((packed.extent, H), BF16))
    for p, s in enumerate(packed.slots):
        np.testing.assert_array_equal(got[packed.slot_rows(p)].view(np.uint16),
                                      want[s * C:s * C + counts[s]].view(np.uint16))


def test_causality():
    cfg = build_config({}).model
    w = _attn_weights(cfg.hidden_size, cfg.num_heads, cfg.num_heads, cfg.head_dim)
    a = bf((1, 10, cfg.hidden_size))
    b = a.copy()
    b[0, 7:] = bf((3, cfg.hidden_size))
    np.testing.assert_array_equal(attention(a, w, cfg, 4)[0, :7], attention(b, w, cfg, 4)[0, :7])


def test_mlp_with_bias():
    x, w1, b1, w2, b2 = bf((7, 64)), bf((64, 128), 0.125), bf(128, 0.1), bf((128, 64), 0.09), bf(64, 0.1)
    got = mlp(x, w1, b1, w2, b2, "gelu")
    f64 = lambda t: t.astype(np.float64)
    want = ref._act(f64(x) @ f64(w1) + f64(b1), "gelu") @ f64(w2) + f64(b2)
    assert rel(got, want) < 1e-2


def test_router_bias_chooses_but_never_weights():
    m = bf((6, 64))
    weight = bf((64, 8), 0.125)
    plain = gate(m, weight, None, 2, True)
    bias = np.zeros(8, np.float32)
    bias[5] = 10.0        # forces expert 5 into every token's choice
    biased = gate(m, weight, bias, 2, False)
    assert (biased.experts[:, 0] == 5).all()
    logits = m.astype(np.float32) @ weight.astype(np.float32)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(biased.weights[:, 0], p[:, 5], rtol=1e-6)
    np.testing.assert_allclose(plain.weights.sum(-1), 1.0, rtol=1e-6)


def test_router_ties_pick_lower_index():
    m = np.zeros((1, 4), BF16)
    r = gate(m, np.zeros((4, 6), BF16), None, 2, True)
    assert r.experts.tolist() == [[0, 1]]


def test_plan_dispatch_groups_by_rank_and_spreads_replicas():
    from moe_hpc.config.run_config import ModelConfig
    from moe_hpc.placement.file import make_placement

    # 1 MoE block of 3 experts on 3 ranks, 4 slots: expert 0 is replicated on ranks 0 and 3
    model = ModelConfig(num_layers=1, first_dense_layers=0, num_experts=3)
    placement = make_placement(model, 4, "shared")
    tables = route_tables(placement, slot_leaders=(0, 1, 2, 3))
    assert tables.replicas.tolist() == [2, 1, 1] and tables.holders[0].tolist() == [0, 3]
    experts = np.array([[0, 1], [1, 2], [2, 0], [1, 0], [0, 2]])
    tokens = np.arange(5) + 10
    plan = plan_dispatch(experts, tokens, tables, micro_batch_tokens=2, micro_batches=3, world_size=4)
    pick = np.repeat(tokens, 2) % tables.replicas[experts.reshape(-1)]     # the default: token index mod replicas
    dest = tables.holders[experts.reshape(-1), pick]
    assert plan.counts.sum() == 10 and plan.counts.shape == (3, 4, 1)
    assert plan.counts[:, 0].sum() > 0 and plan.counts[:, 3].sum() > 0   # both replicas used
    assert plan.starts.tolist() == [0, 4, 8, 10]
    for i in range(3):
        seg = plan.order[plan.starts[i]:plan.starts[i + 1]]
        assert (seg // 2 // 2 == i).all(), "each micro-batch's rows are contiguous"
        assert (np.diff(dest[seg]) >= 0).all(), "grouped by destination rank"
        for r, a in enumerate(seg):   # positions point back at each (token, choice)
            assert plan.positions.reshape(-1)[a] == r


def test_route_tables_slots_follow_hosted_order():
    from moe_hpc.config.run_config import ModelConfig
    from moe_hpc.placement.file import make_placement
    model = ModelConfig(num_layers=3, first_dense_layers=1, num_experts=4)   # 8 flat experts
    placement = make_placement(model, 3, "shared")
    tables = route_tables(placement, slot_leaders=(0, 1, 2))
    hosted = placement.hosted()
    assert tables.num_slots == max(len(h) for h in hosted)
    for g, ids in enumerate(hosted):
        for j, f in enumerate(ids):
            assert tables.holders[f, 0] == g and tables.slot[f, 0] == j


def test_layouts_and_scatter():
    counts = np.array([[2, 0, 1], [0, 3, 1]])     # [peer, slot]
    pm, em = peer_major(counts), slot_major(counts, np.arange(3), capacity=4)
    assert pm.offsets.tolist() == [[0, 2, 2], [3, 3, 6]]
    assert em.offsets.tolist() == [[0, 4, 8], [2, 4, 9]] and em.extent == 12
    scatter = em.peer_major_scatter()
    # rows arriving peer-major: peer 0 (slot 0 x2, slot 2 x1), peer 1 (slot 1 x3, slot 2 x1)
    assert scatter.tolist() == [0, 1, 8, 4, 5, 6, 9]
    assert pm.peer_major_scatter() is None


@pytest.mark.parametrize("S, D, C", [(10, 3, 2), (1, 4, 8), (64, 4, 64), (7, 1, 3)])
def test_sequence_split_covers_everything_once(S, D, C):
    ranges = [sequence_range(d, D, S) for d in range(D)]
    assert ranges[0][0] == 0 and ranges[-1][1] == S
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert num_chunks(S, D, C) == math.ceil(max(b - a for a, b in ranges) / C)


def test_local_experts_compute_only_busy_slots():
    from moe_hpc.comm.exchange import SLOT_ROUND, slot_capacity, slot_major
    from moe_hpc.model.weights import Expert
    from moe_hpc.model.experts import LocalExperts
    H, F, S = 16, 32, 5
    local = LocalExperts("silu")
    weights = [Expert(bf((H, F), 0.2).astype(np.float32), bf(F, 0.1).astype(np.float32),
                      bf((F, H), 0.2).astype(np.float32), None) for _ in range(S)]
    for f, w in zip((2, 3, 7, 8, 9), weights):
        local.add(f, w)
    local.stack()
    counts = np.array([[0, 3, 0, 1, 2], [0, 1, 0, 0, 4]])      # [peers, slots]: slots 1, 3, 4 busy
    active = LocalExperts.active_slots(counts, S)
    assert active.tolist() == [-1, 0, -1, 1, 2]
    layout = slot_major(counts, active, slot_capacity(counts[:, active >= 0]))
    assert layout.extent == 3 * SLOT_ROUND                      # padding only for busy slots
    rows = bf((layout.extent, H))
    out = local.forward(rows, layout, np.zeros((layout.extent, H), BF16), lambda n, s, r, w: np.empty((r, w), BF16))
    for s in (1, 3, 4):
        n, base = counts[:, s].sum(), layout.offsets[0, s]
        want = mlp(rows[base:base + n], weights[s].w1, weights[s].b1, weights[s].w2, None, "silu")
        np.testing.assert_array_equal(out[base:base + n], want)


def test_permute_blocks_and_peer_major_tables():
    """The exchange's block tables: moving peer-major rows into a slot layout and back is the
    identity, and a peer-major layout says so."""
    from moe_hpc.comm.exchange import peer_major, slot_major
    from moe_hpc.device.kernels import permute_blocks
    counts = np.array([[2, 0, 1], [1, 3, 0]])          # 2 peers x 3 slots
    pm, slots = peer_major(counts), slot_major(counts, np.arange(3), capacity=4)
    assert pm.is_peer_major and not slots.is_peer_major
    rows = np.arange(7 * 4, dtype=np.uint16).reshape(7, 4).view(BF16)
    landed = np.zeros((slots.extent, 4), BF16)
    table = slots.blocks_from_peer_major()
    permute_blocks(rows, landed, table, table.shape[1])
    # slot 0 holds peer 0's 2 rows then peer 1's 1 row; slot 1 peer 1's 3 rows; slot 2 peer 0's 1
    expect = {0: 0, 1: 1, 2: 3, 4: 4, 5: 5, 6: 6, 8: 2}
    for dst, src in expect.items():
        assert (landed[dst].view(np.uint16) == rows[src].view(np.uint16)).all()
    back = np.zeros_like(rows)
    permute_blocks(landed, back, table[[1, 0, 2]], table.shape[1])
    np.testing.assert_array_equal(back.view(np.uint16), rows.view(np.uint16))
