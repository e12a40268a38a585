"""Configuration dataclasses whose fields are the keys of the official ``config.json``.

Spec: ``shared/reference/kimivl-spec.md`` §1. Official classes: ``MoonViTConfig``,
``DeepseekV3Config`` and ``KimiVLConfig`` of the hub remote code. Keys this project does not
know are kept in ``extra`` and written back by ``to_dict()``, so a config round-trips losslessly.
Runtime choices (dtype, device, attention backend) are never config fields.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from kimivl.fieldtypes import type_problem

logger = logging.getLogger(__name__)

T = TypeVar("T", bound="_ConfigBase")


class _ConfigBase:
    """Shared dict/JSON plumbing for the three config sections."""

    _nested: ClassVar[dict[str, type]] = {}

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__}.from_dict expects a dict, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls) if f.name != "extra"}
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in data.items():
            if key in cls._nested and isinstance(value, dict):
                kwargs[key] = cls._nested[key].from_dict(value)
            elif key in names:
                kwargs[key] = value
            else:
                extra[key] = value
        if extra:
            logger.debug("%s: keeping unknown keys %s", cls.__name__, sorted(extra))
        return cls(**kwargs, extra=extra)  # type: ignore[call-arg]

    def __getattr__(self, name: str) -> Any:
        """Keys this project does not know read as attributes too (``config.text_config.some_new_key``), as in
        Hugging Face configs."""
        extra = self.__dict__.get("extra")
        if extra is None or name not in extra:
            raise AttributeError(f"{type(self).__name__} has no field or config.json key {name!r}")
        return extra[name]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, _ConfigBase) else _plain(value)
        out.update(_plain(self.extra))  # type: ignore[attr-defined]
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    def _check_types(self, section: str) -> None:
        """Every known key holds a value of its annotated JSON type (a quoted "64" for a width would otherwise
        fail deep inside torch when the model is built)."""
        problem = type_problem(self)
        if problem is not None:
            name, value, must = problem
            raise ValueError(f"{section}.{name} = {value!r}: must be {must}, got {type(value).__name__}")


def _plain(value: Any) -> Any:
    """Deep-copy JSON-like values so a config never shares lists/dicts with its caller."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _require(cond: bool, section: str, key: str, value: Any, why: str) -> None:
    if not cond:
        raise ValueError(f"{section}.{key} = {value!r}: {why}")


def _require_positive(obj: Any, section: str, keys: tuple[str, ...]) -> None:
    """Sizes, counts and lengths: 0 or a negative value builds empty or negative-sized tensors that fail far from
    the config (or, for some, silently compute nonsense)."""
    for key in keys:
        value = getattr(obj, key)
        _require(value > 0, section, key, value, "must be > 0")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# The numbers of a rope_scaling block that kimivl.ops.rope reads (YaRN, DeepSeek-V3's key names) and the bound
# each must respect: the betas and the original length go into logarithms, factor divides the frequencies.
# Only `factor` is required; ops/rope.py has defaults for the others.
_ROPE_SCALING_NUMBERS: dict[str, str] = {
    "factor": "> 0",
    "original_max_position_embeddings": "> 0",
    "beta_fast": "> 0",
    "beta_slow": "> 0",
    "mscale": ">= 0",
    "mscale_all_dim": ">= 0",
}


def _check_rope_scaling(rope_scaling: dict[str, Any] | None) -> None:
    """Null, a 'default' block or a 'yarn' block whose numbers ops/rope.py can use (checked here: a missing
    ``factor`` was a bare KeyError at the first forward)."""
    if rope_scaling is None:
        return
    kind = rope_scaling.get("type", rope_scaling.get("rope_type"))
    if kind not in (None, "default", "yarn"):
        raise ValueError(f"text_config.rope_scaling = {rope_scaling!r}: only null or a 'yarn' block is supported")
    if kind == "yarn" and "factor" not in rope_scaling:
        raise ValueError(f"text_config.rope_scaling = {rope_scaling!r}: a 'yarn' block needs a 'factor' (how many "
                         "times the original context is extended, a number > 0)")
    for key, bound in _ROPE_SCALING_NUMBERS.items():
        if key not in rope_scaling:
            continue
        value = rope_scaling[key]
        ok = _is_number(value) and (value > 0 if bound == "> 0" else value >= 0)
        _require(ok, "text_config", f"rope_scaling.{key}", value, f"must be a finite number {bound}")


@dataclass
class MoonViTConfig(_ConfigBase):
    """``vision_config``: the MoonViT encoder (SigLIP-SO-400M shaped in the releases)."""

    model_type: str = "moonvit"
    patch_size: int = 14
    init_pos_emb_height: int = 64
    init_pos_emb_width: int = 64
    num_attention_heads: int = 16
    num_hidden_layers: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    merge_kernel_size: list[int] = field(default_factory=lambda: [2, 2])
    torch_dtype: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # Size of the precomputed 2-D RoPE table of the official code (patches per side). Images
    # must stay strictly below it; the processor checks against the same constant.
    rope_max_grid: ClassVar[int] = 512

    def __post_init__(self) -> None:
        s = "vision_config"
        self._check_types(s)
        _require_positive(self, s, ("patch_size", "init_pos_emb_height", "init_pos_emb_width", "num_attention_heads",
                                    "num_hidden_layers", "hidden_size", "intermediate_size"))
        _require(self.hidden_size % self.num_attention_heads == 0, s, "hidden_size", self.hidden_size,
                 f"must be divisible by num_attention_heads={self.num_attention_heads}")
        _require(self.head_dim % 4 == 0, s, "hidden_size", self.hidden_size,
                 f"head_dim {self.head_dim} must be divisible by 4 for the 2-D RoPE")
        self.merge_kernel_size = list(self.merge_kernel_size)
        _require(len(self.merge_kernel_size) == 2, s, "merge_kernel_size", self.merge_kernel_size,
                 "must have two entries (height, width)")
        _require(min(self.merge_kernel_size) > 0, s, "merge_kernel_size", self.merge_kernel_size,
                 "must be > 0 in both entries")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class DeepseekV3Config(_ConfigBase):
    """``text_config``: the Moonlight / DeepSeek-V3 MoE decoder. Defaults = Kimi-VL-A3B values."""

    model_type: str = "deepseek_v3"
    vocab_size: int = 163840
    hidden_size: int = 2048
    intermediate_size: int = 11264
    moe_intermediate_size: int = 1408
    num_hidden_layers: int = 27
    num_nextn_predict_layers: int = 0
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    n_shared_experts: int | None = 2
    n_routed_experts: int | None = 64
    ep_size: int = 1
    routed_scaling_factor: float = 2.446
    kv_lora_rank: int = 512
    q_lora_rank: int | None = None
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    topk_method: str = "noaux_tc"
    n_group: int = 1
    topk_group: int = 1
    num_experts_per_tok: int = 6
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 1
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    pad_token_id: int | None = 163839
    bos_token_id: int | None = 163584
    eos_token_id: int | list[int] | None = 163585
    pretraining_tp: int = 1
    tie_word_embeddings: bool = False
    rope_theta: float = 800000.0
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    torch_dtype: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    TOPK_METHODS: ClassVar[tuple[str, ...]] = ("noaux_tc", "greedy", "group_limited_greedy")
    SCORING_FUNCS: ClassVar[tuple[str, ...]] = ("sigmoid", "softmax")

    def __post_init__(self) -> None:
        s = "text_config"
        self._check_types(s)
        _require_positive(self, s, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                    "num_attention_heads", "num_key_value_heads", "kv_lora_rank", "qk_rope_head_dim",
                                    "v_head_dim", "max_position_embeddings", "rope_theta"))
        _require(self.qk_nope_head_dim >= 0, s, "qk_nope_head_dim", self.qk_nope_head_dim, "must be >= 0")
        _require(self.q_lora_rank is None or self.q_lora_rank > 0, s, "q_lora_rank", self.q_lora_rank,
                 "must be > 0 or null (no query compression)")
        # eps <= 0 does not fail: a zero-variance row (e.g. padding) turns into NaN logits
        _require(_is_number(self.rms_norm_eps) and self.rms_norm_eps > 0, s, "rms_norm_eps", self.rms_norm_eps,
                 "must be a finite number > 0")
        _require(self.topk_method in self.TOPK_METHODS, s, "topk_method", self.topk_method,
                 f"must be one of {self.TOPK_METHODS}")
        _require(self.scoring_func in self.SCORING_FUNCS, s, "scoring_func", self.scoring_func,
                 f"must be one of {self.SCORING_FUNCS}")
        _require(self.hidden_act == "silu", s, "hidden_act", self.hidden_act, "only 'silu' is implemented")
        _require(self.n_routed_experts is None or self.n_routed_experts >= 0, s, "n_routed_experts",
                 self.n_routed_experts, "must be >= 0 or null (0 / null: no MoE layers)")
        if self.n_routed_experts:
            _require_positive(self, s, ("moe_intermediate_size", "n_group"))
            _require(self.n_routed_experts % self.n_group == 0, s, "n_routed_experts", self.n_routed_experts,
                     f"must be divisible by n_group={self.n_group}")
            _require(1 <= self.topk_group <= self.n_group, s, "topk_group", self.topk_group,
                     f"must be in [1, n_group={self.n_group}]")
            _require(1 <= self.num_experts_per_tok <= self.n_routed_experts, s, "num_experts_per_tok",
                     self.num_experts_per_tok, f"must be in [1, n_routed_experts={self.n_routed_experts}]")
            _require(self.moe_layer_freq >= 1, s, "moe_layer_freq", self.moe_layer_freq, "must be >= 1")
        _require(self.qk_rope_head_dim % 2 == 0, s, "qk_rope_head_dim", self.qk_rope_head_dim, "must be even")
        _check_rope_scaling(self.rope_scaling)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        """The official rule: routed experts exist, past the dense prefix, on the MoE frequency."""
        return bool(self.n_routed_experts) and layer_idx >= self.first_k_dense_replace and (
            layer_idx % self.moe_layer_freq == 0
        )


@dataclass
class KimiVLConfig(_ConfigBase):
    """Top-level ``config.json`` of a Kimi-VL checkpoint (``model_type = "kimi_vl"``)."""

    vision_config: MoonViTConfig = field(default_factory=MoonViTConfig)
    text_config: DeepseekV3Config = field(default_factory=DeepseekV3Config)
    architectures: list[str] | None = field(default_factory=lambda: ["KimiVLForConditionalGeneration"])
    model_type: str = "kimi_vl"
    ignore_index: int = -100
    media_placeholder_token_id: int = 163605
    pad_token_id: int | None = 0
    torch_dtype: str | None = "bfloat16"
    extra: dict[str, Any] = field(default_factory=dict)

    _nested: ClassVar[dict[str, type]] = {"vision_config": MoonViTConfig, "text_config": DeepseekV3Config}

    def __post_init__(self) -> None:
        if isinstance(self.vision_config, dict):
            self.vision_config = MoonViTConfig.from_dict(self.vision_config)
        if isinstance(self.text_config, dict):
            self.text_config = DeepseekV3Config.from_dict(self.text_config)
        self._check_types("config")
        _require(0 <= self.media_placeholder_token_id < self.text_config.vocab_size, "config",
                 "media_placeholder_token_id", self.media_placeholder_token_id,
                 f"must be a token id below text_config.vocab_size={self.text_config.vocab_size}")

    @classmethod
    def from_json_file(cls, path: str | os.PathLike[str]) -> KimiVLConfig:
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON: {e}") from e
            except UnicodeDecodeError as e:  # e.g. `kimivl info photo.png`: the codec's message names no file
                raise ValueError(f"{path} is not a config.json: it is not UTF-8 text ({e.reason} at byte "
                                 f"{e.start})") from e
        if not isinstance(data, dict):
            raise ValueError(f"{path} is not a config.json: it holds a JSON {type(data).__name__}, not an object")
        return cls.from_dict(data)

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike[str], *, revision: str | None = None,
                        cache_dir: str | None = None, trust_remote_code: bool | None = None) -> KimiVLConfig:
        """Read ``config.json`` from a checkpoint directory, a config file or a hub id (``trust_remote_code`` is
        accepted for Hugging Face examples and changes nothing)."""
        from kimivl.checkpoint import resolve_checkpoint_dir

        del trust_remote_code  # no checkpoint code is ever run
        path = Path(path_or_id)
        if path.is_file():
            return cls.from_json_file(path)
        directory = resolve_checkpoint_dir(path_or_id, revision=revision, cache_dir=cache_dir)
        if not (directory / "config.json").is_file():
            present = sorted(p.name for p in directory.iterdir())[:8]
            raise FileNotFoundError(f"no config.json in {directory}: not a Kimi-VL checkpoint directory "
                                    f"(it holds {present or 'nothing'})")
        return cls.from_json_file(directory / "config.json")

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(self.to_json_string(), encoding="utf-8")
