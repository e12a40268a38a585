"""A dispatch mode recording every tensor aten ops return: memory-shape assertions in attention tests."""
from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class TensorRecorder(TorchDispatchMode):
    """While active: ``shapes`` of every tensor an aten op returns, and the largest ``max_numel``."""

    def __init__(self) -> None:
        super().__init__()
        self.max_numel = 0
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
                self.shapes.append(tuple(t.shape))
        return out
