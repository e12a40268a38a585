"""The vision stage: MoonViT trained on image-level labels before the joint (chat) stage.

Kimi-VL trains MoonViT on its own before the language model sees its features (paper §2.3: a CoCa-style
ViT stage, then joint pre-training). A model trained from scratch needs the same order: measured on the
demo task family (docs/demo-model.md), a randomly initialised decoder reads the image tokens with
near-uniform attention -- a mean pool -- and through that read-out MoonViT does not learn shapes at all,
while the same tower trained first with a max-pooled head learns them in a few hundred steps, and a
decoder on that frozen tower then learns to read them.

This stage is the supervised form of it that fits a CPU budget. Every record is one image with labels,
``{"image": <PIL image | path | bytes>, "labels": {"shape": "circle", "count": "3"}}``; each label set
named in ``vision_labels`` (``{"shape": ["circle", "square", "triangle"], ...}``) gets a LayerNorm +
linear head on the image's merged tokens, max- and mean-pooled, or, for a set that ``vision_pooling`` maps
to ``sum`` (counts), per-token logits summed over the image. The loss is the mean cross-entropy over
all (image, label) pairs of the step. The loop, optimizer, schedule, checkpoints and resumption are the
SFT trainer's (:class:`kimivl.training.trainer.Trainer`); the export is the whole Kimi-VL checkpoint in the
official layout with the trained tower (the heads live only in the stage's checkpoints), ready for the
next stage (``freeze: [vision_tower]``).
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kimivl.errors import KimiVLInputError
from kimivl.processing import KimiVLProcessor
from kimivl.processing.media import load_image
from kimivl.training.config import TrainingArguments
from kimivl.training.export import export_pretrained
from kimivl.training.trainer import Trainer


@dataclass
class LabelledImage:
    """One image of the vision stage: patches (L, 3, p, p), grid (1, 2), label index per label set."""

    pixel_values: torch.Tensor
    image_grid_hws: torch.Tensor
    labels: dict[str, int]


def image_token_counts(grid_hws: torch.Tensor, merge: Sequence[int]) -> list[int]:
    """Merged tokens of each packed image."""
    kh, kw = (int(k) for k in merge)
    return [(int(h) // kh) * (int(w) // kw) for h, w in grid_hws.tolist()]


def pool_image_tokens(features: torch.Tensor, grid_hws: torch.Tensor, merge: Sequence[int]) -> torch.Tensor:
    """(T, kh*kw, D) merged tokens of N packed images -> (N, 2 * kh*kw*D): per image, max and mean."""
    flat = features.flatten(1)
    return torch.stack([torch.cat([t.amax(0), t.mean(0)]) for t in flat.split(image_token_counts(grid_hws, merge))])


class SumPooledHead(nn.Module):
    """A counting head: LayerNorm + linear logits per merged token, summed over the image and divided by a
    fixed ``tokens_ref`` (the token budget of a full-size image), plus one bias.

    The logits are linear in how many tokens fire, so "how many" is a threshold per class, whatever the
    image's size; a max/mean pool cannot count (the mean divides by the token count, the max saturates).
    The fixed divisor keeps one optimizer step from moving the logits ``tokens_ref`` times further than a
    pooled head's (measured: without it, the first steps on counting images threw the loss from 0.4 to 5
    and the gradient norm to 350). The projection starts at zero, so the head starts at chance."""

    def __init__(self, width: int, classes: int, tokens_ref: int = 64) -> None:
        super().__init__()
        self.tokens_ref = tokens_ref
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, classes, bias=False)
        self.bias = nn.Parameter(torch.zeros(classes))
        nn.init.zeros_(self.proj.weight)

    def forward(self, tokens: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """(T, width) merged tokens of the packed images -> (N, classes)."""
        per_token = self.proj(self.norm(tokens))
        return torch.stack([t.sum(0) for t in per_token.split(counts)]) / self.tokens_ref + self.bias


class PooledLabelHeads(nn.Module):
    """``vision_tower`` (shared with the Kimi-VL model, same parameters) + one head per label set."""

    def __init__(self, vision_tower: nn.Module, label_sets: dict[str, Sequence[str]],
                 pooling: dict[str, str] | None = None, tokens_ref: int = 64) -> None:
        super().__init__()
        pooling = dict(pooling or {})
        if unknown := sorted(set(pooling) - set(label_sets)):
            raise ValueError(f"vision stage: pooling names {unknown}, which are not label sets ({sorted(label_sets)})")
        if not label_sets:
            raise ValueError("vision stage: vision_labels is empty; name at least one label set and its classes")
        for name, classes in label_sets.items():
            if len(classes) < 2 or len(set(classes)) != len(classes):
                raise ValueError(f"vision stage: label set {name!r} needs >= 2 distinct classes, got {list(classes)}")
        config = vision_tower.config
        self.merge = tuple(int(k) for k in config.merge_kernel_size)
        token_width = math.prod(self.merge) * config.hidden_size
        self.vision_tower = vision_tower
        self.label_sets = {name: list(classes) for name, classes in label_sets.items()}
        self.pooling = {name: pooling.get(name, "max_mean") for name in self.label_sets}
        self.heads = nn.ModuleDict({
            name: SumPooledHead(token_width, len(classes), tokens_ref) if self.pooling[name] == "sum"
            else nn.Sequential(nn.LayerNorm(2 * token_width), nn.Linear(2 * token_width, len(classes)))
            for name, classes in self.label_sets.items()})

    def forward(self, pixel_values: torch.Tensor, image_grid_hws: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits (N, classes) of every head for the N packed images (every parameter takes part, as DDP
        expects)."""
        features = self.vision_tower(pixel_values, image_grid_hws)
        counts = image_token_counts(image_grid_hws, self.merge)
        pooled = pool_image_tokens(features, image_grid_hws, self.merge) \
            if "max_mean" in self.pooling.values() else None
        return {name: head(features.flatten(1), counts) if self.pooling[name] == "sum" else head(pooled)
                for name, head in self.heads.items()}

    @staticmethod
    def loss_sum(logits: dict[str, torch.Tensor], labels: list[dict[str, int]]) -> tuple[torch.Tensor, int]:
        """Summed cross-entropy over every (image, label) pair, and the number of pairs."""
        total, pairs = next(iter(logits.values())).new_zeros((), dtype=torch.float32), 0
        for name, head_logits in logits.items():
            rows = [i for i, lab in enumerate(labels) if name in lab]
            if rows:
                target = torch.tensor([labels[i][name] for i in rows], device=head_logits.device)
                total = total + F.cross_entropy(head_logits[rows].float(), target, reduction="sum")
                pairs += len(rows)
        return total, pairs

    @torch.no_grad()
    def predict(self, pixel_values: torch.Tensor, image_grid_hws: torch.Tensor) -> list[dict[str, str]]:
        """Every head's class name for each of the packed images."""
        picks = {name: x.argmax(-1).tolist() for name, x in self(pixel_values, image_grid_hws).items()}
        n = len(image_grid_hws)
        return [{name: self.label_sets[name][picks[name][i]] for name in picks} for i in range(n)]


def encode_labelled_image(processor: KimiVLProcessor, record: Any, label_sets: dict[str, list[str]]) -> LabelledImage:
    """``{"image": ..., "labels": {...}}`` -> patches, grid and class indices (errors name the bad label)."""
    if not isinstance(record, dict) or "image" not in record or not isinstance(record.get("labels"), dict):
        got = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise KimiVLInputError(f"a vision-stage record is {{'image': ..., 'labels': {{set: class}}}}; got {got}")
    labels: dict[str, int] = {}
    for name, value in record["labels"].items():
        if name not in label_sets:
            raise KimiVLInputError(f"vision-stage record: label set {name!r} is not in vision_labels "
                                   f"({sorted(label_sets)})")
        classes = label_sets[name]
        if str(value) not in classes:
            raise KimiVLInputError(f"vision-stage record: {name} = {value!r} is not one of its {len(classes)} "
                                   f"classes {classes}")
        labels[name] = classes.index(str(value))
    if not labels:
        raise KimiVLInputError("vision-stage record has no labels")
    pixel_values, (h, w) = processor.image_processor.process_image(load_image(record["image"]))
    return LabelledImage(pixel_values, torch.tensor([[h, w]], dtype=torch.int64), labels)


class VisionStageTrainer(Trainer):
    """The SFT loop on :class:`PooledLabelHeads` (see the module docstring). ``model`` is the whole
    Kimi-VL model; only its ``vision_tower`` and the heads train, and ``export`` writes the whole model."""

    def __init__(self, model: nn.Module, processor: KimiVLProcessor, args: TrainingArguments,
                 train_data: Any = None, **kwargs: Any) -> None:
        if args.lora:
            raise ValueError("training config: stage 'vision' trains the tower itself; lora is not supported there")
        if not args.vision_labels:
            raise ValueError("training config: stage 'vision' needs vision_labels, e.g. "
                             "{shape: [circle, square, triangle]}")
        self.full_model = model
        # A sum-pooled head divides by the merged tokens of an image at the processor's token budget.
        merged = math.prod(model.vision_tower.config.merge_kernel_size)
        tokens_ref = max(1, processor.image_processor.in_token_limit // merged)
        probe = PooledLabelHeads(model.vision_tower, args.vision_labels, args.vision_pooling, tokens_ref)
        probe = probe.to(next(model.parameters()).device)
        # Router statistics have nothing to watch here (no decoder in the graph).
        super().__init__(probe, processor, args.replace(router_stats=False), train_data, **kwargs)
        self.label_sets = probe.label_sets

    @property
    def base_model(self) -> nn.Module:
        return self.model

    def _examples(self) -> Iterator[LabelledImage]:
        for _, record in self._records():
            yield record if isinstance(record, LabelledImage) else \
                encode_labelled_image(self.processor, record, self.label_sets)

    def _collate(self, examples: list[LabelledImage]) -> dict[str, Any]:
        return {"pixel_values": torch.cat([ex.pixel_values for ex in examples]),
                "image_grid_hws": torch.cat([ex.image_grid_hws for ex in examples]),
                "labels": [ex.labels for ex in examples]}

    def _count(self, batch: dict[str, Any]) -> tuple[float, float]:
        """(labelled pairs, patches) of one micro-batch: the loss is the mean over pairs."""
        return float(sum(len(lab) for lab in batch["labels"])), float(batch["pixel_values"].shape[0])

    def _forward_backward(self, batch: dict[str, Any], tokens_in_step: float, sync: bool) -> tuple[float, float]:
        device = self.engine.device
        pixel_values = batch["pixel_values"].to(device, self.engine.input_dtype)
        with self.engine.sync_context(sync):
            logits = self.engine.model(pixel_values, batch["image_grid_hws"].to(device))
            loss_sum, _ = PooledLabelHeads.loss_sum(logits, batch["labels"])
            self.engine.backward(loss_sum * (self.dist.world / tokens_in_step))
        return float(loss_sum.detach()), 0.0

    def export(self, directory: str | Path | None = None) -> Path | None:
        """The whole Kimi-VL model (trained tower, the rest as built) in the official layout."""
        directory = Path(directory or self.args.export_dir or self.output_dir / "final")
        if not self.is_main:
            return None
        return export_pretrained(self.full_model, directory, sources=self.asset_dirs)
