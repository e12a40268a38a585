"""Multimodal projector: merged 2x2 vision patches -> decoder embedding rows.

Spec: ``shared/reference/kimivl-spec.md`` §2 (``multi_modal_projector.*`` keys) and §3.8.
Official class: ``KimiVLMultiModalProjector`` (``pre_norm``, ``linear_1``, GELU (erf), ``linear_2``).
No deliberate deviations; the merge size comes from ``merge_kernel_size`` instead of a literal 4; the GELU
writes into the ``linear_1`` output when no gradient is recorded (inference).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from kimivl.configuration import DeepseekV3Config, MoonViTConfig
from kimivl.errors import KimiVLInputError
from kimivl.ops.linear import Linear, linear_gelu
from kimivl.vision.moonvit import VISION_LAYER_NORM_EPS


class KimiVLMultiModalProjector(nn.Module):
    """(T, kh*kw, D_v) merged vision tokens -> (T, D_text)."""

    def __init__(self, vision_config: MoonViTConfig, text_config: DeepseekV3Config) -> None:
        super().__init__()
        self.vision_hidden = vision_config.hidden_size
        self.merge_size = math.prod(int(k) for k in vision_config.merge_kernel_size)
        merged = self.vision_hidden * self.merge_size
        self.pre_norm = nn.LayerNorm(self.vision_hidden, eps=VISION_LAYER_NORM_EPS)
        self.linear_1 = Linear(merged, merged)
        self.linear_2 = Linear(merged, text_config.hidden_size)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """image_features: (T, kh*kw, D_v) -> (T, D_text)."""
        expected = (self.merge_size, self.vision_hidden)
        if image_features.ndim != 3 or tuple(image_features.shape[1:]) != expected:
            raise KimiVLInputError(f"projector input must have shape (num_tokens, {expected[0]}, {expected[1]}); "
                                   f"got {tuple(image_features.shape)}")
        # Each sub-patch is normalised on its own, then the kh*kw sub-patches are concatenated
        # in merger order.
        x = self.pre_norm(image_features).view(image_features.shape[0], -1)
        return self.linear_2(linear_gelu(self.linear_1, x))  # exact (erf) GELU
