"""kimivl: native PyTorch Kimi-VL (MoonViT encoder, pixel-shuffle projector, Moonlight MoE decoder).

The public names are imported lazily so that ``import kimivl`` (and the CLI) stays fast.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

__version__ = "0.1.0"

# Path of the small model shipped with the package (see docs/demo-model.md).
DEMO_MODEL: str = str(Path(__file__).resolve().parent / "assets" / "kimivl-demo")

_LAZY = {
    "KimiVLConfig": "kimivl.configuration",
    "MoonViTConfig": "kimivl.configuration",
    "DeepseekV3Config": "kimivl.configuration",
    "KimiVLInputError": "kimivl.errors",
    "CheckpointError": "kimivl.errors",
    "KimiVLForConditionalGeneration": "kimivl.modeling",
    "KimiVLProcessor": "kimivl.processing",
    "GenerationConfig": "kimivl.generation",
    "generate": "kimivl.generation",
    "stream": "kimivl.generation",
}

__all__ = ["DEMO_MODEL", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kimivl' has no attribute {name!r}")
