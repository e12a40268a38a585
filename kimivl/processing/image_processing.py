"""Image processor: token-limit resize, pad (or centre-crop), RGB, normalise, patchify.

Spec: ``shared/reference/kimivl-spec.md`` §5 (official ``KimiVLImageProcessor``) and §9.8/9.9. Per image:
resize with PIL bicubic when ``(W//p)*(H//p) > in_token_limit`` (checked before padding, so the final
grid may exceed the limit), pad right/bottom with 0 in the image's own mode to multiples of
``patch*merge`` (or centre-crop to multiples of ``patch`` when ``pad_input`` is false), convert to RGB,
``x/255``, ``(x-mean)/std`` in float32, patches row-major. ``num_image_tokens`` gives the token count from
the size alone. Deliberate deviations: 16-bit modes (``I;16*``) are scaled to 8 bits instead of clipped,
``La`` goes through ``LA``; user errors raise ``KimiVLInputError`` with the numbers (official:
``ValueError("Exceed pos emb")`` or a crash later in the merger for odd grids); defaults are the release
``preprocessor_config.json`` values (pad_input true, mean/std 0.5), not the official class defaults.
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from kimivl.configuration import MoonViTConfig
from kimivl.errors import KimiVLInputError
from kimivl.fieldtypes import type_problem

logger = logging.getLogger(__name__)

PREPROCESSOR_CONFIG_FILE = "preprocessor_config.json"
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def resized_size(width: int, height: int, *, patch_size: int = 14, in_token_limit: int = 4096) -> tuple[int, int]:
    """(width, height) after the token-limit resize (before padding); unchanged when under the limit."""
    patches = (width // patch_size) * (height // patch_size)
    if patches <= in_token_limit:
        return width, height
    scale = math.sqrt(in_token_limit / patches)
    return int(width * scale), int(height * scale)


def image_grid_hw(width: int, height: int, *, patch_size: int = 14, in_token_limit: int = 4096,
                  merge_kernel_size: Sequence[int] = (2, 2), pad_input: bool = True) -> tuple[int, int]:
    """Patch grid (h, w) the processor produces for a ``width x height`` image; raises on unusable sizes."""
    if width <= 0 or height <= 0:
        raise KimiVLInputError(f"image is empty ({width}x{height} pixels)")
    if in_token_limit <= 0:
        raise KimiVLInputError(f"in_token_limit must be positive, got {in_token_limit}")
    mh, mw = int(merge_kernel_size[0]), int(merge_kernel_size[1])
    new_w, new_h = resized_size(width, height, patch_size=patch_size, in_token_limit=in_token_limit)
    if pad_input:
        final_w = -(-new_w // (mw * patch_size)) * mw * patch_size
        final_h = -(-new_h // (mh * patch_size)) * mh * patch_size
    else:
        final_w, final_h = new_w - new_w % patch_size, new_h - new_h % patch_size
    grid_h, grid_w = final_h // patch_size, final_w // patch_size
    if grid_h == 0 or grid_w == 0:
        # only reachable with pad_input=false (padding always yields at least one merge block)
        raise KimiVLInputError(
            f"image {width}x{height} is smaller than one {patch_size}x{patch_size} patch after the resize "
            f"({new_w}x{new_h}); pad_input=false centre-crops to whole patches; set pad_input=true")
    limit = MoonViTConfig.rope_max_grid
    if grid_w >= limit or grid_h >= limit:
        raise KimiVLInputError(
            f"image {width}x{height} becomes {final_w}x{final_h} pixels = {grid_w}x{grid_h} patches (w x h) after "
            f"the in_token_limit={in_token_limit} resize and padding, but MoonViT's position table allows at most "
            f"{limit - 1} patches per side (MoonViTConfig.rope_max_grid={limit}); crop the image to a less "
            f"extreme aspect ratio or lower in_token_limit in {PREPROCESSOR_CONFIG_FILE}")
    if grid_h % mh or grid_w % mw:
        raise KimiVLInputError(
            f"image {width}x{height} gives a {grid_h}x{grid_w} patch grid (h x w) with pad_input=false, not a "
            f"multiple of merge_kernel_size {mh}x{mw}, which the patch merger needs; set pad_input=true")
    return grid_h, grid_w


def num_image_tokens(width: int, height: int, *, patch_size: int = 14, in_token_limit: int = 4096,
                     merge_kernel_size: Sequence[int] = (2, 2), pad_input: bool = True) -> int:
    """LLM tokens (``<|media_pad|>`` copies) for a ``width x height`` image: ``h*w / (merge_h*merge_w)``.

    Pure arithmetic, no pixels; defaults are the released Kimi-VL-A3B settings.
    """
    gh, gw = image_grid_hw(width, height, patch_size=patch_size, in_token_limit=in_token_limit,
                           merge_kernel_size=merge_kernel_size, pad_input=pad_input)
    return (gh * gw) // (int(merge_kernel_size[0]) * int(merge_kernel_size[1]))


def _normalise_mode(image: Image.Image) -> Image.Image:
    """Bring modes the official pipeline mishandles into ones it handles; others stay as they are."""
    if image.mode in _SIXTEEN_BIT_MODES:
        # PIL's convert clips 16-bit values at 255 (almost every 16-bit image turns white): scale instead.
        arr = np.asarray(image).astype(np.uint32)
        return Image.fromarray(((arr + 128) // 257).astype(np.uint8), mode="L")
    if image.mode == "La":  # PIL cannot convert premultiplied La straight to RGB
        return image.convert("LA")
    return image


def _pad(image: Image.Image, width: int, height: int) -> Image.Image:
    """Pad right/bottom to ``width x height`` with 0 in every band of the image's own mode (official
    order: pad before the RGB conversion, so e.g. CMYK padding ends up white and P padding is palette[0])."""
    out = Image.new(image.mode, (width, height), 0)
    if image.mode in ("P", "PA"):
        palette = image.getpalette()
        if palette is not None:
            out.putpalette(palette)
    out.paste(image, (0, 0))
    return out


@dataclass
class KimiVLImageProcessor:
    """Settings of ``preprocessor_config.json``; unknown keys are kept in ``extra`` for round-tripping."""

    patch_size: int = 14
    pad_input: bool = True
    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    in_token_limit: int = 4096
    merge_kernel_size: list[int] = field(default_factory=lambda: [2, 2])
    num_pooled_tokens: int | None = 1024  # present in the release file, not read by the official code
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Types first: a quoted "14" from a hand-edited JSON file would otherwise fail in a comparison or
        # an int() far from the file (integers pass for the float lists, JSON writes 0.0 as 0 as well).
        problem = type_problem(self)
        if problem is not None:
            name, value, must = problem
            raise KimiVLInputError(f"image processor setting {name} = {value!r} must be {must}, got "
                                   f"{type(value).__name__}")
        self.merge_kernel_size = list(self.merge_kernel_size)
        self.image_mean = [float(v) for v in self.image_mean]
        self.image_std = [float(v) for v in self.image_std]
        if len(self.merge_kernel_size) != 2 or min(self.merge_kernel_size) < 1:
            raise KimiVLInputError(f"merge_kernel_size must be two positive ints, got {self.merge_kernel_size}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise KimiVLInputError(f"image_mean/image_std need 3 values with std > 0, got "
                                   f"{self.image_mean} / {self.image_std}")
        if self.patch_size <= 0 or self.in_token_limit <= 0:
            raise KimiVLInputError(f"patch_size ({self.patch_size}) and in_token_limit ({self.in_token_limit}) "
                                   "must be positive")

    # ------------------------------------------------------------------ config I/O
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KimiVLImageProcessor:
        names = {f.name for f in fields(cls) if f.name != "extra"}
        known = {k: v for k, v in data.items() if k in names}
        return cls(**known, extra={k: v for k, v in data.items() if k not in names})

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        out.update(self.extra)
        return out

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike[str]) -> KimiVLImageProcessor:
        """Read ``preprocessor_config.json`` from a checkpoint directory (or the file itself, or a hub id)."""
        path = Path(path_or_id)
        if not path.is_file():
            from kimivl.checkpoint import resolve_checkpoint_dir

            path = resolve_checkpoint_dir(path_or_id) / PREPROCESSOR_CONFIG_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise KimiVLInputError(f"cannot read image processor settings {path}: {e}") from e
        if not isinstance(data, dict):
            raise KimiVLInputError(f"{path}: image processor settings must be a JSON object, got "
                                   f"{type(data).__name__}")
        try:
            return cls.from_dict(data)
        except KimiVLInputError as e:  # name the file that holds the bad value
            raise KimiVLInputError(f"{path}: {e}") from e

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / PREPROCESSOR_CONFIG_FILE).write_text(json.dumps(self.to_dict(), indent=2) + "\n", "utf-8")

    # ------------------------------------------------------------------ arithmetic
    def _kwargs(self) -> dict[str, Any]:
        return {"patch_size": self.patch_size, "in_token_limit": self.in_token_limit,
                "merge_kernel_size": self.merge_kernel_size, "pad_input": self.pad_input}

    def grid_hw(self, width: int, height: int) -> tuple[int, int]:
        """Patch grid (h, w) for an image of this size."""
        return image_grid_hw(width, height, **self._kwargs())

    def num_image_tokens(self, width: int, height: int) -> int:
        """LLM tokens for an image of this size (no pixels decoded)."""
        return num_image_tokens(width, height, **self._kwargs())

    # ------------------------------------------------------------------ pixels
    def process_image(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        """One PIL image -> patches ``(h*w, 3, p, p)`` float32 and its grid ``(h, w)``."""
        if not isinstance(image, Image.Image):
            raise KimiVLInputError(f"expected a PIL image, got {type(image).__name__} "
                                   "(load paths/bytes with kimivl.processing.load_image)")
        p = self.patch_size
        width, height = image.size
        grid_h, grid_w = self.grid_hw(width, height)
        image = _normalise_mode(image)
        new_size = resized_size(width, height, patch_size=p, in_token_limit=self.in_token_limit)
        if new_size != (width, height):
            image = image.resize(new_size, Image.Resampling.BICUBIC)
        if self.pad_input:
            image = _pad(image, grid_w * p, grid_h * p)
        else:
            w, h = image.size
            left, top = int(round((w - grid_w * p) / 2.0)), int(round((h - grid_h * p) / 2.0))
            image = image.crop((left, top, left + grid_w * p, top + grid_h * p))
        rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
        # Same float32 op order as the official to_tensor + normalize: x/255, then (x - mean)/std.
        x = torch.from_numpy(rgb.copy()).permute(2, 0, 1).to(torch.float32).div(255)
        mean = torch.tensor(self.image_mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.image_std, dtype=torch.float32).view(3, 1, 1)
        x = x.sub(mean).div(std)
        patches = x.reshape(3, grid_h, p, grid_w, p).permute(1, 3, 0, 2, 4).reshape(grid_h * grid_w, 3, p, p)
        return patches.contiguous(), (grid_h, grid_w)

    def preprocess(self, images: Image.Image | Sequence[Image.Image], return_tensors: str | None = "pt",
                   **_: Any) -> dict[str, Any]:
        """``pixel_values (sum h*w, 3, p, p)`` float32 and ``image_grid_hws (N, 2)`` int64, in input order;
        torch tensors (``return_tensors`` "pt" or None) or numpy arrays ("np")."""
        items = [images] if isinstance(images, Image.Image) else list(images)
        if not items:
            raise KimiVLInputError("no images to process")
        patches, grids = [], []
        for i, image in enumerate(items):
            try:
                pv, grid = self.process_image(image)
            except KimiVLInputError as e:
                raise KimiVLInputError(f"image {i}: {e}") from e
            except (OSError, ValueError) as e:  # lazily-loaded files that turn out truncated or corrupt
                raise KimiVLInputError(f"image {i}: cannot decode the pixels: {type(e).__name__}: {e}") from e
            patches.append(pv)
            grids.append(grid)
        out = {"pixel_values": torch.cat(patches, dim=0),
               "image_grid_hws": torch.tensor(grids, dtype=torch.int64).reshape(-1, 2)}
        if return_tensors == "np":
            return {k: v.numpy() for k, v in out.items()}
        if return_tensors not in ("pt", None):
            raise KimiVLInputError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        return out

    __call__ = preprocess
