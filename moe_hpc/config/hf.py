"""A Hugging Face ``config.json`` -> the ``[model]`` table (docs/models.md).

Five families: ``mixtral``, ``qwen2_moe``, ``qwen3_moe``, ``olmoe``, ``deepseek_v3``. Every field that would make
the model compute something else than the table describes (a scaled RoPE, a sliding window,
clipped q/k/v, dense blocks that are not a prefix of the stack, ...) is refused with an error
naming it, never dropped: the engine runs the model the checkpoint holds or none.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import ConfigError
from .fields import AT_LEAST_0, AT_LEAST_1, POSITIVE, Rule, read_value
from .jsonfile import read_json_object

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")
HF_CONFIG = "config.json"
# transformers' activation names -> ours (the exact functions, not approximations)
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh"}


def is_hf_dir(path: str | Path) -> bool:
    """A directory with a config.json: read as a Hugging Face checkpoint."""
    return Path(path).is_dir()


def read_hf_config(folder: str | Path) -> tuple[dict[str, Any], str]:
    """-> (config.json as a dict, the path for messages)."""
    path = Path(folder) / HF_CONFIG
    values = read_json_object(path, "Hugging Face config")
    return values, str(path)


def _get(c: dict, key: str, where: str, default: Any = ...) -> Any:
    if key in c and c[key] is not None:
        return c[key]
    if default is ...:
        raise ConfigError(f"{where}: missing field {key}")
    return default


def _int(c: dict, key: str, where: str, default: Any = ..., rule: Rule = AT_LEAST_1, prefix: str = "") -> int:
    """An integer field of config.json, its type and range checked (config/fields.py) and named as
    the file names it: true, 8.5 and "eight" are refused, never turned into 1 or 8."""
    return read_value(prefix + key, _get(c, key, where, default), 0, rule, where)


def _float(c: dict, key: str, where: str, default: Any = ..., rule: Rule = POSITIVE, prefix: str = "") -> float:
    return read_value(prefix + key, _get(c, key, where, default), 0.0, rule, where)


def _flag(c: dict, key: str, where: str, default: bool) -> bool:
    return read_value(key, _get(c, key, where, default), False, None, where)


def _table(c: dict, key: str, where: str) -> dict:
    """A nested object of config.json ({} when absent or null)."""
    value = c.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {key} must be a JSON object, got {value!r}")
    return value


def _refuse(cond: bool, where: str, field: str, why: str) -> None:
    if cond:
        raise ConfigError(f"{where}: {field} {why} is not supported (docs/models.md)")


def _rope_theta(c: dict, where: str, default: float) -> float:
    """RoPE base from transformers 5's ``rope_parameters`` or 4's ``rope_theta``/``rope_scaling``."""
    params = _table(c, "rope_parameters", where)
    kind = params.get("rope_type", "default")
    _refuse(kind != "default", where, "rope_parameters.rope_type", f"= {kind!r} (scaled RoPE)")
    _refuse(bool(c.get("rope_scaling")), where, "rope_scaling", f"= {c.get('rope_scaling')!r}")
    _refuse(c.get("partial_rotary_factor", 1.0) not in (None, 1.0), where, "partial_rotary_factor",
            f"= {c.get('partial_rotary_factor')!r}")
    if "rope_theta" in params:
        return _float(params, "rope_theta", where, prefix="rope_parameters.")
    return _float(c, "rope_theta", where, default) if c.get("rope_theta") else default


def _rope_parameters(c: dict, where: str) -> dict:
    """transformers 5's ``rope_parameters``, or the hub's older ``rope_scaling`` beside ``rope_theta``."""
    params = dict(_table(c, "rope_parameters", where) or _table(c, "rope_scaling", where))
    kind = params.pop("type", None)
    params.setdefault("rope_type", kind or "default")
    params.setdefault("rope_theta", c.get("rope_theta") or 1e4)
    return params


YARN_KEYS = {"factor": "rope_factor", "original_max_position_embeddings": "rope_original_max_positions",
             "beta_fast": "rope_beta_fast", "beta_slow": "rope_beta_slow", "mscale": "rope_mscale",
             "mscale_all_dim": "rope_mscale_all_dim", "attention_factor": "rope_attention_factor"}
YARN_RULES = {"mscale": AT_LEAST_0, "mscale_all_dim": AT_LEAST_0, "attention_factor": AT_LEAST_0}   # 0: not given


def _mla_rope(c: dict, where: str) -> dict[str, Any]:
    """DeepSeek-V3's RoPE: default or YaRN (its keys as ``rope_*`` model keys); anything else refused."""
    params = _rope_parameters(c, where)
    kind = params["rope_type"]
    _refuse(kind not in ("default", "yarn"), where, "rope_parameters.rope_type", f"= {kind!r}")
    _refuse(c.get("partial_rotary_factor", 1.0) not in (None, 1.0) or params.get("partial_rotary_factor", 1.0) != 1.0,
            where, "partial_rotary_factor", "!= 1")
    table = {"rope_theta": _float(params, "rope_theta", where, prefix="rope_parameters.")}
    if kind == "yarn":
        _refuse(params.get("truncate", True) is not True, where, "rope_parameters.truncate", "= false")
        unknown = set(params) - set(YARN_KEYS) - {"rope_type", "rope_theta", "truncate"}
        _refuse(bool(unknown), where, "rope_parameters", f"keys {sorted(unknown)}")
        table["rope_scaling"] = "yarn"
        table["rope_original_max_positions"] = (
            _int(params, "original_max_position_embeddings", where, prefix="rope_parameters.")
            if params.get("original_max_position_embeddings") else _int(c, "max_position_embeddings", where))
        for key in ("factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor"):
            if params.get(key) is not None:
                table[YARN_KEYS[key]] = _float(params, key, where, rule=YARN_RULES.get(key, POSITIVE),
                                               prefix="rope_parameters.")
        if "factor" not in params:
            table["rope_factor"] = _int(c, "max_position_embeddings", where) / table["rope_original_max_positions"]
    return table


# What transformers' DeepseekV3Config assumes when config.json leaves a key out: the model a
# user gets from that file is transformers' model, so a missing key means these, not "off".
DSV3_DEFAULTS = {"n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5, "n_shared_experts": 1,
                 "first_k_dense_replace": 3}


def _deepseek_v3(c: dict, where: str, table: dict) -> dict[str, Any]:
    """MLA, sigmoid group-limited routing, shared experts, first_k_dense_replace dense blocks.
    The multi-token-prediction block (``num_nextn_predict_layers``) is not part of the forward
    pass and is not read."""
    _refuse(_flag(c, "attention_bias", where, False), where, "attention_bias", "= true")
    _refuse(c.get("topk_method", "noaux_tc") != "noaux_tc", where, "topk_method", f"= {c.get('topk_method')!r}")
    _refuse(c.get("scoring_func", "sigmoid") != "sigmoid", where, "scoring_func", f"= {c.get('scoring_func')!r}")
    nope, rope = _int(c, "qk_nope_head_dim", where, rule=AT_LEAST_0), _int(c, "qk_rope_head_dim", where)
    table.update(head_dim=nope + rope, num_kv_heads=table["num_heads"], kv_lora_rank=_int(c, "kv_lora_rank", where),
                 q_lora_rank=_int(c, "q_lora_rank", where, 0, AT_LEAST_0), qk_rope_head_dim=rope,
                 v_head_dim=_int(c, "v_head_dim", where), **_mla_rope(c, where))
    E, F = _int(c, "n_routed_experts", where), _int(c, "moe_intermediate_size", where)
    d = DSV3_DEFAULTS
    table.update(num_experts=E, moe_ffn_hidden_size=F, dense_ffn_hidden_size=_int(c, "intermediate_size", where),
                 first_dense_layers=min(_int(c, "first_k_dense_replace", where, d["first_k_dense_replace"], AT_LEAST_0),
                                        table["num_layers"]),
                 shared_expert_ffn_hidden_size=F * _int(c, "n_shared_experts", where, d["n_shared_experts"], AT_LEAST_0),
                 normalize_topk=_flag(c, "norm_topk_prob", where, True), gate_score="sigmoid",
                 expert_groups=_int(c, "n_group", where, d["n_group"]),
                 topk_groups=_int(c, "topk_group", where, d["topk_group"]),
                 routed_scaling_factor=_float(c, "routed_scaling_factor", where, d["routed_scaling_factor"]))
    freq = _int(c, "moe_layer_freq", where, 1)
    _refuse(freq != 1, where, "moe_layer_freq", f"= {freq!r}")
    return table


def rope_interleave(c: dict) -> bool:
    """DeepSeek-V3's RoPE pairs (x0, x1), (x2, x3) ... of the rope dims (transformers' default),
    which the reader turns into the half-split layout by permuting weight columns."""
    return c.get("model_type") == "deepseek_v3" and bool(c.get("rope_interleave", True))


def _first_dense_layers(c: dict, layers: int, where: str) -> int:
    """Blocks are dense where HF's rule says so (in ``mlp_only_layers``, or off the
    ``decoder_sparse_step`` grid); the engine needs them to be a prefix 0..d-1."""
    only = _get(c, "mlp_only_layers", where, [])
    if not isinstance(only, list) or not all(isinstance(l, int) and not isinstance(l, bool) for l in only):
        raise ConfigError(f"{where}: mlp_only_layers must be a list of layer numbers, got {only!r}")
    only = set(only)
    step = _int(c, "decoder_sparse_step", where, 1)
    dense = [l for l in range(layers) if l in only or (l + 1) % step != 0]
    _refuse(dense != list(range(len(dense))), where, "mlp_only_layers / decoder_sparse_step",
            f"making blocks {dense} dense (only a prefix of dense blocks)")
    return len(dense)


def _attention(c: dict, where: str, family: str) -> dict[str, Any]:
    H, nh = _int(c, "hidden_size", where), _int(c, "num_attention_heads", where)
    _refuse(family == "mixtral" and c.get("sliding_window") is not None, where, "sliding_window",
            f"= {c.get('sliding_window')!r}")
    _refuse(_flag(c, "use_sliding_window", where, False), where, "use_sliding_window", "= true")
    _refuse(c.get("clip_qkv") is not None, where, "clip_qkv", f"= {c.get('clip_qkv')!r}")
    kinds = set(c.get("layer_types") or ["full_attention"])
    _refuse(kinds != {"full_attention"}, where, "layer_types", f"= {sorted(kinds)}")
    return {"hidden_size": H, "num_heads": nh, "num_kv_heads": _int(c, "num_key_value_heads", where, nh),
            "head_dim": _int(c, "head_dim", where, H // nh),
            "qk_norm": {"qwen3_moe": "head", "olmoe": "full"}.get(family, "none"),
            # Qwen2-MoE always had q/k/v biases (transformers 5 names the switch qkv_bias)
            "attention_bias": (_flag(c, "qkv_bias", where, True) if family == "qwen2_moe"
                               else _flag(c, "attention_bias", where, False))}


def model_table_from_hf(c: dict[str, Any], where: str) -> dict[str, Any]:
    """config.json (a dict) -> the [model] table (a dict the run config checks like TOML)."""
    family = c.get("model_type")
    if family not in FAMILIES:
        raise ConfigError(f"{where}: model_type {family!r} is not supported (supported: {', '.join(FAMILIES)})")
    act = read_value("hidden_act", _get(c, "hidden_act", where, "silu"), "", None, where)
    _refuse(act not in ACTIVATIONS, where, "hidden_act", f"= {act!r}")
    layers = _int(c, "num_hidden_layers", where)
    table = {"num_layers": layers, "vocab_size": _int(c, "vocab_size", where), "mlp": "gated",
             "activation": ACTIVATIONS[act], "norm_eps": _float(c, "rms_norm_eps", where, 1e-6),
             "tie_embeddings": _flag(c, "tie_word_embeddings", where, False), **_attention(c, where, family),
             "max_position_embeddings": _int(c, "max_position_embeddings", where, 0, rule=AT_LEAST_0)}
    table["top_k"] = _int(c, "num_experts_per_tok", where)
    _quantization(c, where)
    if family == "deepseek_v3":
        return _deepseek_v3(c, where, table)
    table["rope_theta"] = _rope_theta(c, where, 1e6 if family == "mixtral" else 1e4)
    if family == "mixtral":
        F = _int(c, "intermediate_size", where)
        table.update(num_experts=_int(c, "num_local_experts", where), moe_ffn_hidden_size=F,
                     dense_ffn_hidden_size=F, first_dense_layers=0, normalize_topk=True)
        return table
    # the hub's Qwen3-MoE configs say num_experts, transformers 5 writes num_local_experts
    experts = _int(c, "num_experts" if c.get("num_experts") else "num_local_experts", where)
    table.update(num_experts=experts, normalize_topk=_flag(c, "norm_topk_prob", where, False))
    if family == "olmoe":
        F = _int(c, "intermediate_size", where)
        table.update(moe_ffn_hidden_size=F, dense_ffn_hidden_size=F, first_dense_layers=0)
        return table
    table.update(moe_ffn_hidden_size=_int(c, "moe_intermediate_size", where),
                 dense_ffn_hidden_size=_int(c, "intermediate_size", where),
                 first_dense_layers=_first_dense_layers(c, layers, where))
    if family == "qwen2_moe":
        table.update(shared_expert_ffn_hidden_size=_int(c, "shared_expert_intermediate_size", where, rule=AT_LEAST_0),
                     shared_expert_gate=True)
    return table


def fp8_block(c: dict) -> tuple[int, int] | None:
    """The weight block of an FP8 checkpoint (``quantization_config``: ``quant_method`` fp8,
    e4m3 weights, one ``weight_scale_inv`` per block), None for an unquantised one."""
    q = c.get("quantization_config")
    return None if not q else tuple(q.get("weight_block_size", (128, 128)))


def _quantization(c: dict, where: str) -> None:
    q = _table(c, "quantization_config", where)
    if not q:
        return
    _refuse(q.get("quant_method") != "fp8", where, "quantization_config.quant_method", f"= {q.get('quant_method')!r}")
    _refuse(q.get("fmt", "e4m3") != "e4m3", where, "quantization_config.fmt", f"= {q.get('fmt')!r}")
    _refuse(q.get("activation_scheme", "dynamic") != "dynamic", where, "quantization_config.activation_scheme",
            f"= {q.get('activation_scheme')!r}")
    block = q.get("weight_block_size")
    _refuse(not (isinstance(block, list) and len(block) == 2), where, "quantization_config.weight_block_size",
            f"= {block!r} (per-tensor scales)")
    for i, size in enumerate(block):
        read_value(f"quantization_config.weight_block_size[{i}]", size, 0, AT_LEAST_1, where)


def hf_model_table(folder: str | Path) -> tuple[dict[str, Any], str, str]:
    """-> ([model] table, family, config.json path) of a checkpoint directory."""
    values, where = read_hf_config(folder)
    return model_table_from_hf(values, where), values["model_type"], where


def eos_token_ids(folder: str | Path) -> tuple[int, ...]:
    """The checkpoint's end-of-sequence ids: ``eos_token_id`` (one id or a list) of its
    generation_config.json, else of its config.json; () when neither gives one."""
    for name in ("generation_config.json", HF_CONFIG):
        path = Path(folder) / name
        if not path.is_file():
            continue
        value = read_json_object(path, "Hugging Face config").get("eos_token_id")
        ids = value if isinstance(value, list) else [] if value is None else [value]
        if ids:
            return tuple(read_value(f"eos_token_id[{i}]", v, 0, AT_LEAST_0, str(path)) for i, v in enumerate(ids))
    return ()


__all__ = ["FAMILIES", "HF_CONFIG", "is_hf_dir", "eos_token_ids", "read_hf_config", "model_table_from_hf", "hf_model_table",
           "rope_interleave", "fp8_block"]
