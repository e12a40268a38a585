"""Export of a trained model as a complete checkpoint directory in the official layout.

``config.json`` + (sharded) safetensors with the official keys (``KimiVLForConditionalGeneration
.save_pretrained``), plus the processor and decoding files copied from the source checkpoint
(``tokenizer_config.json``, ``tiktoken.model``, ``preprocessor_config.json``, ``chat_template.jinja``,
``generation_config.json`` when present), so the directory loads with ``from_pretrained`` in this
project, in the official remote code and in serving engines that read the official format.
"""
from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from kimivl.modeling import KimiVLForConditionalGeneration

logger = logging.getLogger(__name__)

PROCESSOR_FILES = ("tokenizer_config.json", "tiktoken.model", "preprocessor_config.json", "chat_template.jinja",
                   "generation_config.json", "special_tokens_map.json", "chat_template.json")
REQUIRED_PROCESSOR_FILES = ("tokenizer_config.json", "tiktoken.model")


def copy_processor_files(directory: str | os.PathLike[str], sources: Sequence[str | os.PathLike[str] | None]) -> list[str]:
    """Copy each of ``PROCESSOR_FILES`` from the first source directory holding it; returns the names copied."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in PROCESSOR_FILES:
        for src in sources:
            if src is None:
                continue
            path = Path(src) / name
            if path.is_file():
                if path.resolve() != (directory / name).resolve():
                    shutil.copyfile(path, directory / name)
                copied.append(name)
                break
    missing = [n for n in REQUIRED_PROCESSOR_FILES if n not in copied]
    if missing:
        logger.warning("export %s: no %s found in %s; the directory holds the model only", directory,
                       ", ".join(missing), [str(s) for s in sources if s is not None])
    return copied


def export_pretrained(model: KimiVLForConditionalGeneration, directory: str | os.PathLike[str], *,
                      sources: Sequence[str | os.PathLike[str] | None] = (), max_shard_size: int | str = "5GB",
                      state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``model`` (a plain, unwrapped model; merge LoRA first) and the processor files to ``directory``.

    ``state_dict`` (official keys) replaces ``model.state_dict()``, e.g. the gathered full weights of a
    sharded run, with ``model`` then only supplying the config.
    """
    directory = Path(directory)
    if state_dict is None:
        model.save_pretrained(directory, max_shard_size=max_shard_size)
    else:
        from kimivl.checkpoint import save_weights
        from kimivl.configuration import KimiVLConfig

        config = KimiVLConfig.from_dict(model.config.to_dict())
        dtype = next(v.dtype for k, v in state_dict.items() if k.endswith("lm_head.weight"))
        name = str(dtype).replace("torch.", "")
        config.torch_dtype = config.vision_config.torch_dtype = config.text_config.torch_dtype = name
        config.save_pretrained(directory)
        save_weights(state_dict, directory, max_shard_size=max_shard_size)
    copy_processor_files(directory, sources)
    return directory
