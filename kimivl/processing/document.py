"""PDF documents as a media source: pages rendered to images, each after a page marker.

Not part of the official processor (``shared/reference/kimivl-spec.md`` §6.4: everything visual reaches the
model as image blocks). Format (docs/processor.md): page ``i`` of ``n`` is written as ``[page i/n]``
followed by its image block; pages cut by ``max_pages`` or the token budget are announced once at the end as
``[pages a-n not shown]`` (``[page n not shown]`` for one page). Rendering uses pypdfium2 (the ``[pdf]``
extra) at ``dpi``; the rendered size is ``ceil(points * dpi / 72)`` per side, known before rendering.
"""
from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from typing import Any

from PIL import Image

from kimivl.errors import KimiVLInputError
from kimivl.fieldtypes import checked_replace
from kimivl.processing.image_processing import KimiVLImageProcessor
from kimivl.processing.media import ImageBlock, MediaPlan, fit_token_budget, local_file, resize_to, source_size


@dataclass(frozen=True)
class DocumentOptions:
    """Rendering and budget of one PDF. ``dpi``: render resolution; ``max_pages``: first pages kept;
    ``max_tokens``: total ``<|media_pad|>`` budget, met by lowering per-page resolution down to
    ``min_page_tokens`` and only then dropping pages from the end; ``password`` for encrypted files."""

    dpi: float = 144.0
    max_pages: int = 16
    max_tokens: int = 16384
    min_page_tokens: int = 256
    password: str | None = None

    def updated(self, item: dict[str, Any], label: str) -> DocumentOptions:
        out = checked_replace(self, item, label, "document")
        if not (out.dpi > 0 and out.max_pages >= 1 and out.max_tokens >= 1 and out.min_page_tokens >= 1):
            raise KimiVLInputError(f"{label}: need dpi > 0 and max_pages, max_tokens, min_page_tokens >= 1; got "
                                   f"dpi={out.dpi}, max_pages={out.max_pages}, max_tokens={out.max_tokens}, "
                                   f"min_page_tokens={out.min_page_tokens}")
        return out


def page_marker(page: int, total: int) -> str:
    """Text before the image block of 1-based ``page`` of a ``total``-page document."""
    return f"[page {page}/{total}]"


def omitted_marker(first: int, total: int) -> str:
    """Text after the last shown page when pages ``first..total`` (1-based) are left out."""
    return f"[page {total} not shown]" if first == total else f"[pages {first}-{total} not shown]"


def _pdfium() -> Any:
    try:
        import pypdfium2
    except ImportError as e:
        raise ImportError("document input needs pypdfium2: pip install 'kimivl[pdf]' (or pip install pypdfium2)") from e
    return pypdfium2


def _open(source: Any, password: str | None, label: str) -> Any:
    pdfium = _pdfium()
    if isinstance(source, (bytes, bytearray, memoryview)):
        data: Any = bytes(source)
        if not data:
            raise KimiVLInputError(f"{label}: the PDF data is empty (0 bytes)")
    elif isinstance(source, (str, os.PathLike)):
        data = str(local_file(source, label, what="PDF file", instead="its path or bytes"))
    elif isinstance(source, io.IOBase):
        source.seek(0)
        data = source.read()
    else:
        raise KimiVLInputError(f"{label}: unsupported document type {type(source).__name__}; pass a path or bytes")
    try:
        return pdfium.PdfDocument(data, password=password)
    except pdfium.PdfiumError as e:
        reason = str(e)
        if "password" in reason.lower():
            hint = "a wrong password was given" if password else "pass its password as the 'password' option"
            raise KimiVLInputError(f"{label}: the PDF is encrypted ({hint})") from e
        raise KimiVLInputError(f"{label}: cannot open the PDF, the file is broken or not a PDF ({reason})") from e


def plan_document(source: Any, processor: KimiVLImageProcessor, options: DocumentOptions, *,
                  label: str) -> MediaPlan:
    """Plan a PDF from its page sizes (no rendering)."""
    pdf = _open(source, options.password, label)
    try:
        total = len(pdf)
        if total == 0:
            raise KimiVLInputError(f"{label}: the PDF has no pages")
        scale = options.dpi / 72.0
        shown = min(total, options.max_pages)
        sizes = []
        for i in range(shown):
            w_pt, h_pt = pdf.get_page_size(i)
            sizes.append((math.ceil(w_pt * scale), math.ceil(h_pt * scale)))
    finally:
        pdf.close()
    empty = [i + 1 for i, (w, h) in enumerate(sizes) if w <= 0 or h <= 0]
    if empty:
        raise KimiVLInputError(f"{label}: page(s) {empty[:5]} have zero size")
    limit, keep = fit_token_budget(sizes, processor, max_tokens=options.max_tokens,
                                   min_item_tokens=options.min_page_tokens, drop="tail", what="page")
    targets = [source_size(*sizes[i], limit, processor) for i in keep]
    try:
        blocks = [ImageBlock(page_marker(i + 1, total), w, h, processor.num_image_tokens(w, h))
                  for i, (w, h) in zip(keep, targets)]
    except KimiVLInputError as e:
        raise KimiVLInputError(f"{label}: page: {e}") from e
    suffix = omitted_marker(len(keep) + 1, total) if len(keep) < total else ""

    def load() -> list[Image.Image]:
        doc = _open(source, options.password, label)
        try:
            images = []
            for i, size in zip(keep, targets):
                # render straight at the planned resolution (sharper text than rendering at dpi and
                # downscaling); ceil rounding can leave a pixel over, which resize_to removes
                page_scale = scale * size[0] / sizes[i][0]
                try:
                    image = doc[i].render(scale=page_scale).to_pil().convert("RGB")
                except _pdfium().PdfiumError as e:
                    raise KimiVLInputError(f"{label}: cannot render page {i + 1}: {e}") from e
                images.append(resize_to(image, size))
            return images
        finally:
            doc.close()

    return MediaPlan("document", label, blocks, load, suffix=suffix,
                     detail={"pages": total, "pages_shown": len(keep), "dpi": options.dpi})
