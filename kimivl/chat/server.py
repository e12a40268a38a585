"""OpenAI-compatible HTTP server (``kimivl serve``): chat completions with images, SSE streaming, a chat page.

Endpoints: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health`` and the static page at ``/``
(``kimivl/chat/static/index.html``). Wire format in :mod:`kimivl.chat.protocol`, bounds and the media policy in
:mod:`kimivl.chat.policy`, the single model thread in :mod:`kimivl.chat.worker`. Requests are prepared
(parsed, bounded, tokenised, pixels decoded) before they queue, so every input error is a 4xx JSON error in
the OpenAI shape before any answer starts. Needs the ``serve`` extra (FastAPI + uvicorn). See docs/serving.md.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

try:
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.types import Receive, Scope, Send
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("the kimivl server needs the [serve] extra: pip install 'kimivl[serve]' "
                      "(fastapi, uvicorn)") from e

from kimivl.chat.limits import ServerLimits
from kimivl.chat.policy import processor_messages
from kimivl.chat.protocol import (APIError, ChatCompletionRequest, choice_body, chunk_body, completion_body,
                                  new_completion_id, parse_request, reasoning_fields, sse, usage_body)
from kimivl.chat.worker import Event, Job, ModelWorker, QueueFull
from kimivl.errors import KimiVLInputError
from kimivl.generation import GrammarConstraint, LogitBias, PresenceFrequencyPenalty, resolve_generation_config
from kimivl.processing import ThinkingStream

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
_DRAIN_FACTOR = 8  # an over-long body is read (and dropped) up to 8x the bound so the client sees the 413
_PAGE_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
                 "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
                                            "style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
                                            "connect-src 'self'; frame-ancestors 'none'"}
# --reasoning-parser: the thinking models' ◁think▷…◁/think▷ block goes to reasoning_content (vLLM's name for it)
REASONING_PARSERS = ("kimi_vl",)


class _EventStream(StreamingResponse):
    """SSE response tied to a job: a client disconnect (seen on ``receive``) or any exit cancels the job."""

    def __init__(self, content: AsyncIterator[bytes], job: Job) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
        watcher.add_done_callback(lambda task: task.cancelled() or self.job.cancel())
        try:
            await self.stream_response(send)
        except OSError:  # the client went away while we were writing
            logger.info("streaming client disconnected")
        finally:
            watcher.cancel()
            self.job.cancel()


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 over ``limit`` bytes (declared or counted)."""
    too_big = APIError(413, f"the request body is over the server's max_body_bytes={limit:,}", code="max_body_bytes")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise APIError(400, f"invalid Content-Length {declared[:20]!r}", code="invalid_request")
        if int(declared) > _DRAIN_FACTOR * limit:
            raise too_big
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > _DRAIN_FACTOR * limit:
            break
        if size <= limit:
            chunks.append(chunk)
    if size > limit:
        raise too_big
    return b"".join(chunks)


class _Service:
    """What the routes share: model, processor, limits, the worker and a lock around processor calls."""

    def __init__(self, model: Any, processor: Any, model_name: str, limits: ServerLimits,
                 reasoning_parser: str | None = None) -> None:
        self.model = model
        self.reasoning_parser = reasoning_parser
        self.processor = processor
        self.model_name = model_name
        self.limits = limits
        self.worker = ModelWorker(model, processor, limits.max_queue, limits.prompt_caches,
                                  int(limits.prompt_cache_gib * 2**30))
        self.processor_lock = threading.Lock()
        self.created = int(time.time())
        self.page = (STATIC_DIR / "index.html").read_text(encoding="utf-8")

    def default_max_tokens(self) -> int:
        if self.limits.default_max_tokens is not None:
            return self.limits.default_max_tokens
        return resolve_generation_config(self.model).max_new_tokens

    def settings(self, req: ChatCompletionRequest, stops: list[str]) -> tuple[dict[str, Any], list[int], bool]:
        """``generate`` overrides for a request (checked here, so bad values are a 400), its stop ids and whether it
        samples (greedy answers to ``n > 1`` are one answer given ``n`` times)."""
        settings: dict[str, Any] = {"top_p": req.top_p, "top_k": req.top_k, "min_p": req.min_p,
                                    "repetition_penalty": req.repetition_penalty, "min_new_tokens": req.min_tokens,
                                    "seed": req.seed, "stop_strings": stops or None}
        if req.temperature is not None:
            settings["do_sample"] = req.temperature > 0
            settings["temperature"] = req.temperature if req.temperature > 0 else None
        if req.ignore_eos:
            settings["eos_token_id"] = []
        settings = {k: v for k, v in settings.items() if v is not None}
        checked = {k: v for k, v in settings.items() if k != "seed"}
        try:
            config = resolve_generation_config(self.model, **checked)
        except KimiVLInputError as e:
            raise APIError(400, str(e), code="invalid_value") from e
        return settings, config.eos_ids(), config.do_sample

    def processors(self, req: ChatCompletionRequest, prompt_tokens: int) -> list[Any]:
        """``logits_processor`` entries for the request's presence / frequency penalties, logit bias and
        ``response_format`` (a JSON grammar)."""
        out: list[Any] = []
        if req.presence_penalty or req.frequency_penalty:
            out.append(PresenceFrequencyPenalty(prompt_tokens, req.presence_penalty or 0.0,
                                                req.frequency_penalty or 0.0))
        vocab = getattr(self.model, "language_model", self.model).config.vocab_size
        bias = req.logit_bias_ids(vocab)
        if bias:
            out.append(LogitBias(bias, vocab))
        schema = req.json_schema()
        if schema is not None:  # last: the grammar has the final say on what may follow
            try:
                # with a reasoning parser, a Thinking model's ◁think▷ block comes first, free; the JSON after it
                out.append(GrammarConstraint.json_schema(self.processor, schema, vocab_size=vocab,
                                                         stop_ids=resolve_generation_config(self.model).eos_ids(),
                                                         after_reasoning=self.reasoning_parser is not None))
            except KimiVLInputError as e:
                raise APIError(400, f"response_format: {e}", code="invalid_value", param="response_format") from e
            except ImportError as e:
                raise APIError(400, f"response_format: {e}", code="unsupported_value", param="response_format") from e
        return out

    def prepare(self, req: ChatCompletionRequest) -> tuple[dict[str, Any], int, int, int]:
        """Messages -> model inputs, bounded; returns (inputs, prompt tokens, image tokens, max new tokens)."""
        messages = processor_messages(req, self.limits)
        requested = req.requested_max_tokens()
        with self.processor_lock:
            try:
                report = self.processor.preflight(messages, check=False)
                context = self.processor.context_length
                prompt = report.total_tokens
                if context is not None:
                    room = context - prompt
                    new = requested if requested is not None else min(self.default_max_tokens(), room)
                    if prompt + max(new, 1) > context:
                        asked = f" + max_tokens {requested}" if requested is not None else ""
                        detail = f" ({report.summary()})" if report.media else ""
                        raise APIError(400, f"the prompt is {prompt} tokens{detail}{asked}, over the model's "
                                            f"context_length of {context} tokens",
                                       code="context_length_exceeded", param="messages")
                else:
                    new = requested if requested is not None else self.default_max_tokens()
                inputs = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                            return_dict=True, return_tensors="pt")
            except KimiVLInputError as e:
                raise APIError(400, str(e), code="invalid_input", param="messages") from e
            except ImportError as e:  # a PDF without pypdfium2 on the server: the message names the install
                raise APIError(400, str(e), code="media_unsupported", param="messages") from e
        image_tokens = int((inputs["input_ids"] == self.processor.image_token_id).sum())
        device = next(self.model.parameters()).device
        return dict(inputs.to(device)), int(inputs["input_ids"].shape[1]), image_tokens, new


async def _collect(job: Job) -> list[Event]:
    """Wait for a non-streamed job: each answer's whole text in one ``end`` event, in answer order (or the job's
    ``error`` / ``cancelled`` event alone)."""
    pieces: list[list[str]] = [[] for _ in range(job.choices)]
    logprobs: list[list[dict[str, Any]]] = [[] for _ in range(job.choices)]
    ends: dict[int, Event] = {}
    while len(ends) < job.choices:
        event = await job.events.get()
        if event.kind == "delta":
            pieces[event.index].append(event.text)
            logprobs[event.index].extend(event.logprobs)
        elif event.kind == "end":
            ends[event.index] = Event("end", "".join(pieces[event.index]), event.finish_reason,
                                      event.completion_tokens, tuple(logprobs[event.index]), event.index,
                                      event.cached_tokens)
        else:
            return [event]
    return [ends[i] for i in range(job.choices)]


class _ReasoningDeltas:
    """One streamed answer's deltas split into reasoning and content (``--reasoning-parser``). A token's logprobs
    wait for the first delta that carries text, so every chunk has text and no entry is lost."""

    def __init__(self) -> None:
        self.split = ThinkingStream()
        self.logprobs: list[dict[str, Any]] = []

    def delta(self, text: str, logprobs: tuple[dict[str, Any], ...], last: bool = False
              ) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        """The chunk delta and its logprobs, or None while nothing can be sent; ``last`` flushes the rest."""
        self.logprobs.extend(logprobs)
        reasoning, content = self.split.push(text)
        if last:
            more_reasoning, more_content = self.split.flush()
            reasoning, content = reasoning + more_reasoning, content + more_content
        if not (reasoning or content or (last and self.logprobs)):
            return None
        out: dict[str, Any] = reasoning_fields(reasoning) if reasoning else {}
        if content or not reasoning:
            out["content"] = content
        sent, self.logprobs = self.logprobs, []
        return out, sent


def split_reasoning(text: str) -> tuple[str | None, str]:
    """A whole answer -> (reasoning or None without a thinking block, content), as the streamed deltas join."""
    split = ThinkingStream()
    reasoning, content = split.push(text)
    more_reasoning, more_content = split.flush()
    return (reasoning + more_reasoning if split.had_reasoning else None), content + more_content


async def _sse_events(job: Job, cid: str, name: str, prompt: int, images: int, include_usage: bool,
                      reasoning_parser: str | None = None) -> AsyncIterator[bytes]:
    created = int(time.time())
    with_logprobs = job.top_logprobs is not None
    splits = [_ReasoningDeltas() for _ in range(job.choices)] if reasoning_parser else None
    for index in range(job.choices):
        yield sse(chunk_body(cid, name, created, {"role": "assistant", "content": ""}, index=index))
    ended, completion_tokens, cached = 0, 0, 0
    while True:
        event = await job.events.get()
        if event.kind == "delta":
            piece = splits[event.index].delta(event.text, event.logprobs) if splits else ({"content": event.text},
                                                                                           list(event.logprobs))
            if piece is not None:
                yield sse(chunk_body(cid, name, created, piece[0], logprobs=piece[1] if with_logprobs else None,
                                     index=event.index))
        elif event.kind == "end":
            piece = splits[event.index].delta("", (), last=True) if splits else None
            if piece is not None:
                yield sse(chunk_body(cid, name, created, piece[0], logprobs=piece[1] if with_logprobs else None,
                                     index=event.index))
            yield sse(chunk_body(cid, name, created, {}, finish_reason=event.finish_reason, index=event.index))
            ended, completion_tokens = ended + 1, completion_tokens + event.completion_tokens
            cached = event.cached_tokens
            if ended < job.choices:
                continue
            if include_usage:
                yield sse(chunk_body(cid, name, created, None,
                                     usage=usage_body(prompt, images, completion_tokens, cached)))
            yield sse("[DONE]")
            return
        elif event.kind == "error":
            yield sse(APIError(500, event.text, code="generation_failed", type="server_error").body())
            yield sse("[DONE]")
            return
        else:
            return


def create_app(model: Any, processor: Any, *, model_name: str = "kimivl", limits: ServerLimits | None = None,
               reasoning_parser: str | None = None) -> FastAPI:
    """The FastAPI app serving ``model`` (a loaded KimiVL model) with ``processor``; the model worker thread
    starts and stops with the app's lifespan. ``reasoning_parser="kimi_vl"`` returns a thinking model's
    reasoning in ``reasoning_content`` / ``reasoning`` and only the answer in ``content``."""
    if reasoning_parser is not None and reasoning_parser not in REASONING_PARSERS:
        raise ValueError(f"unknown reasoning parser {reasoning_parser!r}; choose one of {list(REASONING_PARSERS)}")
    service = _Service(model, processor, model_name, limits or ServerLimits(), reasoning_parser)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.worker.start()
        logger.info("serving %s", model_name)
        yield
        service.worker.stop()

    app = FastAPI(title="kimivl", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(APIError(exc.status_code, str(exc.detail), code=code).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s", request.url.path)
        body = APIError(500, f"internal error: {type(exc).__name__}", code="internal_error", type="server_error")
        return JSONResponse(body.body(), status_code=500)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(service.page, headers=_PAGE_HEADERS)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        worker = service.worker
        return {"status": "ok", "model": model_name, "busy": worker.busy, "waiting": worker.waiting,
                "requests": dict(worker.stats)}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": service.created,
                                            "owned_by": "kimivl",
                                            "max_model_len": service.processor.context_length}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = parse_request(await _read_body(request, service.limits.max_body_bytes))
        if req.model is not None and req.model != model_name:
            raise APIError(404, f"model {req.model!r} is not served here; this server serves {model_name!r}",
                           code="model_not_found", param="model")
        req.unsupported()
        stops = req.stop_strings()
        settings, eos_ids, sampling = service.settings(req, stops)
        inputs, prompt, images, new = await run_in_threadpool(service.prepare, req)
        top_logprobs = req.logprobs_top()
        processors = await run_in_threadpool(service.processors, req, prompt)  # a grammar takes a while to build
        job = Job(inputs, {**settings, "max_new_tokens": new}, stops, eos_ids, asyncio.get_running_loop(),
                  top_logprobs=top_logprobs, choices=req.n, copies=req.n > 1 and not sampling, processors=processors)
        try:
            service.worker.submit(job)
        except QueueFull:
            raise APIError(429, f"the server is busy: {service.limits.max_queue} requests are waiting "
                                "(max_queue); retry later", code="max_queue", type="rate_limit_error") from None
        cid = new_completion_id()
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _EventStream(_sse_events(job, cid, model_name, prompt, images, include_usage, reasoning_parser),
                                job)
        collector = asyncio.ensure_future(_collect(job))
        watcher = asyncio.ensure_future(_wait_for_disconnect(request.receive))
        await asyncio.wait({collector, watcher}, return_when=asyncio.FIRST_COMPLETED)
        watcher.cancel()
        if not collector.done():  # the client is gone: free the worker, nobody reads the answer
            job.cancel()
            collector.cancel()
            return Response(status_code=499)
        results = collector.result()
        if results[0].kind != "end":
            raise APIError(500, results[0].text or "generation was cancelled", code="generation_failed",
                           type="server_error")
        choices = []
        for r in results:
            reasoning, text = split_reasoning(r.text) if reasoning_parser else (None, r.text)
            choices.append(choice_body(r.index, text, r.finish_reason or "stop",
                                       list(r.logprobs) if top_logprobs is not None else None,
                                       reasoning_fields(reasoning) if reasoning_parser else None))
        completion_tokens = sum(r.completion_tokens for r in results)
        usage = usage_body(prompt, images, completion_tokens, results[0].cached_tokens)
        return JSONResponse(completion_body(cid, model_name, choices, usage))

    return app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load(model_path: str | None, served_model_name: str | None = None, dtype: str | None = None,
         device: str | None = None, quantization: str | None = None) -> tuple[Any, Any, str]:
    """(model, processor, served name) of a checkpoint (default: the shipped demo model), as serving loads it."""
    from kimivl.chat.session import model_path_or_demo
    from kimivl.modeling import KimiVLForConditionalGeneration
    from kimivl.processing import KimiVLProcessor

    path = model_path_or_demo(model_path)
    model = KimiVLForConditionalGeneration.from_pretrained(path, dtype=dtype, device=device, progress=True,
                                                           quantization=quantization)
    return model, KimiVLProcessor.from_pretrained(path), served_model_name or Path(path).name or "kimivl"


def serve(model_path: str | None = None, *, host: str = "127.0.0.1", port: int = 8000,
          served_model_name: str | None = None, dtype: str | None = None, device: str | None = None,
          limits: ServerLimits | None = None, log_level: str = "info", reasoning_parser: str | None = None,
          quantization: str | None = None) -> None:
    """Load a checkpoint (default: the shipped demo model) and serve it with uvicorn until interrupted."""
    import uvicorn

    model, processor, name = load(model_path, served_model_name, dtype, device, quantization)
    if not is_loopback(host):
        logger.warning("binding to %s: the server has no authentication; anyone who can reach this address can "
                       "use it", host)
    app = create_app(model, processor, model_name=name, limits=limits, reasoning_parser=reasoning_parser)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
