"""Fixtures of the generation tests: the golden model, its tokenizer, prompts built from golden pieces."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kimivl.modeling import KimiVLForConditionalGeneration

MEDIA_PAD, MEDIA_START, MEDIA_CONTENT, MEDIA_END = 763, 760, 761, 762  # golden README, tiny vocabulary


@pytest.fixture(scope="session")
def model(golden_dir: Path) -> KimiVLForConditionalGeneration:
    return KimiVLForConditionalGeneration.from_pretrained(golden_dir)


@pytest.fixture(scope="session")
def tokenizer(golden_dir: Path) -> Any:
    processing = pytest.importorskip("kimivl.processing", reason="the processor package (kimivl.processing) is absent")
    processor_cls = getattr(processing, "KimiVLProcessor", None)
    if processor_cls is None:
        pytest.skip("kimivl.processing has no KimiVLProcessor yet")
    return processor_cls.from_pretrained(golden_dir).tokenizer


@pytest.fixture(scope="session")
def mixed_prompts(golden: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """Prompts with 1, 0 and 2 images, from the golden processor outputs (grids [8,6], [4,10], [2,2])."""
    ids = golden["prompt.input_ids"][0].tolist()
    pixels, grids = golden["processor.pixel_values"], golden["processor.image_grid_hws"]
    first = ids.index(MEDIA_PAD)
    prefix, suffix = ids[:first], ids[first + 12:]
    image_words = ids[ids.index(MEDIA_START) + 1:ids.index(MEDIA_CONTENT)]  # the text "image"
    two_images = (prefix + [MEDIA_PAD] * 10 + [MEDIA_END, MEDIA_START] + image_words + [MEDIA_CONTENT]
                  + [MEDIA_PAD] + suffix)
    return [
        {"ids": ids, "pixel_values": pixels[:48], "grids": grids[:1]},
        {"ids": golden["text_only.input_ids"][0].tolist(), "pixel_values": None, "grids": None},
        {"ids": two_images, "pixel_values": pixels[48:], "grids": grids[1:]},
    ]
