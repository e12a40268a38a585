"""Shared fixtures: the golden tiny checkpoint produced by the official implementation."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
GOLDEN_DIR = REPO.parent / "shared" / "golden" / "kimivl-tiny"
CONFIGS = REPO / "configs"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not (GOLDEN_DIR / "config.json").is_file():
        pytest.skip(f"golden set not found at {GOLDEN_DIR} (../shared beside the repo)")
    return GOLDEN_DIR


@pytest.fixture(scope="session")
def golden(golden_dir: Path) -> dict[str, torch.Tensor]:
    """All expected tensors of the official implementation (expected/expected.safetensors)."""
    from safetensors.torch import load_file

    return load_file(str(golden_dir / "expected" / "expected.safetensors"))


@pytest.fixture(scope="session")
def golden_weights(golden_dir: Path) -> dict[str, torch.Tensor]:
    """The official-layout tiny state dict (model.safetensors)."""
    from safetensors.torch import load_file

    return load_file(str(golden_dir / "model.safetensors"))


@pytest.fixture(scope="session")
def configs_dir() -> Path:
    return CONFIGS
