"""The OpenAI chat-completions wire format: strict request models, error shape, response and chunk bodies.

Follows the public OpenAI API reference for ``POST /v1/chat/completions`` (request fields, ``chat.completion``
and ``chat.completion.chunk`` objects, ``{"error": {"message", "type", "param", "code"}}``). Deliberate
deviations: unknown fields are refused (400) instead of ignored, as are values asking for what is not here
(tools), ``n`` is at most 8, and extensions that vLLM also accepts exist (``top_k``, ``min_p``,
``repetition_penalty``, ``min_tokens``, ``ignore_eos``; ``video_url`` parts). ``logprobs`` are those of the model's own
next-token distribution (the raw logits, before temperature and top-k / top-p, as vLLM reports them). Needs
pydantic (the ``serve`` extra).
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_STOP_STRINGS = 4
MAX_CHOICES = 8  # n: answers per request, generated as one batch
MAX_STOP_LENGTH = 64


class APIError(Exception):
    """An error returned to the client as ``{"error": {...}}`` with an HTTP status.

    ``code`` names the rule that was broken (for bounds: the bound, e.g. ``max_images``); ``param`` the request
    field it concerns, when there is one.
    """

    def __init__(self, status: int, message: str, *, code: str, param: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, allow_inf_nan=False)


class ImageURL(_Strict):
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None  # accepted for compatibility; the processor decides


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(_Strict):
    url: str = Field(min_length=1)


class VideoPart(_Strict):
    """vLLM's extension for video models: ``{"type": "video_url", "video_url": {"url": ...}}``."""

    type: Literal["video_url"]
    video_url: VideoURL


class FileData(_Strict):
    file_data: str | None = None  # data:application/pdf;base64,...
    file_id: str | None = None  # OpenAI's uploaded files: no Files API here, refused with a 400 naming it
    filename: str | None = None  # accepted, not rendered


class FilePart(_Strict):
    """OpenAI's PDF input: ``{"type": "file", "file": {"file_data": "data:application/pdf;base64,...",
    "filename": ...}}``; read as a document (pages as images)."""

    type: Literal["file"]
    file: FileData


ContentPart = Annotated[TextPart | ImagePart | VideoPart | FilePart, Field(discriminator="type")]
MEDIA_PARTS = {ImagePart: "image", VideoPart: "video", FilePart: "document"}  # part class -> processor kind


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None  # accepted for compatibility, not rendered
    # What clients send back of an earlier answer (``messages.append(response.choices[0].message)``), on
    # assistant messages only; not rendered: earlier reasoning is not re-sent to the model (as ChatSession does).
    reasoning_content: str | None = None
    reasoning: str | None = None
    refusal: str | None = None
    annotations: list[Any] | None = None
    tool_calls: list[Any] | None = None  # must be empty: this server runs no tools
    function_call: None = None
    audio: None = None

    def echoed_fields(self) -> list[str]:
        """The answer-echo fields this message sets (to anything but null / an empty list)."""
        return [name for name in ("reasoning_content", "reasoning", "refusal", "annotations", "tool_calls")
                if getattr(self, name) not in (None, [])]


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)  # what torch.Generator.manual_seed takes
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    user: str | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    top_k: int | None = Field(default=None, ge=1)  # extension (vLLM)
    min_p: float | None = Field(default=None, ge=0, le=1)  # extension (vLLM)
    repetition_penalty: float | None = Field(default=None, gt=0)  # extension (vLLM; transformers' meaning)
    min_tokens: int | None = Field(default=None, ge=0)  # extension (vLLM): no end-of-turn before that many tokens
    ignore_eos: bool = False  # extension (vLLM): keep generating past the end-of-turn token
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    # Fields clients send with values that ask for nothing this server lacks: accepted at those values only
    # (checked by unsupported()); anything they would change is refused by name.
    response_format: dict[str, Any] | None = None  # text, json_object, json_schema (see json_schema())
    tools: list[Any] | None = None  # empty only: this server runs no tools
    tool_choice: str | None = None  # "none" / "auto" (with no tools both mean plain text)
    parallel_tool_calls: bool | None = None
    store: bool | None = None  # OpenAI's storage of completions: nothing is stored here either way
    metadata: dict[str, str] | None = None
    service_tier: str | None = None

    def json_schema(self) -> dict[str, Any] | None:
        """The JSON Schema ``response_format`` asks for (``{"type": "object"}`` for ``json_object``), or None for
        plain text; anything else is a 400 naming it."""
        fmt = self.response_format
        if fmt is None or fmt == {"type": "text"}:
            return None
        if fmt == {"type": "json_object"}:
            return {"type": "object"}
        if fmt.get("type") == "json_schema" and isinstance(fmt.get("json_schema"), dict) \
                and isinstance(fmt["json_schema"].get("schema"), dict) and set(fmt) == {"type", "json_schema"}:
            return fmt["json_schema"]["schema"]
        raise APIError(400, f"response_format must be {{\"type\": \"text\"}}, {{\"type\": \"json_object\"}} or "
                            f"{{\"type\": \"json_schema\", \"json_schema\": {{\"name\", \"schema\": {{...}}}}}}, "
                            f"got {json.dumps(fmt)[:120]}", code="invalid_value", param="response_format")

    def unsupported(self) -> None:
        """A 400 naming the field when a request asks for tools."""
        if self.tools:
            raise APIError(400, f"tools are not supported: this server runs no tools (got {len(self.tools)})",
                           code="unsupported_value", param="tools")
        if self.tool_choice not in (None, "none", "auto"):
            raise APIError(400, f"tool_choice {self.tool_choice!r} is not supported: this server runs no tools",
                           code="unsupported_value", param="tool_choice")

    def logprobs_top(self) -> int | None:
        """How many alternatives each token's logprob entry lists, or None without ``logprobs``."""
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", code="invalid_value", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def logit_bias_ids(self, vocab_size: int) -> dict[int, float]:
        """``logit_bias`` with integer keys; a key that is not a token id of the model is a 400 naming it."""
        out: dict[int, float] = {}
        for key, value in (self.logit_bias or {}).items():
            token = int(key) if key.strip().lstrip("-").isdigit() else None
            if token is None or not 0 <= token < vocab_size:
                raise APIError(400, f"logit_bias key {key!r} is not a token id of this model (0..{vocab_size - 1})",
                               code="invalid_value", param="logit_bias")
            if not -100 <= value <= 100:
                raise APIError(400, f"logit_bias[{key!r}] must be in [-100, 100], got {value}", code="invalid_value",
                               param="logit_bias")
            out[token] = value
        return out

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise APIError(400, f"stop has {len(stops)} strings; at most {MAX_STOP_STRINGS} are allowed",
                           code="invalid_value", param="stop")
        for s in stops:
            if not s or len(s) > MAX_STOP_LENGTH:
                raise APIError(400, f"each stop string must have 1 to {MAX_STOP_LENGTH} characters, got {len(s)}",
                               code="invalid_value", param="stop")
        return stops

    def requested_max_tokens(self) -> int | None:
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise APIError(400, f"max_tokens={self.max_tokens} and max_completion_tokens="
                                f"{self.max_completion_tokens} disagree; send one of them",
                           code="invalid_value", param="max_completion_tokens")
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def _location(loc: tuple[Any, ...]) -> str:
    """``messages[0].content[1].image_url.url`` from a pydantic error path (union branch names and the
    discriminator tag that pydantic inserts are left out)."""
    out, skip_tag, in_union = "", False, False
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            skip_tag, in_union = in_union, False
        elif part == "str" or "[" in part:
            in_union = "tagged-union" in part
        elif skip_tag:
            skip_tag = False
        else:
            out += f".{part}" if out else part
    return out or "body"


def _pick(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """The most useful of pydantic's errors: an unknown field, else the deepest one not on the ``str`` branch
    of ``content`` (a list given for content is not meant as a string)."""
    extra = [err for err in errors if err["type"] == "extra_forbidden"]
    if extra:
        return extra[0]
    not_str = [err for err in errors if "str" not in err["loc"][-1:]] or errors
    return max(not_str, key=lambda err: len(err["loc"]))


def parse_request(body: bytes) -> ChatCompletionRequest:
    """Decode and validate a request body; every problem is an :class:`APIError` (400), never a crash."""
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from e
    except (RecursionError, ValueError) as e:
        raise APIError(400, f"the request body is not acceptable JSON: {e}", code="invalid_json") from e
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}",
                       code="invalid_json")
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as e:
        err = _pick(e.errors(include_url=False))
        where = _location(tuple(err["loc"]))
        if err["type"] == "extra_forbidden":
            raise APIError(400, f"unknown or unsupported field {where!r}", code="unknown_field", param=where) from e
        message = err["msg"]
        if err["type"] == "list_type" and where.endswith(".content"):
            message = "content must be a string or a list of text / image_url parts"
        raise APIError(400, f"invalid {where}: {message}", code="invalid_value", param=where) from e


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


# ---------------------------------------------------------------------------------------------- responses

def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage_body(prompt_tokens: int, image_tokens: int, completion_tokens: int, cached_tokens: int = 0
               ) -> dict[str, Any]:
    """``cached_tokens``: prompt tokens read from the prompt cache instead of prefilled (OpenAI's field)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens, "image_tokens": image_tokens}}


def logprobs_body(entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """A choice's ``logprobs`` object: one entry per token (see :func:`logprob_entry`), or None when not asked."""
    return None if entries is None else {"content": list(entries), "refusal": None}


def logprob_entry(token: str, token_bytes: bytes, logprob: float,
                  top: list[tuple[str, bytes, float]] | None = None) -> dict[str, Any]:
    """``{"token", "logprob", "bytes", "top_logprobs"}`` of one generated token."""
    return {"token": token, "logprob": logprob, "bytes": list(token_bytes),
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(b)} for t, b, lp in top or []]}


def reasoning_fields(reasoning: str | None) -> dict[str, str | None]:
    """The reasoning of a thinking model's answer under both names clients read: ``reasoning_content`` (DeepSeek's
    API, vLLM before 0.11) and ``reasoning`` (vLLM since)."""
    return {"reasoning_content": reasoning, "reasoning": reasoning}


def choice_body(index: int, text: str, finish_reason: str, logprobs: list[dict[str, Any]] | None = None,
                reasoning: dict[str, str | None] | None = None) -> dict[str, Any]:
    """One answer of a ``chat.completion``; ``reasoning``: :func:`reasoning_fields` when a reasoning parser runs."""
    return {"index": index, "message": {"role": "assistant", "content": text, **(reasoning or {})},
            "logprobs": logprobs_body(logprobs), "finish_reason": finish_reason}


def completion_body(cid: str, model: str, choices: list[dict[str, Any]], usage: dict[str, Any],
                    created: int | None = None) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion", "created": created or int(time.time()), "model": model,
            "choices": choices, "usage": usage}


def chunk_body(cid: str, model: str, created: int, delta: dict[str, Any] | None,
               finish_reason: str | None = None, usage: dict[str, Any] | None = None,
               logprobs: list[dict[str, Any]] | None = None, index: int = 0) -> dict[str, Any]:
    """One ``chat.completion.chunk`` of answer ``index``; ``delta=None`` gives the usage-only chunk (empty
    ``choices``)."""
    choices = [] if delta is None else [{"index": index, "delta": delta, "logprobs": logprobs_body(logprobs),
                                         "finish_reason": finish_reason}]
    out: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                           "choices": choices}
    if usage is not None or delta is None:
        out["usage"] = usage
    return out


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event: ``data: <json>`` and a blank line (``[DONE]`` is sent verbatim)."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, allow_nan=False)
    return f"data: {payload}\n\n".encode()
