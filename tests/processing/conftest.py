"""Fixtures of the processing tests: the public golden set and small media files built on the fly."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

TINY_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "golden" / "kimivl-tiny"


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    if not (TINY_DIR / "tiktoken.model").is_file():
        pytest.skip(f"golden set kimivl-tiny not found at {TINY_DIR} (../shared beside the repo)")
    return TINY_DIR


@pytest.fixture(scope="session")
def expected_json(tiny_dir: Path) -> dict[str, Any]:
    return json.loads((tiny_dir / "expected" / "expected.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def expected(tiny_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(tiny_dir / "expected" / "expected.safetensors"))


@pytest.fixture(scope="session")
def tiny_processor(tiny_dir: Path):
    from kimivl.processing import KimiVLProcessor

    return KimiVLProcessor.from_pretrained(tiny_dir)


@pytest.fixture()
def processor(tiny_dir: Path):
    """A fresh processor per test (tests change its options)."""
    from kimivl.processing import KimiVLProcessor

    return KimiVLProcessor.from_pretrained(tiny_dir)
