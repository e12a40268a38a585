"""MoonViT vision tower (spec §2-§3): module names equal the official ``vision_tower.*`` keys."""
from __future__ import annotations

from kimivl.vision.moonvit import (
    MLP2,
    VISION_LAYER_NORM_EPS,
    Learnable2DInterpPosEmb,
    MoonVisionPatchEmbed,
    MoonVitEncoder,
    MoonVitEncoderLayer,
    MoonVitPretrainedModel,
    validate_vision_inputs,
)

__all__ = [
    "MLP2",
    "VISION_LAYER_NORM_EPS",
    "Learnable2DInterpPosEmb",
    "MoonVisionPatchEmbed",
    "MoonVitEncoder",
    "MoonVitEncoderLayer",
    "MoonVitPretrainedModel",
    "validate_vision_inputs",
]
