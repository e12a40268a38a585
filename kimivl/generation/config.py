"""GenerationConfig: decoding defaults whose fields are the keys of ``generation_config.json``.

Spec: ``shared/reference/kimivl-spec.md`` §7 (decoding defaults; ``<|im_end|>`` and ``[EOS]`` end a turn)
and §6.2 (their ids in ``tokenizer_config.json``'s ``added_tokens_decoder``).
"""
from __future__ import annotations

import dataclasses
import json
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
        from kimivl.generation.generate import _check_token_ids, _validate  # (that module imports this one)

        try:
            _validate(config)
            if vocab_size is not None:
                _check_token_ids(config.to_dict(), vocab_size)
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
