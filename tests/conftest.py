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


@pytest.fixture(scope="session")
def cpu_ext():
    """kimivl's compiled CPU kernels (kimivl.ops.cpu_kernels), or a skip saying why they are missing."""
    from kimivl.ops import cpu_kernels

    ext = cpu_kernels.kernels()
    if ext is None:
        pytest.skip("kimivl CPU kernels could not be built here (no g++/ninja?) or KIMIVL_CPU_KERNELS=0")
    return ext
