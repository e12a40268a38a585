"""Errors raised at the boundaries of kimivl (processor, model entry point, loader, server)."""
from __future__ import annotations

from typing import Any


class KimiVLInputError(ValueError):
    """Bad user input: the message names the problem and the numbers involved."""


class CheckpointError(ValueError):
    """A checkpoint that does not match the model: missing / unexpected / mis-shaped keys, bad files."""


def check_tensors(**named: Any) -> None:
    """Each given (non-None) argument is a ``torch.Tensor``: a list or a NumPy array would fail later on ``.ndim`` /
    ``.numel()`` with an AttributeError that names neither the argument nor what it should be."""
    import torch

    for name, value in named.items():
        if value is not None and not isinstance(value, torch.Tensor):
            raise KimiVLInputError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
