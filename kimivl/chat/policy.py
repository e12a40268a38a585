"""The media access policy: which image URLs a request may use, and the per-image and per-request bounds.

Every refusal is an :class:`~kimivl.chat.protocol.APIError` whose ``code`` names the bound or rule (the same
name as the :class:`~kimivl.chat.limits.ServerLimits` field and, with dashes, the ``kimivl serve`` flag).
Images arrive as ``data:`` URLs; ``http(s)`` URLs are fetched only with ``allow_remote_images`` (bounded in
size and time); ``file://`` URLs and absolute paths are read only when they resolve (symlinks included) to a
file under ``allowed_local_media_path``. Pixel counts come from the image header, before any pixel is decoded.
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
from kimivl.chat.protocol import APIError, ChatCompletionRequest, ImagePart
from kimivl.errors import KimiVLInputError
from kimivl.processing import image_size

logger = logging.getLogger(__name__)


def _bad_image(index: int, message: str, code: str = "invalid_image") -> APIError:
    return APIError(400, f"image {index}: {message}", code=code, param="messages")


def _decode_data_url(url: str, index: int) -> bytes:
    header, sep, payload = url[len("data:"):].partition(",")
    if not sep or not header.startswith("image/") or not header.endswith(";base64"):
        raise _bad_image(index, f"data URLs must look like data:image/<type>;base64,<data> (got {url[:40]!r})")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise _bad_image(index, f"the data URL payload is not valid base64 ({e})") from e


def _local_file(url: str, limits: ServerLimits, index: int) -> bytes:
    if limits.allowed_local_media_path is None:
        raise _bad_image(index, "local file paths are refused: the server was started without "
                                "--allowed-local-media-path", code="allowed_local_media_path")
    raw = urllib.parse.unquote(urllib.parse.urlparse(url).path) if url.startswith("file:") else url
    root = Path(limits.allowed_local_media_path).resolve()
    try:
        path = Path(raw).resolve(strict=True)  # follows symlinks and removes '..' before the check
    except (OSError, RuntimeError):
        raise _bad_image(index, f"file not found: {raw!r}", code="allowed_local_media_path") from None
    if not path.is_relative_to(root) or not path.is_file():
        raise _bad_image(index, f"{raw!r} is not a file under the allowed local media path {str(root)!r}",
                         code="allowed_local_media_path")
    # read now, from the checked path: nothing swapped in later can be read instead
    with path.open("rb") as f:
        data = f.read(limits.max_body_bytes + 1)
    if len(data) > limits.max_body_bytes:
        raise APIError(413, f"image {index}: {raw!r} is over max_body_bytes={limits.max_body_bytes}",
                       code="max_body_bytes", param="messages")
    return data


class _HTTPOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) only (the stock handler also follows ftp)."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> urllib.request.Request | None:
        if urllib.parse.urlparse(newurl).scheme.lower() not in ("http", "https"):
            raise urllib.error.URLError(f"redirect to a non-http(s) URL {newurl[:80]!r} refused")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _fetch_remote(url: str, limits: ServerLimits, index: int) -> bytes:
    if not limits.allow_remote_images:
        raise _bad_image(index, f"remote image URLs are refused ({url[:80]!r}); send the image as a data URL "
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
        raise _bad_image(index, f"could not fetch {url[:80]!r}: {e}", code="remote_fetch_failed") from e
    if len(data) > limits.max_body_bytes:
        raise APIError(413, f"image {index}: {url[:80]!r} is over max_body_bytes={limits.max_body_bytes}",
                       code="max_body_bytes", param="messages")
    return data


def image_source(url: str, limits: ServerLimits, index: int) -> bytes:
    """The bytes of an ``image_url`` (data URL, allowed remote URL or allowed local file)."""
    if url.startswith("data:"):
        return _decode_data_url(url, index)
    scheme = urllib.parse.urlparse(url).scheme.lower()
    if scheme in ("http", "https"):
        return _fetch_remote(url, limits, index)
    if scheme == "file" or (scheme == "" and os.path.isabs(url)):
        return _local_file(url, limits, index)
    raise _bad_image(index, f"unsupported image URL {url[:80]!r}: use a data URL"
                            + (", http(s)" if limits.allow_remote_images else "")
                            + (" or a file path" if limits.allowed_local_media_path else ""))


def check_pixels(source: bytes, limits: ServerLimits, index: int) -> int:
    """Width x height from the header; over ``max_image_pixels`` is refused before decoding."""
    try:
        width, height = image_size(source, label=f"image {index}")
    except KimiVLInputError as e:
        raise APIError(400, str(e), code="invalid_image", param="messages") from e
    if width * height > limits.max_image_pixels:
        raise _bad_image(index, f"{width}x{height} = {width * height:,} pixels is over the server's "
                                f"max_image_pixels={limits.max_image_pixels:,}", code="max_image_pixels")
    return width * height


def processor_messages(request: ChatCompletionRequest, limits: ServerLimits) -> list[dict[str, Any]]:
    """The request's messages in the processor's format, with every image fetched, checked and bounded."""
    n_images = sum(isinstance(p, ImagePart) for m in request.messages if isinstance(m.content, list)
                   for p in m.content)
    if n_images > limits.max_images:
        raise APIError(400, f"the request has {n_images} images; the server's max_images is {limits.max_images}",
                       code="max_images", param="messages")
    out: list[dict[str, Any]] = []
    index = 0
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
        parts: list[dict[str, Any]] = []
        for part in message.content:
            if isinstance(part, ImagePart):
                source = image_source(part.image_url.url, limits, index)
                check_pixels(source, limits, index)
                parts.append({"type": "image", "image": source})
                index += 1
            else:
                parts.append({"type": "text", "text": part.text})
        out.append({"role": message.role, "content": parts})
    return out
