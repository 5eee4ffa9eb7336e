"""Config: defaults, presets, --set overrides, and errors that name the key."""
import json

import pytest

from moe_hpc.config.errors import ConfigError
from moe_hpc.config.run_config import build_config, load_config, parse_override

from helpers import REPO, TINY


def test_tiny_preset_is_the_builtin_default():
    # `moe-hpc demo` runs the built-in default; inputs/tiny.toml must describe the same model
    assert load_config(TINY).model == build_config({}).model


@pytest.mark.parametrize("name, layers, moe, experts, H", [
    ("seed61.toml", 61, 58, 64, 7168), ("seed16.toml", 16, 16, 16, 4096)])
def test_seed_presets(name, layers, moe, experts, H):
    m = load_config(REPO / "inputs" / name).model
    assert (m.num_layers, m.num_moe_layers, m.num_experts, m.hidden_size) == (layers, moe, experts, H)


def test_seed16_expert_and_heads():
    m = load_config(REPO / "inputs" / "seed16.toml").model
    assert (m.moe_ffn_hidden_size, m.num_heads, m.head_dim, m.first_dense_layers) == (16384, 32, 128, 0)


def test_set_overrides_are_typed():
    cfg = build_config({}, ["run.micro_batch_tokens=7", "run.device=cpu", "model.norm_eps=1e-5",
                            "model.normalize_topk=false", "parallel.placement=\"shared\""])
    assert cfg.run.micro_batch_tokens == 7 and cfg.run.device == "cpu"
    assert cfg.model.norm_eps == 1e-5 and cfg.model.normalize_topk is False
    assert cfg.parallel.placement == "shared"


def test_override_beats_file(tmp_path):
    cfg = load_config(TINY, ["model.num_experts=4"])
    assert cfg.model.num_experts == 4


@pytest.mark.parametrize("tables, overrides, key", [
    ({"model": {"hiden_size": 3}}, [], "model.hiden_size"),
    ({"model": {"hidden_size": "big"}}, [], "model.hidden_size"),
    ({"model": {"top_k": 9}}, [], "model.top_k"),
    ({"model": {"num_kv_heads": 3}}, [], "model.num_kv_heads"),
    ({"model": {"activation": "relu"}}, [], "model.activation"),
    ({"run": {"micro_batch_tokens": 0}}, [], "run.micro_batch_tokens"),
    ({"run": {"logits": True}}, [], "run.logits"),
    ({}, ["parallel.dense_ranks=-1"], "parallel.dense_ranks"),
    ({}, ["parallel.placement=random"], "parallel.placement"),
    ({}, ["run.bogus=1"], "run.bogus"),
    ({}, ["model.head_dim=15"], "model.head_dim"),
    ({}, ["model.first_dense_layers=9"], "model.first_dense_layers"),
    ({}, ["run.expert_gemm_carveout=-1"], "run.expert_gemm_carveout"),
    ({}, ["parallel.dense_tp=3"], "parallel.dense_tp"),                      # 4 heads
    ({}, ["parallel.dense_stages=5"], "parallel.dense_stages"),              # 4 blocks
    ({}, ["parallel.dense_tp=2", "model.num_heads=6", "model.num_kv_heads=3"], "model.num_kv_heads"),
])
def test_bad_values_name_the_key(tables, overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_config(tables, overrides)


@pytest.mark.parametrize("text", ["noequals", "model=3", "nosuch.key=1", "model.=1"])
def test_malformed_set(text):
    with pytest.raises(ConfigError, match="--set"):
        parse_override(text)


def test_unknown_table_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match=r"\[modle\]"):
        build_config({"modle": {}})
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nhidden_size = 1")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.toml")


def test_config_roundtrips_through_json():
    """What a run stores as provenance (``Config.to_json``) rebuilds the same config: every
    table, every key, non-default values included."""
    cfg = build_config({}, ["model.num_experts=16", "model.activation=silu", "parallel.dense_ranks=1",
                            "parallel.placement=shared", "run.micro_batch_tokens=64", "run.balance=true",
                            "run.balance_gamma=0.5"])
    back = build_config(json.loads(cfg.to_json()), where=cfg.source)
    assert back == cfg
    assert back.model.num_experts == 16 and back.run.balance_gamma == 0.5 and back.parallel.placement == "shared"
    assert set(json.loads(cfg.to_json())) == {"model", "parallel", "run"}


def test_dense_tp_layouts_are_checked_against_the_rank_count():
    from moe_hpc.config.roles import check_layout
    roles = check_layout(4, 1, 2, 1, dense_tp=2)
    assert roles.dense_ranks == (2, 3) and roles.dense_groups == 1 and roles.dense_group_of(3) == (0, 1)
    with pytest.raises(ConfigError, match=r"parallel\.dense_tp x parallel\.dense_stages = 2 x 1 does not divide the 3"):
        check_layout(3, 1, 0, 1, dense_tp=2)
    staged = check_layout(8, 1, 0, 1, dense_tp=2, dense_stages=2)
    # stage 0: ranks 0-3 (pipelines 0, 1 of 2 ranks each), stage 1: ranks 4-7
    assert [staged.stage_of(r) for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert staged.dense_groups == 2 and staged.dense_group_of(6) == (1, 0) and staged.stage_peer(2, 1) == 6


def test_dense_tp_shards_heads_kv_heads_and_columns():
    """Members hold disjoint query heads; kv heads split when the members divide them and are
    replicated when they do not; the shards' shapes add up to the block's."""
    import numpy as np
    from moe_hpc.config.run_config import ModelConfig
    from moe_hpc.model.dense_tp import head_range, kv_range, local_model, shard_dense_layer
    m = ModelConfig(num_heads=8, num_kv_heads=2, head_dim=4, hidden_size=16, dense_ffn_hidden_size=12)
    assert [list(kv_range(m, 4, r)) for r in range(4)] == [[0], [0], [1], [1]]       # replicated
    assert [list(kv_range(m, 2, r)) for r in range(2)] == [[0], [1]]                 # split
    assert sorted(h for r in range(4) for h in head_range(m, 4, r)) == list(range(8))
    lm = local_model(m, 4)
    assert (lm.num_heads, lm.kv_heads, lm.dense_ffn_hidden_size) == (2, 1, 3)
    from moe_hpc.model.weights import AttentionWeights, BlockWeights, MlpWeights
    z = np.zeros
    layer = BlockWeights(AttentionWeights(attn_norm=z(16), wq=z((16, 32)), wk=z((16, 8)), wv=z((16, 8)),
                                          wo=z((32, 16)), mlp_norm=z(16)), MlpWeights(z((16, 12)), z(12), z((12, 16)), None))
    s = shard_dense_layer(layer, m, 4, 3)
    a, f = s.attention, s.mlp
    assert (a.wq.shape, a.wk.shape, a.wo.shape, f.w1.shape, f.b1.shape, f.w2.shape) == \
        ((16, 8), (16, 4), (8, 16), (16, 3), (3,), (3, 16))


def test_stage_blocks_cover_the_model_in_order():
    from moe_hpc.config.roles import stage_blocks
    assert stage_blocks(61, 2) == [range(0, 30), range(30, 61)]
    assert [len(r) for r in stage_blocks(4, 3)] == [1, 1, 2]
    assert sum(len(r) for r in stage_blocks(61, 7)) == 61
