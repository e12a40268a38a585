"""``kimivl run-batch``: an OpenAI Batch API input file answered offline by the server's own code.

Each input line is ``{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body": {...}}`` (OpenAI's
batch format, as vLLM's ``run-batch`` reads it); each output line, in input order, is ``{"id", "custom_id",
"response": {"status_code", "request_id", "body"}, "error"}``. The bodies go through the same ASGI app as
``kimivl serve`` (:func:`kimivl.chat.server.create_app`, called in-process: no socket), so validation, media
policy, bounds, sampling and every error are exactly the server's; a request the server refuses gets its 4xx
``response``, a line that is not a request at all an ``error`` (nothing is dropped). A few requests are prepared
while the model worker answers another (``concurrency``).
"""
from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

from kimivl.chat.limits import ServerLimits

logger = logging.getLogger(__name__)

ENDPOINT = "/v1/chat/completions"


async def _post(app: Any, body: bytes) -> tuple[int, Any]:
    """One POST to the app's chat endpoint through ASGI; (status, parsed JSON body)."""
    delivered, finished = False, asyncio.Event()

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await finished.wait()  # the "client" stays connected until the response is complete
        return {"type": "http.disconnect"}

    status, chunks = 500, []

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": ENDPOINT, "raw_path": ENDPOINT.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0)}
    try:
        await app(scope, receive, send)
    finally:
        finished.set()
    return status, json.loads(b"".join(chunks) or b"null")


def _line_error(custom_id: Any, code: str, message: str) -> dict[str, Any]:
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message}}


async def _answer(app: Any, number: int, line: str, gate: asyncio.Semaphore) -> dict[str, Any]:
    """The output record of input line ``number`` (1-based)."""
    try:
        request = json.loads(line)
    except json.JSONDecodeError as e:
        return _line_error(None, "invalid_json", f"line {number}: not JSON ({e})")
    if not isinstance(request, dict):
        return _line_error(None, "invalid_request", f"line {number}: a request must be a JSON object")
    custom_id = request.get("custom_id")
    if request.get("method", "POST") != "POST" or request.get("url") != ENDPOINT:
        return _line_error(custom_id, "invalid_url", f"line {number}: only POST {ENDPOINT} is served, got "
                                                     f"{request.get('method')} {request.get('url')}")
    body = request.get("body")
    if not isinstance(body, dict):
        return _line_error(custom_id, "invalid_request", f"line {number}: 'body' must be a JSON object")
    if body.get("stream"):
        return _line_error(custom_id, "invalid_request", f"line {number}: stream is not supported in a batch")
    async with gate:
        status, response = await _post(app, json.dumps(body).encode())
    request_id = response.get("id") if isinstance(response, dict) and status == 200 else None
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
            "response": {"status_code": status, "request_id": request_id or f"req_{uuid.uuid4().hex}",
                         "body": response}, "error": None}


async def _run(app: Any, lines: Iterable[str], concurrency: int) -> list[dict[str, Any]]:
    gate = asyncio.Semaphore(concurrency)
    tasks = [asyncio.ensure_future(_answer(app, number, line, gate))
             for number, line in enumerate(lines, 1) if line.strip()]
    return [await task for task in tasks]


def run_batch(model: Any, processor: Any, lines: Iterable[str], *, model_name: str = "kimivl",
              limits: ServerLimits | None = None, reasoning_parser: str | None = None,
              concurrency: int = 4) -> Iterator[dict[str, Any]]:
    """The output records of the batch ``lines`` (JSONL strings), in input order (blank lines skipped)."""
    from kimivl.chat.server import create_app

    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    app = create_app(model, processor, model_name=model_name, limits=limits, reasoning_parser=reasoning_parser)
    worker = app.state.service.worker
    worker.start()
    try:
        records = asyncio.run(_run(app, lines, concurrency))
    finally:
        worker.stop()
    stats = worker.stats
    logger.info("batch done: %d records, %d completed, %d failed", len(records), stats["completed"], stats["failed"])
    yield from records
