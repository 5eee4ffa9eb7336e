"""The run path's objects built directly, one process (the NumPy backend over MPI.COMM_SELF):
a MoE layer, an exchange and the blocks, each against a plain computation of what it returns."""
import numpy as np
import pytest

from moe_hpc.comm.exchange import Exchange, peer_major, slot_major
from moe_hpc.comm.transports import make_transport
from moe_hpc.config.run_config import build_config
from moe_hpc.device.backend import make_backend
from moe_hpc.device.dtypes import BF16
from moe_hpc.device.kernels import expert_mlp
from moe_hpc.model.blocks import AttentionBlock, MlpBlock
from moe_hpc.model.experts import LocalExperts
from moe_hpc.model.gate import gate
from moe_hpc.model.layers import mlp
from moe_hpc.model.weights import AttentionWeights, Expert, GateWeights
from moe_hpc.moe.dispatch import route_tables
from moe_hpc.moe.layer import MoeLayer
from moe_hpc.placement.file import make_placement
from moe_hpc.runtime.engine import PhaseTimes

MPI = pytest.importorskip("mpi4py.MPI")
rng = np.random.default_rng(7)


def bf(shape, std=1.0):
    return (rng.standard_normal(shape) * std).astype(BF16)


def f64(a):
    return np.asarray(a, np.float64)


@pytest.fixture(scope="module")
def parts():
    """A tiny model's first MoE block: its gate, every expert on this one rank, output biases."""
    cfg = build_config({}, where="<tiny>")
    m, backend = cfg.model, make_backend("cpu")
    H, F, E = m.hidden_size, m.moe_ffn_hidden_size, m.num_experts
    placement = make_placement(m, 1, "shared")
    experts = LocalExperts(m.ffn_kind)
    weights = {}
    for f in placement.hosted()[0]:
        w = Expert(bf((H, F), H ** -0.5), bf(F, 0.1), bf((F, H), F ** -0.5), None)
        weights[f] = (w.w1.copy(), w.b1.copy(), w.w2.copy())
        experts.add(f, w)
    experts.stack()
    layer = m.first_dense_layers
    gates = {layer: GateWeights(bf((H, E), H ** -0.5))}
    b2 = bf((m.num_moe_layers * E, H), 0.1)
    return cfg, backend, placement, experts, weights, gates, b2, layer


def make_layer(parts, micro_batch_tokens, gates=None, **options):
    """options: MoeLayer's keywords (hook, local_shortcut)."""
    cfg, backend, placement, experts, _, part_gates, b2, _ = parts
    m, comm = cfg.model, MPI.COMM_SELF
    exchange = Exchange(comm, m.hidden_size, backend, make_transport("mpi", comm, m.hidden_size, backend))
    return MoeLayer(m, micro_batch_tokens, gates or part_gates, b2, exchange, comm, route_tables(placement, (0,)),
                    experts, backend, PhaseTimes(), **options)


def test_moe_layer_returns_the_weighted_sum_of_its_experts(parts):
    cfg, _, _, _, weights, gates, b2, layer = parts
    m = cfg.model
    x, ids = bf((37, m.hidden_size)), np.arange(37)
    moe = make_layer(parts, micro_batch_tokens=8)
    (out,) = moe([(layer, x, ids)])
    r = gate(x, gates[layer].gate, None, m.top_k, m.normalize_topk, rule=m.gate_rule)
    want = np.zeros((37, m.hidden_size))
    base = (layer - m.first_dense_layers) * m.num_experts
    for t in range(37):
        for e, w in zip(r.experts[t], r.weights[t]):
            w1, b1, w2 = weights[base + int(e)]
            want[t] += float(w) * (f64(expert_mlp(x[t:t + 1], w1, b1, w2, m.ffn_kind))[0] + f64(b2[base + int(e)]))
    assert out.dtype == BF16 and out.shape == x.shape
    assert np.abs(f64(out) - want).max() <= 2e-2 * np.abs(want).max()
    assert moe.steps == 5 and moe.busy_steps == 5 and moe.idle_fraction == 0.0      # ceil(37 / 8) micro-batches
    moe.exchange.close()


def test_moe_layer_output_does_not_depend_on_the_micro_batch_split(parts):
    x, ids, layer = bf((29, parts[0].model.hidden_size)), np.arange(29), parts[-1]
    outs = []
    for mbt in (1, 6, 1000):
        moe = make_layer(parts, mbt)
        outs.append(moe([(layer, x, ids)])[0].view(np.uint16))
        moe.exchange.close()
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])


@pytest.mark.parametrize("local_shortcut", [True, False])
def test_moe_layer_times_every_step_through_its_hook(parts, local_shortcut):
    seen = []

    def hook(label, fn, *args, **kwargs):
        seen.append(label)
        return fn(*args, **kwargs)
    moe = make_layer(parts, 8, hook=hook, local_shortcut=local_shortcut)
    x, layer = bf((10, parts[0].model.hidden_size)), parts[-1]
    moe([(layer, x, np.arange(10))])
    assert seen[:4] == ["route", "plan", "counts", "prepare"]
    assert {"pack", "experts", "combine"} <= set(seen)
    assert seen.count("experts") == 2 and seen.count("pack") == 2 and seen.count("combine") == 2
    # 2 micro-batches, there and back; one rank's shortcut has no transfer
    assert seen.count("transfer") == (0 if local_shortcut else 4)
    assert moe.last_layout is not None and len(moe.last_layout.sends) == 2
    assert set(moe.times.seconds) == {"gating", "exchange", "experts"}
    moe.exchange.close()


@pytest.mark.parametrize("tokens, micro_batch_tokens, blocks", [(37, 8, 1), (29, 1, 1), (29, 1000, 1), (3, 2, 1),
                                                                (23, 5, 2), (40, 1000, 3)])
def test_one_rank_shortcut_gives_the_general_paths_bits(parts, tokens, micro_batch_tokens, blocks):
    """The shortcut (no transport on one rank) against the general path forced, over several
    micro-batch counts, experts with no rows and steps carrying several MoE blocks."""
    cfg = parts[0]
    m = cfg.model
    H, E = m.hidden_size, m.num_experts
    layers = range(m.first_dense_layers, m.first_dense_layers + blocks)
    gates = {layer: GateWeights(bf((H, E), H ** -0.5)) for layer in layers}
    step = [(layer, bf((tokens + j, H)), np.arange(tokens + j)) for j, layer in enumerate(layers)]
    outs, idle = [], []
    for local_shortcut in (True, False):
        moe = make_layer(parts, micro_batch_tokens, gates, local_shortcut=local_shortcut)
        assert moe.local == local_shortcut
        outs.append([f.view(np.uint16) for f in moe(step)])
        idle.append(moe.idle_fraction)
        if micro_batch_tokens < 4:          # few tokens a micro-batch: some of the step's experts get no rows
            assert any((layout.counts.sum(axis=0)[:blocks * E] == 0).any() for layout in moe.last_layout.receives)
        moe.exchange.close()
    for fast, general in zip(*outs):
        np.testing.assert_array_equal(fast, general)
    assert idle[0] == idle[1]


def test_exchange_moves_peer_major_rows_into_slot_major_order():
    backend, comm = make_backend("cpu"), MPI.COMM_SELF
    H = 8
    exchange = Exchange(comm, H, backend, make_transport("mpi", comm, H, backend))
    counts = np.array([[2, 0, 3]])                               # one peer (itself), 3 slots
    send, recv = peer_major(counts), slot_major(counts, np.arange(3), capacity=4)
    rows = bf((5, H))
    landed = np.zeros((recv.extent, H), BF16)
    out = exchange.post(rows, send, landed, recv).wait()
    np.testing.assert_array_equal(out[0:2].view(np.uint16), rows[0:2].view(np.uint16))      # slot 0
    np.testing.assert_array_equal(out[8:11].view(np.uint16), rows[2:5].view(np.uint16))     # slot 2
    back = np.zeros((5, H), BF16)
    np.testing.assert_array_equal(exchange.post(out, recv, back, send).wait().view(np.uint16), rows.view(np.uint16))
    exchange.close()


def test_attention_and_mlp_blocks_hold_their_weights():
    cfg = build_config({}, where="<tiny>")
    m = cfg.model
    H, D = m.hidden_size, m.head_dim
    w = AttentionWeights(attn_norm=np.ones(H, BF16), mlp_norm=np.ones(H, BF16), wq=bf((H, m.num_heads * D), H ** -0.5),
                         wk=bf((H, m.kv_heads * D), H ** -0.5), wv=bf((H, m.kv_heads * D), H ** -0.5),
                         wo=bf((m.num_heads * D, H), 0.02))
    block = AttentionBlock(w, m, m, 8, np)
    x = bf((2, 5, H))
    before = x.copy()
    rows = np.array([0, 3, 7])
    h = block(x, rows)
    assert h.shape == (3, H) and h.dtype == BF16
    assert not np.array_equal(x.view(np.uint16), before.view(np.uint16))     # the residual add, in place
    Fd = m.dense_ffn_hidden_size
    from moe_hpc.model.weights import MlpWeights
    weights = MlpWeights(bf((H, Fd), H ** -0.5), bf(Fd, 0.1), bf((Fd, H), Fd ** -0.5), bf(H, 0.1))
    np.testing.assert_array_equal(MlpBlock(weights, "gelu", np)(h).view(np.uint16),
                                  mlp(h, weights.w1, weights.b1, weights.w2, weights.b2, "gelu").view(np.uint16))
