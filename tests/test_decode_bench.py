"""The decode bench's HBM roofline (tools/decode_bench.py) against a hand count, on CPU."""
import re
from types import SimpleNamespace

import pytest

from moe_hpc.config.errors import ConfigError
from moe_hpc.config.run_config import load_config
from moe_hpc.planner.memory import kv_cache_bytes_per_token
from moe_hpc.tools.decode_bench import (DECODE_VOCAB, check_decode_arguments, decode_overrides, decode_roofline,
                                        touched_experts_bound)

EIGHT_BLOCKS = ["model.num_layers=8", "model.first_dense_layers=3"]


def _seed61_8(extra=()):
    return load_config("inputs/seed61.toml", EIGHT_BLOCKS + list(extra)).model


def test_seed61_mha_cache_is_512_kib_per_token_over_8_blocks():
    m = _seed61_8()
    assert 8 * kv_cache_bytes_per_token(m) == 512 * 2 ** 10
    # the "about 36 GiB": 64 sequences x (1,024 + 128) positions
    assert 64 * (1024 + 128) * 8 * kv_cache_bytes_per_token(m) == 36 * 2 ** 30


def test_mla_cache_holds_the_latent_and_the_rope_key():
    m = SimpleNamespace(mla=True, kv_lora_rank=512, qk_rope_head_dim=64, kv_heads=128, head_dim=192)
    assert kv_cache_bytes_per_token(m) == (512 + 64) * 2


def test_decode_roofline_of_seed61_8_blocks_by_hand():
    m = _seed61_8(decode_overrides([]))
    H, nhD, B, V = 7168, 128 * 128, 64, DECODE_VOCAB
    experts = touched_experts_bound(m, 64, B)
    assert experts == 64                                   # 64 tokens x top-2 reach every one of 64
    attention = 8 * (4 * H * nhD + 2 * H)                  # wq wk wv wo, two norms
    dense_mlp = 3 * (2 * H * 18432 + 18432 + H)            # w1 b1 w2 b2 (gelu, not gated)
    moe = 5 * (H * 64 + 64 * H)                            # gate, every expert's output bias
    head = V * H + H + H * V                               # embed, final norm, LM head
    expert_bytes = 5 * 64 * (2 * H * 2048 + 2048)          # w1 b1 w2 of each expert
    weights = 2 * (attention + dense_mlp + moe + head + expert_bytes) + 4 * 5 * 64   # and the fp32 gate biases
    kv = B * 1088 * 8 * 2 * 128 * 128 * 2                  # 64 sequences x a 1,088-position cache
    r = decode_roofline(m, B, 1088, 4.8, experts)
    assert r["weight_bytes"] == weights
    assert r["kv_read_bytes"] == kv
    assert r["roofline_ms"] == pytest.approx((weights + kv) / 4.8e12 * 1e3)
    assert 13.0 < r["roofline_ms"] < 13.6                  # weights ~28.0 GB + KV 36.5 GB at 4.8 TB/s


def test_fewer_tokens_than_experts_bound_the_experts_read():
    m = _seed61_8()
    assert touched_experts_bound(m, 64, 16) == 32
    assert touched_experts_bound(m, 64, 1) == 2


@pytest.mark.parametrize("change, message", [
    ({"model_layers": 0}, "--decode needs --model-layers N"),
    ({"new_tokens": 4}, "--new-tokens must be >= --warmup + 2 = 5"),
    ({"decode_batch": 0}, "--decode-batch must be >= 1"),
])
def test_decode_bench_arguments_refused_before_gpu_work(change, message):
    args = SimpleNamespace(model_layers=8, decode_batch=64, prompt_len=1024, new_tokens=128, warmup=3)
    for k, v in change.items():
        setattr(args, k, v)
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_decode_arguments(args)
