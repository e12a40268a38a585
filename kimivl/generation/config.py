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
    def from_pretrained(cls, directory: str | os.PathLike[str]) -> GenerationConfig | None:
        """The checkpoint's ``generation_config.json``, or None when it has none."""
        path = Path(directory) / GENERATION_CONFIG_NAME
        if not path.is_file():
            return None
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e

    @classmethod
    def from_checkpoint(cls, directory: str | os.PathLike[str],
                        default_eos_token_id: int | list[int] | None = None) -> GenerationConfig:
        """Decoding defaults of a checkpoint directory, with the chat stop ids added.

        Starts from ``generation_config.json`` (or the dataclass defaults), then extends ``eos_token_id``
        with the ids of :data:`CHAT_STOP_TOKENS` found in ``tokenizer_config.json`` and with
        ``default_eos_token_id`` (the model config's ``eos_token_id``), keeping the first occurrence of each.
        """
        config = cls.from_pretrained(directory) or cls()
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
