"""Batching SFT examples: pad the token rows, concatenate the image patches of the whole batch.

Spec: ``shared/reference/kimivl-spec.md`` §6.1: the model splices image features into the
``<|media_pad|>`` rows in order, left to right and row by row across the batch, so the patches
(``pixel_values`` (L, 3, p, p)) and grids (``image_grid_hws`` (N, 2)) of all examples are concatenated
in batch order. Images of any sizes mix freely (MoonViT packs them with block-diagonal attention).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from kimivl.errors import KimiVLInputError
from kimivl.processing import IGNORE_INDEX
from kimivl.training.data import SFTExample


def collate(examples: Sequence[SFTExample], pad_token_id: int, *, padding_side: str = "right",
            pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Examples -> ``input_ids``, ``labels``, ``attention_mask`` (B, S) int64 and, when any example has
    images, ``pixel_values`` (sum L, 3, p, p) and ``image_grid_hws`` (sum N, 2).

    Pads hold ``pad_token_id``, label ``-100`` and mask 0. Right padding is the default for training:
    positions are ``cumsum(mask) - 1`` either way, so the side does not change the loss.
    """
    if not examples:
        raise KimiVLInputError("cannot collate an empty batch")
    if padding_side not in ("left", "right"):
        raise KimiVLInputError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    longest = max(ex.num_tokens for ex in examples)
    if pad_to_multiple_of:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    b = len(examples)
    input_ids = torch.full((b, longest), pad_token_id, dtype=torch.int64)
    labels = torch.full((b, longest), IGNORE_INDEX, dtype=torch.int64)
    attention_mask = torch.zeros((b, longest), dtype=torch.int64)
    for i, ex in enumerate(examples):
        if ex.labels.shape != ex.input_ids.shape:
            raise KimiVLInputError(f"example {i}: labels {tuple(ex.labels.shape)} and input_ids "
                                   f"{tuple(ex.input_ids.shape)} differ in shape")
        n = ex.num_tokens
        cols = slice(0, n) if padding_side == "right" else slice(longest - n, longest)
        input_ids[i, cols] = ex.input_ids
        labels[i, cols] = ex.labels
        attention_mask[i, cols] = 1
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    with_images = [ex for ex in examples if ex.pixel_values is not None and ex.pixel_values.numel()]
    if with_images:
        batch["pixel_values"] = torch.cat([ex.pixel_values for ex in with_images], dim=0)
        batch["image_grid_hws"] = torch.cat([ex.image_grid_hws for ex in with_images], dim=0)
    return batch
