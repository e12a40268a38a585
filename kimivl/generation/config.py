"""GenerationConfig: decoding defaults whose fields are the keys of ``generation_config.json``, and the checks of
generation settings that ``generate`` and the loader share.

Spec: ``shared/reference/kimivl-spec.md`` §7 (decoding defaults; ``<|im_end|>`` and ``[EOS]`` end a turn)
and §6.2 (their ids in ``tokenizer_config.json``'s ``added_tokens_decoder``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kimivl.errors import KimiVLInputError

GENERATION_CONFIG_NAME = "generation_config.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
# The chat format ends an assistant turn with <|im_end|>; [EOS] ends a document (spec §7).
CHAT_STOP_TOKENS = ("<|im_end|>", "[EOS]")


@dataclass
class GenerationConfig:
    max_new_tokens: int = 512
    min_new_tokens: int | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    eos_token_id: int | list[int] | None = None
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    stop_strings: str | list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationConfig:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        return cls(**known, extra={k: v for k, v in data.items() if k not in names})

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str], *,
                        vocab_size: int | None = None) -> GenerationConfig | None:
        """The checkpoint's ``generation_config.json``, or None when it has none.

        Its values are checked here, as ``generate`` would check them, with the file in the message (a bad value
        would otherwise fail every later ``generate`` naming no file); with ``vocab_size``, its stop and pad ids
        must be token ids below it. A null value counts as unset, and ``top_k: 0`` (transformers' "no top-k") as
        ``None``."""
        path = Path(directory) / GENERATION_CONFIG_NAME
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise KimiVLInputError(f"{path} must hold a JSON object, got a JSON {type(data).__name__}")
        data = {k: v for k, v in data.items() if v is not None}
        if data.get("top_k") == 0 and not isinstance(data["top_k"], bool):
            data["top_k"] = None
        config = cls.from_dict(data)
        try:
            validate_settings(config)
            if vocab_size is not None:
                check_token_ids(config.to_dict(), vocab_size)
        except KimiVLInputError as e:
            raise KimiVLInputError(f"{path}: {e}") from e
        return config

    @classmethod
    def from_checkpoint(cls, directory: str | os.PathLike[str],
                        default_eos_token_id: int | list[int] | None = None, *,
                        vocab_size: int | None = None) -> GenerationConfig:
        """Decoding defaults of a checkpoint directory, with the chat stop ids added.

        Starts from ``generation_config.json`` (or the dataclass defaults; checked as :meth:`from_pretrained`
        says, against ``vocab_size`` when given), then extends ``eos_token_id`` with the ids of
        :data:`CHAT_STOP_TOKENS` found in ``tokenizer_config.json`` and with ``default_eos_token_id`` (the model
        config's ``eos_token_id``), keeping the first occurrence of each.
        """
        config = cls.from_pretrained(directory, vocab_size=vocab_size) or cls()
        extra = [default_eos_token_id] if isinstance(default_eos_token_id, int) else list(default_eos_token_id or [])
        ids = list(dict.fromkeys(config.eos_ids() + chat_stop_ids(directory) + extra))
        return dataclasses.replace(config, eos_token_id=ids or None, extra=dict(config.extra))

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        """Write ``generation_config.json`` (the keys that are set, and the unknown ones read)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        data = {k: v for k, v in self.to_dict().items() if v is not None}
        (directory / GENERATION_CONFIG_NAME).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return out | dict(self.extra)

    def eos_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)


def chat_stop_ids(directory: str | os.PathLike[str]) -> list[int]:
    """Ids of ``<|im_end|>`` and ``[EOS]`` from ``tokenizer_config.json`` (those present; [] without the file)."""
    path = Path(directory) / TOKENIZER_CONFIG_NAME
    if not path.is_file():
        return []
    try:
        decoder = json.loads(path.read_text(encoding="utf-8")).get("added_tokens_decoder") or {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    by_name = {entry.get("content"): int(token_id) for token_id, entry in decoder.items() if isinstance(entry, dict)}
    return [by_name[name] for name in CHAT_STOP_TOKENS if name in by_name]


# ---------------------------------------------------------------------------------------------- checks

# The checks of generation settings: generate's arguments (kimivl.generation.generate) and generation_config.json
# files (GenerationConfig.from_pretrained) give the same messages.
def check_setting(cond: bool, name: str, value: Any, why: str) -> None:
    """A ``KimiVLInputError`` naming the setting and its value unless ``cond``."""
    if not cond:
        raise KimiVLInputError(f"{name} {why}, got {value!r}")


def is_int(value: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_settings(c: GenerationConfig) -> None:
    """Reject values the sampler cannot use; every message names the value. (``pad_token_id`` may be None here:
    :func:`resolve_generation_config` fills it in; a checkpoint's file need not name one.)"""
    # bool only: do_sample="no" is truthy and would turn sampling on
    check_setting(isinstance(c.do_sample, bool), "do_sample", c.do_sample, "must be True or False")
    check_setting(is_int(c.max_new_tokens) and c.max_new_tokens > 0, "max_new_tokens", c.max_new_tokens,
           "must be a positive integer")
    check_setting(c.min_new_tokens is None or (is_int(c.min_new_tokens) and c.min_new_tokens >= 0), "min_new_tokens",
           c.min_new_tokens, "must be an integer >= 0 or None")
    check_setting(is_number(c.temperature) and c.temperature >= 0, "temperature", c.temperature,
           "must be a finite number >= 0")
    check_setting(not (c.do_sample and c.temperature == 0), "temperature", c.temperature,
           "must be > 0 when sampling (use do_sample=False for greedy decoding)")
    check_setting(c.top_k is None or (is_int(c.top_k) and c.top_k > 0), "top_k", c.top_k,
           "must be a positive integer or None (None disables it)")
    check_setting(c.top_p is None or (is_number(c.top_p) and 0 < c.top_p <= 1), "top_p", c.top_p, "must be in (0, 1]")
    check_setting(c.min_p is None or (is_number(c.min_p) and 0 <= c.min_p <= 1), "min_p", c.min_p, "must be in [0, 1]")
    check_setting(is_number(c.repetition_penalty) and c.repetition_penalty > 0, "repetition_penalty",
           c.repetition_penalty, "must be a finite number > 0 (1.0 disables it)")
    check_setting(all(is_int(i) for i in c.eos_ids()), "eos_token_id", c.eos_token_id, "must be an int or a list of ints")
    check_setting(c.pad_token_id is None or is_int(c.pad_token_id), "pad_token_id", c.pad_token_id, "must be an int")
    strings = [c.stop_strings] if isinstance(c.stop_strings, str) else list(c.stop_strings or [])
    check_setting(all(isinstance(s, str) and s for s in strings), "stop_strings", c.stop_strings,
           "must be a non-empty string or a list of them")


def check_token_ids(settings: dict[str, Any], vocab_size: int) -> None:
    """``eos_token_id`` / ``pad_token_id`` among ``settings`` (already type-checked) are ids of the vocabulary: an
    eos id outside it never stops a row, a pad id outside it ends up in the output."""
    eos = settings.get("eos_token_id")
    if eos is not None:
        ids = [eos] if isinstance(eos, int) else list(eos)
        check_setting(all(0 <= i < vocab_size for i in ids), "eos_token_id", eos,
               f"must be token ids of the vocabulary, in [0, {vocab_size})")
    pad = settings.get("pad_token_id")
    if pad is not None:
        check_setting(0 <= pad < vocab_size, "pad_token_id", pad,
               f"must be a token id of the vocabulary, in [0, {vocab_size})")
