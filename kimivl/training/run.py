"""Building a run from :class:`TrainingArguments`: model (checkpoint or fresh), processor, trainer.

``train(config)`` is what ``kimivl train CONFIG.yaml`` and ``python -m kimivl.train`` call; Python code
can pass its own ``model``, ``processor`` and ``train_data`` (e.g. a callable producing conversations).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from kimivl.configuration import KimiVLConfig
from kimivl.modeling import KimiVLForConditionalGeneration
from kimivl.processing import KimiVLProcessor
from kimivl.training import parallel
from kimivl.training.config import TrainingArguments, load_training_args
from kimivl.training.init import init_weights
from kimivl.training.trainer import Trainer, TrainResult

logger = logging.getLogger(__name__)


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name).replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype {name!r} is not a torch dtype (float32, bfloat16, float16)")
    return dtype


def build_model(args: TrainingArguments, device: torch.device | str | None = None) -> KimiVLForConditionalGeneration:
    """``args.model`` loaded with ``from_pretrained`` onto ``device`` (default: the CPU), or (``from_scratch``)
    built from its ``config.json`` and initialised by :func:`kimivl.training.init.init_weights` with ``args.seed``,
    then moved. In ``args.dtype`` (the router's ``e_score_correction_bias`` stays float32)."""
    if not args.model:
        raise ValueError("training config: set model (a checkpoint directory, or a directory with config.json "
                         "and from_scratch: true)")
    dtype = _dtype(args.dtype)
    if not args.from_scratch:  # straight onto the device: a 16B model's weights never pass through host memory twice
        return KimiVLForConditionalGeneration.from_pretrained(args.model, dtype=dtype, device=device)
    model = init_weights(KimiVLForConditionalGeneration(KimiVLConfig.from_pretrained(args.model)), seed=args.seed)
    if dtype != torch.float32:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.is_floating_point() and not name.endswith("e_score_correction_bias"):
                    p.data = p.data.to(dtype)
    return model.to(device) if device is not None else model


def build_processor(args: TrainingArguments) -> KimiVLProcessor:
    source = args.processor or args.model
    if not source:
        raise ValueError("training config: set processor or model (a directory with the tokenizer files)")
    return KimiVLProcessor.from_pretrained(source)


def train(config: TrainingArguments | dict[str, Any] | str | Path, *, model: KimiVLForConditionalGeneration | None = None,
          processor: KimiVLProcessor | None = None, train_data: Any = None,
          overrides: dict[str, Any] | None = None) -> TrainResult:
    """Run one fine-tuning job. ``config``: arguments, a dict of YAML keys, or a YAML/JSON path; ``overrides``
    replace single keys. ``model`` / ``processor`` / ``train_data`` replace what the config would build."""
    overrides = dict(overrides or {})
    if isinstance(config, (str, Path)):
        args = load_training_args(config, **overrides)
    elif isinstance(config, dict):
        args = TrainingArguments.from_dict({**config, **overrides})
    else:
        args = config.replace(**overrides) if overrides else config
    torch.manual_seed(args.seed)
    device = parallel.resolve_device(args.device)  # a device that is not there fails before any loading
    if model is None:  # the vision stage trains the tower alone: the rest of the model stays on the CPU
        model = build_model(args, device=device if args.stage == "sft" else None)
    processor = processor if processor is not None else build_processor(args)
    if args.stage == "vision":
        from kimivl.training.vision_stage import VisionStageTrainer

        return VisionStageTrainer(model, processor, args, train_data).train()
    return Trainer(model, processor, args, train_data).train()
