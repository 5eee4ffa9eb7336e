"""Config: defaults, presets, --set overrides, and errors that name the key."""
import dataclasses
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
    assert set(json.loads(cfg.to_json())) == {"model", "parallel", "run", "generate"}


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


# ---------------------------------------------------------------- typed fields (issue 21 item 5)

def _number_fields():
    from moe_hpc.config.cluster import DeploymentSpec, GpuSpec, NetworkSpec
    from moe_hpc.config.run_config import ModelConfig, ParallelConfig, RunConfig
    for cls in (ModelConfig, ParallelConfig, RunConfig, GpuSpec, NetworkSpec, DeploymentSpec):
        for f in dataclasses.fields(cls):
            if isinstance(f.default, (int, float)) and not isinstance(f.default, bool):
                yield cls.__name__, f


def test_every_number_key_has_a_range_rule():
    """A new int or float key cannot skip its range: declare it with fields.checked(default, rule)."""
    from moe_hpc.config.fields import rule_of
    found = list(_number_fields())
    assert len(found) > 40
    missing = [f"{cls}.{f.name}" for cls, f in found if rule_of(f) is None]
    assert not missing, f"number keys without a rule (use config.fields.checked): {missing}"
    for cls, f in found:
        assert rule_of(f).allows(f.default), f"{cls}.{f.name}: its default breaks its own rule"


@pytest.mark.parametrize("override, message", [
    ("run.micro_batch_tokens=99999999999999999999999",
     "run.micro_batch_tokens must be at most 2147483647 (sizes and counts are C ints), got 99999999999999999999999"),
    ("model.hidden_size=2147483648", "model.hidden_size must be at most 2147483647"),
    ("run.chunk_sequences=true", "run.chunk_sequences must be an integer, got True"),
    ("model.num_experts=8.5", "model.num_experts must be an integer, got 8.5"),
    ("model.num_experts=eight", "model.num_experts must be an integer, got 'eight'"),
    ("run.attention_block=0", "run.attention_block must be >= 1, got 0"),
    ("model.norm_eps=0", "model.norm_eps must be > 0, got 0.0"),
    ("model.rope_beta_slow=-1", "model.rope_beta_slow must be > 0, got -1.0"),
    ("run.balance_threshold=1", "run.balance_threshold must be > 1 (max/mean load is never below 1), got 1.0"),
    ("parallel.gpus_per_node=-2", "parallel.gpus_per_node must be >= 0, got -2"),
])
def test_set_values_are_typed_and_ranged(override, message):
    with pytest.raises(ConfigError) as exc:
        build_config({}, [override])
    assert message in str(exc.value)


def test_cluster_ints_are_capped_and_typed():
    from moe_hpc.config.cluster import build_cluster
    with pytest.raises(ConfigError, match=r"c.toml: cluster.nodes must be at most 2147483647"):
        build_cluster({"cluster": {"nodes": 2 ** 40, "gpus_per_node": 8}}, "c.toml")
    with pytest.raises(ConfigError, match=r"c.toml: deployment.seq_len must be an integer, got 8.5"):
        build_cluster({"cluster": {"nodes": 1, "gpus_per_node": 8}, "deployment": {"seq_len": 8.5}}, "c.toml")
    with pytest.raises(ConfigError, match=r"c.toml: deployment.dense_gpus must be >= -1 \(-1: the config's"):
        build_cluster({"cluster": {"nodes": 1, "gpus_per_node": 8}, "deployment": {"dense_gpus": -2}}, "c.toml")


def test_replaced_configs_are_ranged_by_validate():
    from moe_hpc.config.run_config import validate
    cfg = build_config({})
    bad = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, chunk_sequences=0))
    with pytest.raises(ConfigError, match=r"run.chunk_sequences must be >= 1, got 0"):
        validate(bad)


HF_BAD = [  # (family, key, value, message after "config.json: ")
    ("mixtral", "num_local_experts", "eight", "num_local_experts must be an integer, got 'eight'"),
    ("mixtral", "num_local_experts", 8.5, "num_local_experts must be an integer, got 8.5"),
    ("mixtral", "hidden_size", True, "hidden_size must be an integer, got True"),
    ("mixtral", "num_hidden_layers", 10 ** 30, "num_hidden_layers must be at most 2147483647"),
    ("mixtral", "num_experts_per_tok", 0, "num_experts_per_tok must be >= 1, got 0"),
    ("mixtral", "rms_norm_eps", "small", "rms_norm_eps must be a finite number, got 'small'"),
    ("mixtral", "tie_word_embeddings", "no", "tie_word_embeddings must be true or false, got 'no'"),
    ("qwen3_moe", "num_experts", "8", "num_experts must be an integer, got '8'"),
    ("qwen2_moe", "decoder_sparse_step", 0, "decoder_sparse_step must be >= 1, got 0"),
    ("qwen2_moe", "mlp_only_layers", [0.5], "mlp_only_layers must be a list of layer numbers"),
    ("deepseek_v3", "n_group", 2.0, "n_group must be an integer, got 2.0"),
    ("deepseek_v3", "routed_scaling_factor", -1, "routed_scaling_factor must be > 0, got -1"),
    ("deepseek_v3", "rope_parameters", "yarn", "rope_parameters must be a JSON object, got 'yarn'"),
]


@pytest.mark.parametrize("family, key, value, message", HF_BAD, ids=[f"{f}-{k}" for f, k, *_ in HF_BAD])
def test_hf_config_json_fields_are_typed_and_ranged(family, key, value, message):
    from helpers import fixture
    from moe_hpc.config.hf import model_table_from_hf
    values = json.loads((fixture(family) / "config.json").read_text())
    values[key] = value
    with pytest.raises(ConfigError) as exc:
        model_table_from_hf(values, "ckpt/config.json")
    assert str(exc.value).startswith(f"ckpt/config.json: {message}"), exc.value


def test_pipeline_waves_are_at_most_the_chunks_sequences():
    """More waves than sequences would be empty waves (and 2^31 of them exhaust memory)."""
    assert build_config({}, ["run.chunk_sequences=4", "run.pipeline_waves=4"]).run.pipeline_waves == 4
    with pytest.raises(ConfigError, match=r"run.pipeline_waves \(5\) must be <= run.chunk_sequences \(4\)"):
        build_config({}, ["run.chunk_sequences=4", "run.pipeline_waves=5"])
