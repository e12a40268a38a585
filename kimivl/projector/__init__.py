"""Multimodal projector (spec §3.8): keys equal the official ``multi_modal_projector.*``."""
from __future__ import annotations

from kimivl.projector.projector import KimiVLMultiModalProjector

__all__ = ["KimiVLMultiModalProjector"]
