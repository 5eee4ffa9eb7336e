"""The fixed-shape pieces of a captured decode step (runtime/decode_graph.py), on the CPU:
routing into per-expert rows without a host count, and every expert over its padded rows."""
import ctypes

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


# ---------------------------------------------------------------- when a batch size is captured

class _DeviceArray(np.ndarray):
    """A 'device' array: host memory with CuPy's ``data.ptr``, so the runtime's copies reach it."""

    @property
    def data(self):
        return type("pointer", (), {"ptr": self.ctypes.data})


class _FakeCp:
    """Just enough of CuPy for DecodeGraphs' bookkeeping: 'device' arrays are NumPy arrays, a
    capture records the forward it would replay, a launch runs it."""

    def __init__(self, fail_capture=False):
        self.fail_capture, self.freed, self.launches = fail_capture, 0, 0
        self.capturing, self.captured = False, []
        fake = self

        class Stream:
            ptr = 0

            def __init__(self, non_blocking=False):
                self.capturing = False

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def wait_event(self, event):
                pass

            def record(self):
                return None

            def begin_capture(self):
                if fake.fail_capture:
                    raise RuntimeError("calling cuBLAS API during stream capture is currently unsupported")
                fake.capturing, fake.captured = True, []

            def end_capture(self):
                fake.capturing = False
                return Graph(fake.captured)

            def synchronize(self):
                pass

        class Graph:
            def __init__(self, work):
                self.work = work

            def launch(self, stream):
                fake.launches += 1
                for op in self.work:
                    op()

        class MemoryPool:
            def __init__(self, allocator=None):
                pass

            def malloc(self, size):
                raise AssertionError("not called by the fake")

            def free_all_blocks(self):
                fake.freed += 1

        class Cuda:
            pass
        cuda = Cuda()
        cuda.Stream, cuda.MemoryPool = Stream, MemoryPool
        cuda.get_current_stream = lambda: Stream()
        cuda.using_allocator = lambda malloc: Stream()
        cuda.runtime = type("runtime", (), {
            "CUDARuntimeError": RuntimeError, "memcpyHostToDevice": 1, "memcpyDeviceToHost": 2,
            # a copy on a capturing stream joins the graph, and runs at each launch
            "memcpyAsync": staticmethod(lambda dst, src, n, kind, stream:
                                        fake.run_or_record(stream, lambda: ctypes.memmove(dst, src, n)))})
        cuda.alloc_pinned_memory = bytearray
        self.cuda = cuda

    def run_or_record(self, stream, op):
        self.captured.append(op) if self.capturing else op()

    @staticmethod
    def asarray(a):
        return np.array(a).view(_DeviceArray)

    @staticmethod
    def asnumpy(a, stream=None):
        return np.array(a)


class _CountingEngine:
    """fixed_shape_decode -> logits [B, 1] = token + 10 * row + 100 * position, counted; a
    capture's forward is remembered so a launch recomputes it from the (updated) inputs."""

    def __init__(self, cp):
        self.calls, self.cp = 0, cp

    def fixed_shape_decode(self, tokens, at):
        self.calls += 1
        out = np.zeros((len(tokens), 1)).view(_DeviceArray)
        self.cp.run_or_record(None, lambda: out.__setitem__(slice(None), (tokens + 10 * at.rows + 100 * at.start)[:, None]))
        return out


def _graphs(fail=False):
    from moe_hpc.runtime.decode_graph import DecodeGraphs
    cp = _FakeCp(fail)
    engine = _CountingEngine(cp)
    return DecodeGraphs(engine, cp), engine, cp


def _step(graphs, tokens, pos):
    rows = np.arange(len(tokens))
    return graphs.step(np.asarray(tokens), rows, np.full(len(tokens), pos))


def test_a_batch_size_is_captured_the_second_time_in_a_row_then_replayed():
    graphs, engine, cp = _graphs()
    assert _step(graphs, [1, 2], 5) is None                    # first time: the caller steps eagerly
    got = _step(graphs, [3, 4], 6)                             # second: the capture's eager run is the result
    np.testing.assert_array_equal(got[:, 0], [603, 614])
    assert engine.calls == 2 and cp.launches == 0              # eager run + capture, no launch
    got = _step(graphs, [7, 8], 7)                             # third: a replay over the new inputs
    np.testing.assert_array_equal(got[:, 0], [707, 718])
    assert engine.calls == 2 and cp.launches == 1
    assert _step(graphs, [1, 2, 3], 7) is None                 # a new size: eager first
    np.testing.assert_array_equal(_step(graphs, [9, 9], 8)[:, 0], [809, 819])   # B = 2 still captured
    graphs.clear()
    assert cp.freed == 1 and _step(graphs, [1, 2], 9) is None  # cleared: captured again from scratch


def test_a_failed_capture_leaves_every_later_step_eager(capsys):
    graphs, engine, cp = _graphs(fail=True)
    assert _step(graphs, [1, 2], 5) is None
    assert _step(graphs, [1, 2], 6) is None                    # the capture failed: this step eager too
    assert "decode steps run eagerly" in capsys.readouterr().err
    assert _step(graphs, [1, 2], 7) is None and cp.freed == 1
    assert _step(graphs, np.arange(200), 7) is None            # past MAX_GRAPH_BATCH: always eager
