"""Media sources: image loading, the plan every media item becomes, and the token budget.

Spec: ``shared/reference/kimivl-spec.md`` §6.4 (video = frames, each an image block) and the project
rule "video and PDF are media sources: they produce images plus text markers". Every media item (an
image, a video, a document) is first *planned* from metadata only (image header, container metadata, PDF
page sizes): a list of image blocks, each with its text prefix, the size handed to the image processor and
its token count. The pixels are decoded later by ``MediaPlan.load()``. Preflight and the processor use the
same plans, so the counts preflight reports are the counts the processor produces.
"""
from __future__ import annotations

import base64
import binascii
import io
import os
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image

from kimivl.errors import KimiVLInputError
from kimivl.processing.image_processing import KimiVLImageProcessor, resized_size

ImageSource = Union[Image.Image, str, os.PathLike, bytes, bytearray, memoryview, np.ndarray, dict]


@dataclass(frozen=True)
class ImageBlock:
    """One ``<|media_start|>image...<|media_end|>`` block: text before it, processor input size, tokens."""

    prefix: str
    width: int
    height: int
    tokens: int


@dataclass
class MediaPlan:
    """A media item planned from metadata: its image blocks, trailing text and a pixel loader.

    ``load()`` returns one PIL image per block, already at ``(block.width, block.height)``.
    """

    kind: str
    label: str
    blocks: list[ImageBlock]
    loader: Callable[[], list[Image.Image]]
    suffix: str = ""
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        """Media (``<|media_pad|>``) tokens of all blocks; marker text is counted with the text."""
        return sum(b.tokens for b in self.blocks)

    def load(self) -> list[Image.Image]:
        images = self.loader()
        if len(images) != len(self.blocks):
            raise KimiVLInputError(f"{self.label}: decoded {len(images)} images but planned {len(self.blocks)}")
        return images


def describe_source(source: Any) -> str:
    """Short human-readable name of a media source for error messages."""
    if isinstance(source, (str, os.PathLike)):
        text = str(source)
        return repr(text[:40] + "...") if text.startswith("data:") and len(text) > 40 else repr(text)
    if isinstance(source, Image.Image):
        return f"PIL {source.mode} {source.size[0]}x{source.size[1]}"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"{len(source)} bytes"
    if isinstance(source, list):
        return f"{len(source)} frames"
    return type(source).__name__


# ---------------------------------------------------------------------------------------------- images
def local_file(source: str | os.PathLike[str], label: str, *, what: str = "file",
               instead: str = "its path, bytes or a data URL") -> Path:
    """The file a path or ``file://`` URL names. A remote URL (never fetched here), a directory or a missing
    file is a ``KimiVLInputError``: ``what`` names the file ("video file"), ``instead`` what to pass instead."""
    text = os.fspath(source)
    if text.lower().startswith(("http://", "https://")):
        raise KimiVLInputError(f"{label}: remote URLs are not fetched ({text[:80]!r}); download the file and "
                               f"pass {instead}")
    if text.startswith("file://"):
        text = urllib.parse.unquote(urllib.parse.urlparse(text).path)
    path = Path(text).expanduser()
    if path.is_dir():
        article = "an" if what[0] in "aeiou" else "a"
        raise KimiVLInputError(f"{label}: {str(path)!r} is a directory, not {article} {what}")
    if not path.is_file():
        raise KimiVLInputError(f"{label}: {what} not found: {str(path)!r}")
    return path


def _read_source_bytes(source: str | os.PathLike[str], label: str) -> bytes:
    text = os.fspath(source)
    if text.startswith("data:"):
        header, sep, payload = text.partition(",")
        if not sep:
            raise KimiVLInputError(f"{label}: malformed data URL (no ',' after the media type)")
        if not header.endswith(";base64"):
            return urllib.parse.unquote_to_bytes(payload)
        try:
            # validate: characters outside the alphabet would otherwise be skipped, leaving (almost) nothing
            return base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError) as e:
            raise KimiVLInputError(f"{label}: malformed data URL: its {len(payload)}-character payload is not "
                                   f"valid base64 ({e})") from e
    path = local_file(text, label, what="image file")
    try:
        return path.read_bytes()
    except OSError as e:
        raise KimiVLInputError(f"{label}: cannot read {str(path)!r}: {e}") from e


def _open_lazy(source: ImageSource, label: str) -> Image.Image:
    """A PIL image whose header is parsed but whose pixels may not be decoded yet."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, dict):
        url = source.get("url", source.get("path"))
        if url is None:
            raise KimiVLInputError(f"{label}: image dict needs a 'url' (or 'path') key, got keys {sorted(source)}")
        return _open_lazy(url, label)
    if isinstance(source, torch.Tensor):
        if source.dtype != torch.uint8:
            raise KimiVLInputError(f"{label}: tensors must be uint8 (H, W), (H, W, C) or (C, H, W), got {source.dtype} "
                                   f"{tuple(source.shape)}")
        source = source.detach().cpu().numpy()
    if isinstance(source, np.ndarray):
        if source.ndim == 3 and source.shape[0] in (1, 3, 4) and source.shape[2] not in (1, 3, 4):
            source = source.transpose(1, 2, 0)  # (C, H, W), as torch and transformers' processors lay images out
        channels_ok = source.ndim == 2 or (source.ndim == 3 and source.shape[2] in (1, 3, 4))
        if source.dtype != np.uint8 or not channels_ok:
            raise KimiVLInputError(f"{label}: arrays must be uint8 (H, W), (H, W, 1|3|4) or (1|3|4, H, W), got "
                                   f"{source.dtype} {tuple(source.shape)}")
        source = np.ascontiguousarray(source)
        return Image.fromarray(source[..., 0] if source.ndim == 3 and source.shape[2] == 1 else source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        data = _read_source_bytes(source, label)
    else:
        raise KimiVLInputError(f"{label}: unsupported image type {type(source).__name__}; pass a PIL image, a "
                               "path, bytes, a data URL or a uint8 numpy array / torch tensor")
    if not data:
        raise KimiVLInputError(f"{label}: the image data is empty (0 bytes)")
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise KimiVLInputError(f"{label}: image too large to decode safely: {e}") from e
    except Image.UnidentifiedImageError as e:
        raise KimiVLInputError(f"{label}: not a readable image file ({len(data)} bytes, format not "
                               "recognised or header corrupt)") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise KimiVLInputError(f"{label}: not a readable image file, the header is corrupt or truncated ({e})") from e


def image_size(source: ImageSource, *, label: str = "image") -> tuple[int, int]:
    """(width, height) from the header only; no pixels decoded."""
    return _open_lazy(source, label).size


def load_image(source: ImageSource, *, label: str = "image") -> Image.Image:
    """Decode an image from a PIL image, path, ``file://``/data URL, bytes, ``{"url": ...}`` or uint8 array."""
    image = _open_lazy(source, label)
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise KimiVLInputError(f"{label}: the image data is truncated or corrupt ({e})") from e
    width, height = image.size
    if width == 0 or height == 0:
        raise KimiVLInputError(f"{label}: image is empty ({width}x{height} pixels)")
    return image


def plan_image(source: ImageSource, processor: KimiVLImageProcessor, *, label: str) -> MediaPlan:
    """A plain image: one block, no marker text."""
    width, height = image_size(source, label=label)
    try:
        tokens = processor.num_image_tokens(width, height)
    except KimiVLInputError as e:
        raise KimiVLInputError(f"{label}: {e}") from e
    return MediaPlan("image", label, [ImageBlock("", width, height, tokens)],
                     loader=lambda: [load_image(source, label=label)])


# ---------------------------------------------------------------------------------------------- budget
def source_size(width: int, height: int, limit: int, processor: KimiVLImageProcessor) -> tuple[int, int]:
    """Size a video frame / PDF page is scaled to by its source so that it uses ``limit`` patches
    (the processor's own token-limit resize applies when ``limit`` is not below its ``in_token_limit``)."""
    if limit >= processor.in_token_limit:
        return width, height
    return resized_size(width, height, patch_size=processor.patch_size, in_token_limit=limit)


def _tokens_at(sizes: Sequence[tuple[int, int]], limit: int, processor: KimiVLImageProcessor) -> list[int]:
    return [processor.num_image_tokens(*source_size(w, h, limit, processor)) for w, h in sizes]


def fit_token_budget(sizes: Sequence[tuple[int, int]], processor: KimiVLImageProcessor, *, max_tokens: int,
                     min_item_tokens: int, drop: str, what: str) -> tuple[int, list[int]]:
    """Per-item patch limit and the kept item indices so that the items fit ``max_tokens``.

    Resolution is lowered first (largest per-item limit that fits, not below ``min_item_tokens`` per
    item); only then are items dropped, evenly over the sequence (``drop="uniform"``, video) or from the
    end (``drop="tail"``, documents). ``what`` names an item in messages ("frame", "page").
    """
    if max_tokens <= 0:
        raise KimiVLInputError(f"max_tokens for the {what}s must be positive, got {max_tokens}")
    merge = processor.merge_kernel_size[0] * processor.merge_kernel_size[1]
    hi = processor.in_token_limit
    lo = min(hi, max(1, min_item_tokens * merge))
    keep = list(range(len(sizes)))

    def fits(limit: int, idx: list[int]) -> bool:
        return sum(_tokens_at([sizes[i] for i in idx], limit, processor)) <= max_tokens

    if not fits(lo, keep):
        costs = _tokens_at(sizes, lo, processor)
        if min(costs) > max_tokens:
            raise KimiVLInputError(f"one {what} at the lowest resolution (min {what} tokens {min_item_tokens}) "
                                   f"needs {min(costs)} tokens but the {what} budget max_tokens is {max_tokens}; "
                                   "raise max_tokens")
        for count in range(len(sizes) - 1, 0, -1):
            if drop == "tail":
                keep = list(range(count))
            else:
                keep = sorted({round(k * (len(sizes) - 1) / (count - 1)) for k in range(count)}) if count > 1 else [0]
            if sum(costs[i] for i in keep) <= max_tokens:
                break
    if fits(hi, keep):
        return hi, keep
    while lo < hi:  # largest limit in [lo, hi) that fits; token counts grow with the limit
        mid = (lo + hi + 1) // 2
        if fits(mid, keep):
            lo = mid
        else:
            hi = mid - 1
    return lo, keep


def resize_to(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale a decoded frame/page to its planned size (PIL bicubic, as the image processor resizes)."""
    return image if image.size == size else image.resize(size, Image.Resampling.BICUBIC)
