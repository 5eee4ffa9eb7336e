"""Run configuration: the `[model]`, `[parallel]` and `[run]` tables of a TOML file.

Every key has a default and a check; an error names the key (``model.hidden_size``) and the
file it came from.  ``--set table.key=value`` overrides are applied before validation, so they
are checked exactly like keys written in the file.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from .errors import ConfigError
from .fields import AT_LEAST_0, AT_LEAST_1, FRACTION, POSITIVE, Rule, checked, in_range, read_value, rule_of

ACTIVATIONS = ("gelu", "gelu_tanh", "silu")
MLP_KINDS = ("plain", "gated")
GATED = "gated-"   # kernels' MLP kind for a gated MLP: "gated-<activation>" ([gate | up] fused w1)
QK_NORMS = ("none", "head", "full")
GATE_SCORES = ("softmax", "sigmoid")
ROPE_SCALINGS = ("none", "yarn")
MLA_NORM_EPS = 1e-6   # the MLA latents' RMSNorms (q_a_norm, kv_a_norm) use this eps, not norm_eps
PLACEMENTS = ("auto", "shared", "disjoint")
DEVICES = ("cpu", "gpu", "auto")
ATTENTION_CORES = ("auto", "cudnn", "tiles")
OUTPUT_DTYPES = ("bfloat16", "float32")
TRANSPORTS = ("auto", "mpi", "mpi-staged", "nccl", "ipc")
LOAD_RATIO = Rule(1, open_low=True, note="max/mean load is never below 1")


@dataclass(frozen=True)
class ModelConfig:
    """The SPEC model table. Defaults are the tiny preset's shape family."""
    hidden_size: int = checked(64, AT_LEAST_1)
    num_layers: int = checked(4, AT_LEAST_1)
    first_dense_layers: int = checked(1, AT_LEAST_0)
    num_heads: int = checked(4, AT_LEAST_1)
    num_kv_heads: int = checked(0, AT_LEAST_0)           # 0 or absent: same as num_heads (plain MHA)
    head_dim: int = checked(16, AT_LEAST_1)
    dense_ffn_hidden_size: int = checked(256, AT_LEAST_0)
    moe_ffn_hidden_size: int = checked(128, AT_LEAST_1)
    num_experts: int = checked(8, AT_LEAST_1)
    top_k: int = checked(2, AT_LEAST_1)
    activation: str = "gelu"
    norm_eps: float = checked(1e-6, POSITIVE)
    rope_theta: float = checked(10000.0, POSITIVE)
    normalize_topk: bool = True
    vocab_size: int = checked(0, AT_LEAST_0)
    # The variants of the Hugging Face families (docs/models.md); each default is SPEC's model.
    mlp: str = "plain"              # plain: act(x w1 + b1) w2 + b2 | gated: (act(x w1) * (x w3)) w2
    shared_expert_ffn_hidden_size: int = checked(0, AT_LEAST_0)   # >0: a shared expert beside the routed ones
    shared_expert_gate: bool = False         # scale the shared expert by sigmoid(m . shared_gate)
    qk_norm: str = "none"           # none | head: RMSNorm per head [D] | full: over all heads [nh*D]
    attention_bias: bool = False    # q, k, v projections have biases bq, bk, bv
    tie_embeddings: bool = False    # the LM head is embed transposed (no /lm_head)
    # DeepSeek-V3: multi-head latent attention (MLA) when kv_lora_rank > 0; head_dim is then the
    # q/k head width, its last qk_rope_head_dim values the RoPE part (docs/models.md)
    kv_lora_rank: int = checked(0, AT_LEAST_0)           # >0: k/v from a compressed latent of this width (MLA)
    q_lora_rank: int = checked(0, AT_LEAST_0)            # MLA: >0 q through a low-rank latent of this width, 0 directly
    qk_rope_head_dim: int = checked(0, AT_LEAST_0)       # MLA: the RoPE part of each q/k head
    v_head_dim: int = checked(0, AT_LEAST_0)             # MLA: width of each value head
    rope_scaling: str = "none"      # none | yarn (MLA only): scaled RoPE and its attention-scale factor
    rope_factor: float = checked(1.0, POSITIVE)        # yarn: context extension factor
    rope_original_max_positions: int = checked(0, AT_LEAST_0)   # yarn: the pretraining context length
    rope_beta_fast: float = checked(32.0, POSITIVE)    # yarn: rotations where interpolation stops
    rope_beta_slow: float = checked(1.0, POSITIVE)     # yarn: rotations where extrapolation stops
    rope_mscale: float = checked(0.0, AT_LEAST_0)        # yarn: mscale (0: not given)
    rope_mscale_all_dim: float = checked(0.0, AT_LEAST_0)   # yarn: mscale_all_dim (0: not given)
    rope_attention_factor: float = checked(0.0, AT_LEAST_0)  # yarn: cos/sin scale (0: inferred from the mscales)
    # the router: softmax or sigmoid scores, optionally group-limited, weights times a factor
    gate_score: str = "softmax"     # softmax | sigmoid
    expert_groups: int = checked(1, AT_LEAST_1)          # group-limited routing: experts in this many equal groups
    topk_groups: int = checked(1, AT_LEAST_1)            # ... of which the best this many are kept (by top-2 score sums)
    routed_scaling_factor: float = checked(1.0, POSITIVE)   # the routed experts' combine weights are multiplied by it
    max_position_embeddings: int = checked(0, AT_LEAST_0)   # longest sequence the model was trained for (0: not known)

    @property
    def ffn_kind(self) -> str:
        """What the MLP kernels are told: the activation, prefixed "gated-" for gated MLPs,
        whose first weight is [gate | up] side by side (``checkpoint.fuse_gate_up``)."""
        return f"{GATED}{self.activation}" if self.mlp == "gated" else self.activation

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def mla(self) -> bool:
        """Multi-head latent attention (DeepSeek-V3) instead of q/k/v projections."""
        return self.kv_lora_rank > 0

    @property
    def plain_qkv(self) -> bool:
        """q, k and v are plain projections (no biases, no q/k norms, no latent): what the GPU's
        fused attention path runs (model/attention.py: fuse_qkv); other layers attend in tiles."""
        return not self.mla and not self.attention_bias and self.qk_norm == "none"

    @property
    def attn_out_dim(self) -> int:
        """Width of one head's attention output (the value head): v_head_dim under MLA."""
        return self.v_head_dim if self.mla else self.head_dim

    @property
    def gate_rule(self) -> dict:
        """How the gate scores and chooses beyond SPEC's softmax top-k (kernels.gate_topk's keywords)."""
        return {"score": self.gate_score, "groups": self.expert_groups, "keep_groups": self.topk_groups,
                "scale": self.routed_scaling_factor}

    @property
    def moe_layers(self) -> range:
        """Block indices that hold an MoE MLP."""
        return range(self.first_dense_layers, self.num_layers)

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.first_dense_layers

    def is_moe(self, layer: int) -> bool:
        return layer >= self.first_dense_layers

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


@dataclass(frozen=True)
class ParallelConfig:
    """How ranks are split into roles and where experts live."""
    dense_ranks: int = checked(0, AT_LEAST_0)            # 0: co-located roles; D > 0: D dense ranks, the rest experts
    placement: str = "auto"         # auto | shared | disjoint | path to a PLACEMENT.h5
    gpus_per_node: int = checked(0, AT_LEAST_0)          # 0: discovered from the shared-memory communicator
    dp: int = checked(1, AT_LEAST_1)                     # data-parallel replicas, each a full expert-parallel group
    expert_tp: int = checked(1, AT_LEAST_1)              # ranks sharing one expert (w1 by columns, w2 by rows)
    dense_tp: int = checked(1, AT_LEAST_1)               # dense ranks sharing attention (by heads) and the dense MLP
    dense_stages: int = checked(1, AT_LEAST_1)           # pipeline stages of contiguous blocks on their own dense ranks


@dataclass(frozen=True)
class RunConfig:
    """Batching, device and output settings. None of them changes the result beyond bf16."""
    micro_batch_tokens: int = checked(4096, AT_LEAST_1)  # tokens per dispatch/combine exchange
    expert_gemm_carveout: int = checked(24, AT_LEAST_0)  # GPU, > 1 rank: SMs the expert GEMMs leave to the exchange (0: none)
    chunk_sequences: int = checked(64, AT_LEAST_1)       # sequences a dense rank reads, computes and writes at once
    attention_block: int = checked(512, AT_LEAST_1)      # query rows per attention block (bounds score memory)
    attention: str = "auto"         # auto | cudnn | tiles: the GPU's attention core (the CPU tiles)
    cuda_graphs: bool = True        # one-rank GPU decode steps replay a CUDA graph per batch size
    pipeline_waves: int = checked(1, AT_LEAST_1)         # >1: waves of sequences flow through the blocks one step apart
    device: str = "cpu"             # cpu | gpu | auto
    output_dtype: str = "bfloat16"  # dtype of /hidden in the output file
    logits: bool = False            # also write /logits (needs vocab_size > 0)
    logprobs: bool = False          # also write /logprobs: log p(next input token) [S, L]
    transport: str = "auto"         # auto | mpi | mpi-staged | nccl | ipc (GPU); the CPU uses mpi
    cuda_aware_mpi: str = "auto"    # auto | yes | no: whether MPI takes device buffers
    balance: bool = False           # move selection biases against load at run time (changes routing)
    balance_threshold: float = checked(1.2, LOAD_RATIO)  # act when a micro-batch's max/mean expert load exceeds this
    balance_gamma: float = checked(0.001, POSITIVE)    # bias step per action: b_e += gamma * sign(mean - load_e)
    allow_long_sequences: bool = False   # run sequences past model.max_position_embeddings
    memory_limit_gib: float = checked(0.0, AT_LEAST_0)   # >0: GiB a rank may use at most (the planner's check; also on the CPU)


@dataclass(frozen=True)
class GenerateConfig:
    """``moe-hpc generate``: how many tokens to add and how each is picked (docs/generate.md)."""
    max_new_tokens: int = checked(16, AT_LEAST_1)        # N: tokens added to each prompt at most
    ignore_eos: bool = False        # keep going past end-of-sequence ids
    temperature: float = checked(0.0, AT_LEAST_0)      # 0: greedy (argmax); > 0: sample from logits / T
    top_k: int = checked(0, AT_LEAST_0)                  # sampling: keep the k most likely tokens (0: all)
    top_p: float = checked(1.0, FRACTION)               # sampling: the smallest set of mass >= p (1: all)
    seed: int = checked(0, AT_LEAST_0)                   # sampling: the counter-based generator's key
    decode_slots: int = checked(0, AT_LEAST_0)           # KV cache rows of a dense rank (0: its whole group)

    def cache_rows(self, group: int) -> int:
        """The KV cache rows ("slots") a dense rank holds for a group of ``group`` sequences:
        all of them, or at most ``decode_slots``, which the group's sequences take in turn as
        earlier ones finish (continuous batching, docs/generate.md)."""
        return min(self.decode_slots, group) if self.decode_slots else group


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    run: RunConfig = field(default_factory=RunConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    source: str = "<defaults>"

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in TABLES}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def with_model(self, model: ModelConfig) -> "Config":
        return dataclasses.replace(self, model=model)


TABLES = {"model": ModelConfig, "parallel": ParallelConfig, "run": RunConfig, "generate": GenerateConfig}


def coerce(table: str, key: str, value: Any, default: Any, where: str, rule: Rule | None = None) -> Any:
    """Check one value against the type of its default and its range rule (config/fields.py)."""
    return read_value(f"{table}.{key}", value, default, rule, where)


def build_table(table: str, values: dict[str, Any], where: str, cls=None):
    """One TOML table -> an instance of ``cls`` (default: the run config's class for ``table``),
    each value checked against the type of its default."""
    cls = cls or TABLES[table]
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{where}: unknown key {table}.{key} (known: {', '.join(known)})")
        kwargs[key] = coerce(table, key, value, known[key].default, where, rule_of(known[key]))
    if table == "model" and not kwargs.get("num_kv_heads"):
        kwargs["num_kv_heads"] = kwargs.get("num_heads", known["num_heads"].default)   # SPEC default
    return cls(**kwargs)


def parse_override(text: str) -> tuple[str, str, Any]:
    """``"run.micro_batch_tokens=64"`` -> ("run", "micro_batch_tokens", 64).

    The value is read as a TOML value; anything that is not valid TOML is taken as a string,
    so ``--set run.device=gpu`` needs no quotes.
    """
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected table.key=value")
    dotted, raw = text.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or parts[0] not in TABLES or not parts[1]:
        raise ConfigError(f"--set {text!r}: the key must be one of "
                          f"{', '.join(t + '.<key>' for t in TABLES)}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return parts[0], parts[1], value


def build_config(tables: dict[str, Any], overrides: list[str] = (), where: str = "<config>") -> Config:
    """Make a validated Config from parsed TOML tables plus ``--set`` overrides."""
    unknown = set(tables) - set(TABLES)
    if unknown:
        raise ConfigError(f"{where}: unknown table [{sorted(unknown)[0]}] (known: {', '.join(TABLES)})")
    for name in TABLES:
        if not isinstance(tables.get(name, {}), dict):
            raise ConfigError(f"{where}: [{name}] must be a table")
    merged = {name: dict(tables.get(name, {})) for name in TABLES}
    for text in overrides:
        table, key, value = parse_override(text)
        merged[table][key] = value
    cfg = Config(**{name: build_table(name, merged[name], where) for name in TABLES}, source=where)
    validate(cfg)
    return cfg


def read_toml(path: str | Path, what: str = "config") -> dict[str, Any]:
    """Parse a TOML file; an unreadable or malformed file is a ConfigError naming it."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read and validate a TOML run config, or a Hugging Face checkpoint directory, whose
    config.json gives the [model] table (the other tables keep their defaults)."""
    from .hf import hf_model_table, is_hf_dir
    if is_hf_dir(path):
        table, _, where = hf_model_table(path)
        return build_config({"model": table}, overrides, where=where)
    return build_config(read_toml(path), overrides, where=str(path))


def model_from_json(text: str, where: str) -> ModelConfig:
    """The checkpoint's `config` attribute (JSON of the model table) -> ModelConfig."""
    try:
        values = json.loads(text)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: attribute 'config' is not valid JSON: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: attribute 'config' must be a JSON object")
    model = build_table("model", values, where)
    _validate_model(model, where)
    return model


def split_kind(kind: str) -> tuple[bool, str]:
    """A kernels' MLP kind -> (gated, activation): "gated-silu" -> (True, "silu")."""
    return (True, kind[len(GATED):]) if kind.startswith(GATED) else (False, kind)


def _require(cond: bool, where: str, key: str, why: str) -> None:
    if not cond:
        raise ConfigError(f"{where}: {key} {why}")


def _validate_model(m: ModelConfig, where: str) -> None:
    _require(0 <= m.first_dense_layers <= m.num_layers, where, "model.first_dense_layers",
             f"must be in [0, num_layers={m.num_layers}], got {m.first_dense_layers}")
    if m.first_dense_layers > 0:
        _require(m.dense_ffn_hidden_size >= 1, where, "model.dense_ffn_hidden_size",
                 "must be >= 1 when there are dense blocks")
    _require(m.num_heads % m.kv_heads == 0, where, "model.num_kv_heads",
             f"({m.kv_heads}) must divide num_heads ({m.num_heads})")
    _require(m.head_dim % 2 == 0, where, "model.head_dim", f"must be even for RoPE, got {m.head_dim}")
    _require(m.top_k <= m.num_experts, where, "model.top_k",
             f"({m.top_k}) must be <= num_experts ({m.num_experts})")
    _require(m.activation in ACTIVATIONS, where, "model.activation",
             f"must be one of {', '.join(ACTIVATIONS)}, got {m.activation!r}")
    _require(m.mlp in MLP_KINDS, where, "model.mlp", f"must be one of {', '.join(MLP_KINDS)}, got {m.mlp!r}")
    _require(m.qk_norm in QK_NORMS, where, "model.qk_norm",
             f"must be one of {', '.join(QK_NORMS)}, got {m.qk_norm!r}")
    _require(not m.shared_expert_gate or m.shared_expert_ffn_hidden_size > 0, where, "model.shared_expert_gate",
             "needs model.shared_expert_ffn_hidden_size > 0 (there is no shared expert to gate)")
    _require(not m.tie_embeddings or m.vocab_size > 0, where, "model.tie_embeddings",
             "needs model.vocab_size > 0 (there is no embedding to tie)")
    _validate_mla(m, where)
    _validate_router(m, where)


def _validate_mla(m: ModelConfig, where: str) -> None:
    _require(m.rope_scaling in ROPE_SCALINGS, where, "model.rope_scaling",
             f"must be one of {', '.join(ROPE_SCALINGS)}, got {m.rope_scaling!r}")
    if not m.mla:
        _require(m.q_lora_rank == 0 and m.qk_rope_head_dim == 0 and m.v_head_dim == 0, where,
                 "model.q_lora_rank/qk_rope_head_dim/v_head_dim", "need model.kv_lora_rank > 0 (MLA)")
        _require(m.rope_scaling == "none", where, "model.rope_scaling", "is supported with MLA only")
        return
    _require(0 < m.qk_rope_head_dim < m.head_dim and m.qk_rope_head_dim % 2 == 0, where, "model.qk_rope_head_dim",
             f"must be even and in (0, head_dim = {m.head_dim}), got {m.qk_rope_head_dim}")
    _require(m.v_head_dim >= 1, where, "model.v_head_dim", "must be >= 1 with MLA")
    _require(m.kv_heads == m.num_heads, where, "model.num_kv_heads", "must equal num_heads with MLA")
    _require(m.qk_norm == "none" and not m.attention_bias, where, "model.qk_norm/attention_bias",
             "are not supported with MLA")
    if m.rope_scaling == "yarn":
        _require(m.rope_factor >= 1.0, where, "model.rope_factor", f"must be >= 1, got {m.rope_factor}")
        _require(m.rope_original_max_positions >= 1, where, "model.rope_original_max_positions", "must be >= 1 with yarn")


def _validate_router(m: ModelConfig, where: str) -> None:
    _require(m.gate_score in GATE_SCORES, where, "model.gate_score",
             f"must be one of {', '.join(GATE_SCORES)}, got {m.gate_score!r}")
    G = m.expert_groups
    _require(m.num_experts % G == 0, where, "model.expert_groups",
             f"({G}) must divide num_experts ({m.num_experts})")
    _require(1 <= m.topk_groups <= G, where, "model.topk_groups", f"must be in [1, expert_groups = {G}]")
    _require(m.top_k <= m.topk_groups * (m.num_experts // G), where, "model.top_k",
             f"({m.top_k}) must be <= the experts of the kept groups ({m.topk_groups * (m.num_experts // G)})")


def _check_rules(cfg: Config) -> None:
    """Each field's own range again: a Config changed with ``dataclasses.replace`` (the planner's
    candidates) never went through ``build_table``."""
    for table in TABLES:
        values = getattr(cfg, table)
        for f in fields(values):
            in_range(f"{table}.{f.name}", getattr(values, f.name), rule_of(f), cfg.source)


def validate(cfg: Config) -> None:
    """Raise ConfigError naming the first bad key."""
    where = cfg.source
    _check_rules(cfg)
    _validate_model(cfg.model, where)
    p, r = cfg.parallel, cfg.run
    _require(p.placement in PLACEMENTS or p.placement.endswith(".h5"), where, "parallel.placement",
             f"must be one of {', '.join(PLACEMENTS)} or a placement file (*.h5), got {p.placement!r}")
    _require(cfg.model.moe_ffn_hidden_size % p.expert_tp == 0, where, "parallel.expert_tp",
             f"({p.expert_tp}) must divide model.moe_ffn_hidden_size ({cfg.model.moe_ffn_hidden_size})")
    m, T = cfg.model, p.dense_tp
    _require(m.num_heads % T == 0, where, "parallel.dense_tp", f"({T}) must divide model.num_heads ({m.num_heads})")
    _require(m.kv_heads % T == 0 or T % m.kv_heads == 0, where, "parallel.dense_tp",
             f"({T}) and model.num_kv_heads ({m.kv_heads}) must divide one another (kv heads are split "
             "or replicated)")
    _require(m.first_dense_layers == 0 or m.dense_ffn_hidden_size % T == 0, where, "parallel.dense_tp",
             f"({T}) must divide model.dense_ffn_hidden_size ({m.dense_ffn_hidden_size})")
    _require(1 <= p.dense_stages <= m.num_layers, where, "parallel.dense_stages",
             f"must be in [1, model.num_layers = {m.num_layers}], got {p.dense_stages}")
    _require(r.pipeline_waves <= r.chunk_sequences, where, "run.pipeline_waves",
             f"({r.pipeline_waves}) must be <= run.chunk_sequences ({r.chunk_sequences}): a wave is at least "
             "one of the chunk's sequences")
    _require(r.attention in ATTENTION_CORES, where, "run.attention",
             f"must be one of {', '.join(ATTENTION_CORES)}, got {r.attention!r}")
    _require(r.device in DEVICES, where, "run.device", f"must be one of {', '.join(DEVICES)}, got {r.device!r}")
    _require(r.output_dtype in OUTPUT_DTYPES, where, "run.output_dtype",
             f"must be one of {', '.join(OUTPUT_DTYPES)}, got {r.output_dtype!r}")
    _require(r.transport in TRANSPORTS, where, "run.transport",
             f"must be one of {', '.join(TRANSPORTS)}, got {r.transport!r}")
    _require(r.cuda_aware_mpi in ("auto", "yes", "no"), where, "run.cuda_aware_mpi",
             f"must be auto, yes or no, got {r.cuda_aware_mpi!r}")
    _require(not r.logits or cfg.model.vocab_size > 0, where, "run.logits",
             "needs model.vocab_size > 0 (there is no lm_head)")
    _require(not r.logprobs or cfg.model.vocab_size > 0, where, "run.logprobs",
             "needs model.vocab_size > 0 (token inputs and an lm_head)")
    _require(m.qk_norm != "full" or T == 1, where, "parallel.dense_tp",
             f"({T}) must be 1 with model.qk_norm = full (the norm spans every head)")



def config_files(cfg: Config) -> tuple[Path, ...]:
    """The files this config was read from (the TOML, an HF folder's config.json) and the ones
    it names as inputs (a placement file): an output may never be one of them."""
    named = [cfg.source]
    if cfg.parallel.placement.endswith(".h5"):
        named.append(cfg.parallel.placement)
    return tuple(Path(n) for n in named if n and not n.startswith("<") and Path(n).exists())

__all__ = ["config_files", "Config", "ModelConfig", "ParallelConfig", "RunConfig", "GenerateConfig", "load_config", "build_config",
           "parse_override", "model_from_json", "validate", "build_table", "read_toml", "TABLES"]
