"""Placement and roles: the seed formulas, replicas, several experts per rank, and inverses."""
import numpy as np
import pytest

from moe_hpc.config.errors import ConfigError
from moe_hpc.config.roles import role_layout
from moe_hpc.config.run_config import ModelConfig, load_config
from moe_hpc.placement.file import make_placement
from moe_hpc.placement.table import gpu_to_node

from helpers import REPO, transform_dataset

SEED61 = load_config(REPO / "inputs" / "seed61.toml").model


def test_seed_table_pins():
    p = make_placement(SEED61, 3712, "disjoint")
    assert p.replicas(3, 63) == (63,) and gpu_to_node(63, 8) == 7
    assert p.replicas(60, 0) == (3648,) and gpu_to_node(3648, 8) == 456
    hosted = {g for m in p.ranks for row in m for g in row}
    assert hosted == set(range(3712)), "58 x 64 experts fill exactly 3712 expert GPUs"
    assert make_placement(SEED61, 3712, "auto").kind == "disjoint"


def test_seed_deployment_with_dense_gpus():
    # 3904 GPUs = 3712 expert GPUs + 192 dense GPUs on 488 nodes of 8
    roles = role_layout(3904, 192)
    assert roles.expert_ranks == tuple(range(3712))
    assert roles.dense_ranks[0] == 3712 and gpu_to_node(roles.dense_ranks[-1], 8) == 487


def test_one_expert_per_rank_when_ranks_suffice():
    p = make_placement(SEED61, 3712, "disjoint")
    for g in (0, 1234, 3711):
        assert len(p.experts_on(g)) == 1


def test_replicas_when_ranks_outnumber_experts():
    m = ModelConfig(num_layers=3, first_dense_layers=1, num_experts=4)
    p = make_placement(m, 10, "shared")
    assert p.replicas(1, 0) == (0, 4, 8) and p.replicas(2, 3) == (3, 7)
    d = make_placement(m, 17, "disjoint")
    assert d.replicas(1, 0) == (0, 8, 16) and d.replicas(2, 3) == (7, 15)


def test_several_experts_per_rank_only_when_forced():
    m = ModelConfig(num_layers=2, first_dense_layers=0, num_experts=8)
    p = make_placement(m, 3, "shared")
    assert [e for _, e in p.experts_on(1) if _ == 0] == [1, 4, 7]
    counts = [len(p.experts_on(g)) for g in range(3)]
    assert max(counts) - min(counts) <= 2  # 8 experts x 2 layers over 3 ranks: 6,6,4


@pytest.mark.parametrize("X", [1, 2, 3, 5, 8, 13, 24, 50])
@pytest.mark.parametrize("kind", ["shared", "disjoint", "auto"])
def test_inverse_agrees_and_everything_is_hosted(X, kind):
    m = ModelConfig()
    p = make_placement(m, X, kind)
    for layer in m.moe_layers:
        for e in range(m.num_experts):
            holders = p.replicas(layer, e)
            assert holders and all(0 <= g < X for g in holders)
            for g in holders:
                assert (layer, e) in p.experts_on(g)
    assert sum(len(p.experts_on(g)) for g in range(X)) == sum(
        len(p.replicas(l, e)) for l in m.moe_layers for e in range(m.num_experts))


def test_parallel_split_checks():
    from moe_hpc.config.roles import check_layout
    assert check_layout(8, 2, 1, 3).expert_ranks == (0, 1, 2)
    with pytest.raises(ConfigError, match="parallel.dp"):
        check_layout(4, 3, 0, 1)
    with pytest.raises(ConfigError, match="parallel.expert_tp"):
        check_layout(4, 1, 1, 2)


def test_roles():
    assert role_layout(4, 0).colocated
    r = role_layout(4, 1)
    assert r.dense_ranks == (3,) and r.expert_ranks == (0, 1, 2) and r.role_of(3) == "dense"
    with pytest.raises(ConfigError, match="parallel.dense_ranks"):
        role_layout(2, 2)


# ------------------------------------------------------------------ placement files

def _saved(tmp_path, p, model, edit=None):
    import h5py

    from moe_hpc.placement.file import save_placement
    path = tmp_path / "p.h5"
    save_placement(path, p, model, {"note": "test"})
    if edit:
        with h5py.File(path, "r+") as f:
            edit(f)
    return path


def test_placement_file_roundtrip_gives_the_same_value(tmp_path):
    m = ModelConfig()
    p = make_placement(m, 5, "shared")
    back = make_placement(m, 5, str(_saved(tmp_path, p, m)))
    assert back.ranks == p.ranks and back.num_expert_ranks == 5 and back.kind.startswith("shared")
    assert not (tmp_path / "p.h5.tmp").exists()


@pytest.mark.parametrize("edit, needle", [
    (lambda f: f.attrs.__setitem__("num_expert_ranks", 4), "planned for 4 expert GPUs"),
    (transform_dataset("ranks", lambda t: t[:2]), "/ranks: shape"),
    (transform_dataset("ranks", lambda t: t + 9), "/ranks: GPU ids"),
    (transform_dataset("ranks", lambda t: np.concatenate([t, t], axis=2)), "same GPU twice"),
    (transform_dataset("ranks", lambda t: np.where(np.arange(t.shape[2]) == 0, -1, t)), "has no GPU"),
    (transform_dataset("ranks", lambda t: t.astype(np.float32)), "not an integer type"),
    (lambda f: f.attrs.__setitem__("format", "moe_hpc.trace/1"), "format"),
    (lambda f: f.attrs.__setitem__("first_moe_layer", 2), "first_moe_layer"),
])
def test_bad_placement_file_names_it(tmp_path, edit, needle):
    from moe_hpc.config.errors import InputError
    m = ModelConfig()
    path = _saved(tmp_path, make_placement(m, 5, "shared"), m, edit)
    with pytest.raises(InputError) as err:
        make_placement(m, 5, str(path))
    assert str(path) in str(err.value) and needle in str(err.value)
