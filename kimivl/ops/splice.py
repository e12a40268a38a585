"""Write image features over the placeholder rows of the token embeddings.

Spec: ``shared/reference/kimivl-spec.md`` §4 (multimodal wrapper): the rows whose id equals
``media_placeholder_token_id`` are overwritten, in order across the whole batch, with the
projector output. The official code asserts the counts; here a mismatch is a clear error.
"""
from __future__ import annotations

import torch

from kimivl.errors import KimiVLInputError


def merge_multimodal_embeddings(inputs_embeds: torch.Tensor, input_ids: torch.Tensor, features: torch.Tensor,
                                placeholder_id: int) -> torch.Tensor:
    """Return ``inputs_embeds`` with the placeholder rows replaced by ``features`` (in order).

    inputs_embeds: (B, S, D); input_ids: (B, S); features: (T, D) with T = number of placeholders.
    """
    mask = input_ids == placeholder_id
    n_placeholders = int(mask.sum())
    if features.ndim != 2 or features.shape[0] != n_placeholders:
        raise KimiVLInputError(
            f"the input ids hold {n_placeholders} image placeholder token(s) (id {placeholder_id}) but the images "
            f"give {features.shape[0] if features.ndim else 0} feature row(s); each image of grid h x w needs "
            "h*w/4 placeholders (use the processor to expand them)"
        )
    if features.shape[-1] != inputs_embeds.shape[-1]:
        raise KimiVLInputError(
            f"image features have width {features.shape[-1]} but the text embeddings have {inputs_embeds.shape[-1]}"
        )
    return inputs_embeds.masked_scatter(mask.unsqueeze(-1), features.to(inputs_embeds.dtype))
