"""The media access policy: which image / video URLs and PDFs a request may use, and the per-item and per-request
bounds.

Every refusal is an :class:`~kimivl.chat.protocol.APIError` whose ``code`` names the bound or rule (the same
name as the :class:`~kimivl.chat.limits.ServerLimits` field and, with dashes, the ``kimivl serve`` flag).
Images and videos arrive as ``data:`` URLs; ``http(s)`` URLs are fetched only with ``allow_remote_images``
(bounded in size and time); ``file://`` URLs and absolute paths are read only when they resolve (symlinks
included) to a file under ``allowed_local_media_path``. PDFs arrive as ``data:application/pdf`` URLs only.
Pixel counts come from the image header or the video container, before any pixel is decoded.
"""
from __future__ import annotations

import base64
import binascii
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from kimivl.chat.limits import ServerLimits
from kimivl.chat.protocol import MEDIA_PARTS, APIError, ChatCompletionRequest, FilePart, ImagePart, VideoPart
from kimivl.errors import KimiVLInputError
from kimivl.processing import PyAVDecoder, image_size

logger = logging.getLogger(__name__)


# the data URL media types each kind takes
_DATA_TYPES = {"image": ("image/",), "video": ("video/",), "document": ("application/pdf",)}


def _bad_media(label: str, message: str, code: str = "invalid_image") -> APIError:
    return APIError(400, f"{label}: {message}", code=code, param="messages")


def _decode_data_url(url: str, kind: str, label: str, code: str) -> bytes:
    header, sep, payload = url[len("data:"):].partition(",")
    if not sep or not header.startswith(_DATA_TYPES[kind]) or not header.endswith(";base64"):
        example = {"image": "image/<type>", "video": "video/<type>", "document": "application/pdf"}[kind]
        raise _bad_media(label, f"data URLs must look like data:{example};base64,<data> (got {url[:40]!r})", code)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise _bad_media(label, f"the data URL payload is not valid base64 ({e})", code) from e


def _local_file(url: str, limits: ServerLimits, label: str) -> bytes:
    if limits.allowed_local_media_path is None:
        raise _bad_media(label, "local file paths are refused: the server was started without "
                                "--allowed-local-media-path", code="allowed_local_media_path")
    raw = urllib.parse.unquote(urllib.parse.urlparse(url).path) if url.startswith("file:") else url
    root = Path(limits.allowed_local_media_path).resolve()
    try:
        path = Path(raw).resolve(strict=True)  # follows symlinks and removes '..' before the check
    except (OSError, RuntimeError):
        raise _bad_media(label, f"file not found: {raw!r}", code="allowed_local_media_path") from None
    if not path.is_relative_to(root) or not path.is_file():
        raise _bad_media(label, f"{raw!r} is not a file under the allowed local media path {str(root)!r}",
                         code="allowed_local_media_path")
    # read now, from the checked path: nothing swapped in later can be read instead
    with path.open("rb") as f:
        data = f.read(limits.max_body_bytes + 1)
    if len(data) > limits.max_body_bytes:
        raise APIError(413, f"{label}: {raw!r} is over max_body_bytes={limits.max_body_bytes}",
                       code="max_body_bytes", param="messages")
    return data


class _HTTPOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) only (the stock handler also follows ftp)."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> urllib.request.Request | None:
        if urllib.parse.urlparse(newurl).scheme.lower() not in ("http", "https"):
            raise urllib.error.URLError(f"redirect to a non-http(s) URL {newurl[:80]!r} refused")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _fetch_remote(url: str, limits: ServerLimits, kind: str, label: str) -> bytes:
    if not limits.allow_remote_images:
        raise _bad_media(label, f"remote {kind} URLs are refused ({url[:80]!r}); send the {kind} as a data URL "
                                "or start the server with --allow-remote-images", code="allow_remote_images")
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.HTTPHandler(), urllib.request.HTTPSHandler(), _HTTPOnlyRedirects(),
                    urllib.request.HTTPErrorProcessor(), urllib.request.HTTPDefaultErrorHandler()):
        opener.add_handler(handler)
    request = urllib.request.Request(url, headers={"User-Agent": "kimivl-server"})
    try:
        with opener.open(request, timeout=limits.remote_timeout_s) as response:
            data = response.read(limits.max_body_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise _bad_media(label, f"could not fetch {url[:80]!r}: {e}", code="remote_fetch_failed") from e
    if len(data) > limits.max_body_bytes:
        raise APIError(413, f"{label}: {url[:80]!r} is over max_body_bytes={limits.max_body_bytes}",
                       code="max_body_bytes", param="messages")
    return data


def media_source(url: str, limits: ServerLimits, kind: str = "image", index: int = 0) -> bytes:
    """The bytes of an ``image_url`` / ``video_url`` (``kind`` "image" / "video"; a data URL, an allowed remote
    URL or an allowed local file) or of a ``file`` part's ``file_data`` (``kind`` "document": a data URL)."""
    label, code = f"{kind} {index}", f"invalid_{kind}"
    if url.startswith("data:"):
        return _decode_data_url(url, kind, label, code)
    if kind == "document":
        raise _bad_media(label, f"file_data must be a data URL, data:application/pdf;base64,<data> (got "
                                f"{url[:40]!r})", code)
    scheme = urllib.parse.urlparse(url).scheme.lower()
    if scheme in ("http", "https"):
        return _fetch_remote(url, limits, kind, label)
    if scheme == "file" or (scheme == "" and os.path.isabs(url)):
        return _local_file(url, limits, label)
    raise _bad_media(label, f"unsupported {kind} URL {url[:80]!r}: use a data URL"
                            + (", http(s)" if limits.allow_remote_images else "")
                            + (" or a file path" if limits.allowed_local_media_path else ""), code)


def check_pixels(source: bytes, limits: ServerLimits, index: int) -> int:
    """Width x height from the header; over ``max_image_pixels`` is refused before decoding."""
    try:
        width, height = image_size(source, label=f"image {index}")
    except KimiVLInputError as e:
        raise APIError(400, str(e), code="invalid_image", param="messages") from e
    if width * height > limits.max_image_pixels:
        raise _bad_media(f"image {index}", f"{width}x{height} = {width * height:,} pixels is over the server's "
                                           f"max_image_pixels={limits.max_image_pixels:,}", code="max_image_pixels")
    return width * height


def check_video_pixels(source: bytes, limits: ServerLimits, index: int) -> int:
    """A video's frame size from its container (nothing decoded); frames over ``max_image_pixels`` are refused."""
    label = f"video {index}"
    try:
        decoder = PyAVDecoder()
    except ImportError as e:
        raise _bad_media(label, str(e), code="media_unsupported") from e
    try:
        info = decoder.probe(source, label)
    except KimiVLInputError as e:
        raise APIError(400, str(e), code="invalid_video", param="messages") from e
    if info.width * info.height > limits.max_image_pixels:
        raise _bad_media(label, f"its {info.width}x{info.height} = {info.width * info.height:,}-pixel frames are over "
                                f"the server's max_image_pixels={limits.max_image_pixels:,}", code="max_image_pixels")
    return info.width * info.height


def _media_part(part: ImagePart | VideoPart | FilePart, limits: ServerLimits, index: int) -> dict[str, Any]:
    """A media part in the processor's format, its bytes read and checked (``index`` counts its kind)."""
    if isinstance(part, ImagePart):
        source = media_source(part.image_url.url, limits, "image", index)
        check_pixels(source, limits, index)
        return {"type": "image", "image": source}
    if isinstance(part, VideoPart):
        source = media_source(part.video_url.url, limits, "video", index)
        check_video_pixels(source, limits, index)
        return {"type": "video", "video": source}
    if part.file.file_data is None:
        what = "file_id (this server has no Files API)" if part.file.file_id is not None else "nothing"
        raise _bad_media(f"document {index}", f"a file part needs file_data, a data:application/pdf;base64 URL; got "
                                              f"{what}", code="invalid_document")
    return {"type": "document", "document": media_source(part.file.file_data, limits, "document", index)}


def processor_messages(request: ChatCompletionRequest, limits: ServerLimits) -> list[dict[str, Any]]:
    """The request's messages in the processor's format, with every image, video and PDF read, checked and
    bounded."""
    parts = [p for m in request.messages if isinstance(m.content, list) for p in m.content]
    for kind, bound in (("image", limits.max_images), ("video", limits.max_videos),
                        ("document", limits.max_documents)):
        count = sum(MEDIA_PARTS.get(type(p)) == kind for p in parts)
        if count > bound:
            raise APIError(400, f"the request has {count} {kind}s; the server's max_{kind}s is {bound}",
                           code=f"max_{kind}s", param="messages")
    out: list[dict[str, Any]] = []
    counts = dict.fromkeys(MEDIA_PARTS.values(), 0)
    for i, message in enumerate(request.messages):
        echoed = message.echoed_fields()
        if echoed and message.role != "assistant":
            raise APIError(400, f"messages[{i}].{echoed[0]} is a field of assistant messages, not {message.role} "
                                "ones", code="invalid_value", param=f"messages[{i}].{echoed[0]}")
        if message.tool_calls:
            raise APIError(400, f"messages[{i}].tool_calls: this server runs no tools (tool calls are not "
                                "supported)", code="invalid_value", param=f"messages[{i}].tool_calls")
        if isinstance(message.content, str):
            out.append({"role": message.role, "content": message.content})
            continue
        items: list[dict[str, Any]] = []
        for part in message.content:
            kind = MEDIA_PARTS.get(type(part))
            if kind is None:
                items.append({"type": "text", "text": part.text})
                continue
            items.append(_media_part(part, limits, counts[kind]))
            counts[kind] += 1
        out.append({"role": message.role, "content": items})
    return out
