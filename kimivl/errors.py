"""Errors raised at the boundaries of kimivl (processor, model entry point, loader, server)."""
from __future__ import annotations


class KimiVLInputError(ValueError):
    """Bad user input: the message names the problem and the numbers involved."""


class CheckpointError(ValueError):
    """A checkpoint that does not match the model: missing / unexpected / mis-shaped keys, bad files."""
