"""The run-time balancer's pieces: bias steps, water-filling over replicas, replica choice."""
import numpy as np
import pytest

from moe_hpc.config.run_config import ModelConfig
from moe_hpc.moe.balance import Balancer, choose_replicas, max_over_mean, waterfill, with_bias
from moe_hpc.placement.file import make_placement


class OneRank:
    """Just enough of a communicator for one rank."""
    def Get_rank(self):
        return 0

    def Allreduce(self, send, recv):
        recv[...] = send


def test_waterfill_levels_the_replicas():
    loads = np.array([[0.0, 10.0, 5.0], [3.0, 0.0, 0.0]])
    share = waterfill(loads, np.array([3, 1]), np.array([20.0, 7.0]))
    level = loads[0] + 20 * share[0]
    np.testing.assert_allclose(level, level.mean())                 # enough water: all equal
    np.testing.assert_allclose(share[1], [1, 0, 0])                  # one replica takes all
    small = waterfill(loads[:1], np.array([3]), np.array([5.0]))
    np.testing.assert_allclose(small[0], [1, 0, 0])                  # only the emptiest gets some


def test_choose_replicas_follows_shares_and_is_split_independent():
    experts = np.zeros((10000, 1), np.int64)
    ids = np.arange(10000)
    share = np.array([[0.25, 0.75, 0.0]])
    pick = choose_replicas(experts, ids, share, np.array([2]))
    assert pick.max() <= 1 and abs((pick == 1).mean() - 0.75) < 0.02
    np.testing.assert_array_equal(choose_replicas(experts[5000:], ids[5000:], share, np.array([2])),
                                  pick[5000:])                      # depends on the token only


def test_bias_moves_against_load_only_past_threshold():
    model = ModelConfig(num_layers=2, first_dense_layers=1, num_experts=4, top_k=1)
    b = Balancer(make_placement(model, 4), 1, threshold=1.5, gamma=0.1, comm=OneRank())
    b.observe(0, np.array([[10], [10], [10], [10]]))               # even: no action
    assert not b.bias.any() and b.updates[0] == 0
    b.observe(0, np.array([[40], [0], [0], [0]]))                  # max/mean 4 > 1.5
    np.testing.assert_allclose(b.bias[0], [-0.1, 0.1, 0.1, 0.1])
    report = b.report()["blocks"][0]
    assert report["before"] == 1.0 and report["updates"] == 1 and report["after"] == pytest.approx(50 / 20)


def test_helpers():
    assert max_over_mean(np.array([3, 1, 0, 0])) == 3.0 and max_over_mean(np.zeros(3)) == 1.0
    extra = np.ones(2, np.float32)
    assert with_bias(None, extra) is extra
    np.testing.assert_allclose(with_bias(np.array([0.5, 0.0], np.float32), extra), [1.5, 1.0])
