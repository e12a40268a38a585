"""Fixtures for the training tests: the golden tiny checkpoint, its processor, small conversation sets."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

GOLDEN = Path(__file__).resolve().parents[2].parent / "shared" / "golden" / "kimivl-tiny"


@pytest.fixture(autouse=True)
def _train_on_the_cpu(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """``device: auto`` trains on a GPU where there is one; these tests compare with CPU tensors, so they see no
    GPU, except those whose name says cuda (test_cuda_training.py)."""
    if "cuda" not in request.node.name:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    if not (GOLDEN / "model.safetensors").is_file():
        pytest.skip(f"golden tiny checkpoint not found at {GOLDEN} (../shared beside the repo)")
    return GOLDEN


@pytest.fixture(scope="session")
def processor(tiny_dir: Path):
    from kimivl import KimiVLProcessor

    return KimiVLProcessor.from_pretrained(tiny_dir)


@pytest.fixture(scope="session")
def images(tiny_dir: Path) -> list[Image.Image]:
    """Three images of different sizes (70x98, 140x56, 28x28)."""
    return [Image.open(tiny_dir / "inputs" / n).convert("RGB")
            for n in ("image_70x98.png", "image_140x56.png", "image_28x28.png")]


@pytest.fixture(scope="session")
def conversations(images: list[Image.Image]) -> list[list[dict[str, Any]]]:
    """A small repeated SFT set: one image per conversation, a one-line answer; one text-only sample."""
    answers = ["a red disc", "two blue squares", "a tiny dot"]
    convs = [[{"role": "user", "content": [{"type": "image", "image": im}, {"type": "text", "text": "What is it?"}]},
              {"role": "assistant", "content": ans}] for im, ans in zip(images, answers)]
    convs.append([{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi there"}])
    return convs
