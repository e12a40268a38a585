"""Chat rendering: one Jinja renderer for the inference prompt and the training loss mask; thinking helpers.

Spec: ``shared/reference/kimivl-spec.md`` §6.3 (chat format) and §1.4 (thinking output). The checkpoint's
own template (``chat_template.jinja`` or the ``chat_template`` key) is rendered in a sandbox; without one,
``DEFAULT_CHAT_TEMPLATE`` (written from §6.3) is used. For training, each assistant message's content is
wrapped in two private-use sentinel characters before the *same* rendering, and their positions give the
trainable spans (assistant content + the special token that closes it), so chat and fine-tuning cannot
drift apart. Video and document items reach the template as text holding ``VIDEO_BLOCK`` /
``DOCUMENT_BLOCK``, which the processor expands into frames / pages.
"""
from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from kimivl.errors import KimiVLInputError

MEDIA_PAD = "<|media_pad|>"
IMAGE_BLOCK = "<|media_start|>image<|media_content|><|media_pad|><|media_end|>"
VIDEO_BLOCK = "<|media_start|>video<|media_content|><|media_pad|><|media_end|>"
DOCUMENT_BLOCK = "<|media_start|>document<|media_content|><|media_pad|><|media_end|>"
THINK_OPEN = "◁think▷"
THINK_CLOSE = "◁/think▷"

# The Kimi-VL chat format of spec §6.3: default system prompt when the first message is not a system
# message, role token + role name + <|im_middle|> + content + <|im_end|> per message, one image block per
# image item, text items verbatim, optional generation prefix. No BOS.
DEFAULT_CHAT_TEMPLATE = """
{%- for message in messages -%}
    {%- if loop.first and message['role'] != 'system' -%}
        <|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|>
    {%- endif -%}
    {%- if message['role'] == 'system' -%}<|im_system|>
    {%- elif message['role'] == 'user' -%}<|im_user|>
    {%- elif message['role'] == 'assistant' -%}<|im_assistant|>
    {%- endif -%}
    {{- message['role'] -}}<|im_middle|>
    {%- if message['content'] is string -%}
        {{- message['content'] -}}
    {%- else -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' or 'image' in item or 'image_url' in item -%}
                <|media_start|>image<|media_content|><|media_pad|><|media_end|>
            {%- else -%}
                {{- item['text'] -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    <|im_end|>
{%- endfor -%}
{%- if add_generation_prompt -%}
    <|im_assistant|>assistant<|im_middle|>
{%- endif -%}
"""

# Roles of the Kimi-VL format (spec §6.3), each written after its own token; a template may test for more.
ROLES = ("system", "user", "assistant")
# A role a template tests for: message['role'] == 'tool', message.role == "tool", ...
_TEMPLATE_ROLE = re.compile(r"""\brole['"]?\]?\s*==\s*['"]([^'"]+)['"]""")

# Private-use code points that mark assistant content during the training render.
_OPEN, _CLOSE = "\U00100000", "\U00100001"
_SENTINELS = re.compile(f"[{_OPEN}{_CLOSE}]")
_MEDIA_KEYS = {"image": ("image", "image_url", "url", "path"), "video": ("video", "url", "path"),
               "document": ("document", "url", "path")}


@dataclass(frozen=True)
class MediaItem:
    """A media content item in conversation order: its kind, source and per-item options."""

    kind: str
    source: Any
    options: dict[str, Any] = field(default_factory=dict)
    label: str = ""


def _item_kind(item: dict[str, Any], where: str) -> str:
    kind = item.get("type")
    if kind == "image_url":
        return "image"
    if kind in ("text", "image", "video", "document"):
        return kind
    for key in ("image", "image_url", "video", "document", "text"):
        if kind is None and key in item:
            return "image" if key == "image_url" else key
    raise KimiVLInputError(f"{where}: unknown content type {kind!r} (expected text, image, image_url, video or "
                           "document)")


def prepare_messages(messages: Sequence[dict[str, Any]], *, need_sources: bool = True,
                     roles: Collection[str] = ROLES) -> tuple[list[dict[str, Any]], list[MediaItem]]:
    """Validate a conversation and split it into template input and media items (in order).

    Video and document items become text items holding ``VIDEO_BLOCK`` / ``DOCUMENT_BLOCK``. With
    ``need_sources`` an image/video/document item without its data is an error. A role outside ``roles``
    (``ChatRenderer.roles``: the Kimi-VL roles and any other the template tests for) is an error: the
    template would write it without a role token.
    """
    if isinstance(messages, dict) or not isinstance(messages, Sequence) or isinstance(messages, str):
        raise KimiVLInputError(f"a conversation is a list of message dicts, got {type(messages).__name__}")
    if not messages:
        raise KimiVLInputError("the conversation is empty: it needs at least one message (e.g. "
                               "[{'role': 'user', 'content': ...}])")
    out: list[dict[str, Any]] = []
    media: list[MediaItem] = []
    counts = {"image": 0, "video": 0, "document": 0}
    for m, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise KimiVLInputError(f"message {m} must be a dict with a string 'role', got {message!r:.80}")
        if message["role"] not in roles:
            raise KimiVLInputError(f"message {m}: unknown role {message['role']!r} (the chat template knows "
                                   f"{', '.join(sorted(roles))})")
        content = message.get("content")
        if isinstance(content, str):
            out.append(dict(message))
            continue
        if not isinstance(content, (list, tuple)):
            raise KimiVLInputError(f"message {m} ({message['role']}): content must be a string or a list of "
                                   f"items, got {type(content).__name__}")
        items = []
        for j, item in enumerate(content):
            where = f"message {m} item {j}"
            if not isinstance(item, dict):
                raise KimiVLInputError(f"{where}: content items are dicts like {{'type': 'text', 'text': ...}}, "
                                       f"got {type(item).__name__}")
            kind = _item_kind(item, where)
            if kind == "text":
                if not isinstance(item.get("text"), str):
                    raise KimiVLInputError(f"{where}: text item without a string 'text'")
                items.append(item)
                continue
            source = next((item[k] for k in _MEDIA_KEYS[kind] if item.get(k) is not None), None)
            if source is None and need_sources:
                raise KimiVLInputError(f"{where}: {kind} item without its data (keys {list(_MEDIA_KEYS[kind])})")
            options = {k: v for k, v in item.items() if k not in ("type", "text", *_MEDIA_KEYS[kind])}
            media.append(MediaItem(kind, source, options, f"{kind} {counts[kind]} ({where})"))
            counts[kind] += 1
            if kind == "image":
                items.append(item)
            else:
                items.append({"type": "text", "text": VIDEO_BLOCK if kind == "video" else DOCUMENT_BLOCK})
        out.append({**message, "content": items})
    return out, media


class ThinkingSplit(NamedTuple):
    """A thinking model's output: the reasoning, the answer, and whether the reasoning was closed."""

    reasoning: str
    answer: str
    complete: bool


def split_thinking(text: str) -> ThinkingSplit:
    """Split ``◁think▷reasoning◁/think▷answer``. An open but unclosed block gives an empty answer (as the
    evaluation code does); text without markers is all answer; a close marker without an open one
    (prompt ended inside the block) ends the reasoning."""
    close = text.find(THINK_CLOSE)
    open_ = text.find(THINK_OPEN)
    if close >= 0:
        start = open_ + len(THINK_OPEN) if 0 <= open_ < close else 0
        return ThinkingSplit(text[start:close].strip(), text[close + len(THINK_CLOSE):].strip(), True)
    if open_ >= 0:
        return ThinkingSplit(text[open_ + len(THINK_OPEN):].strip(), "", False)
    return ThinkingSplit("", text.strip(), True)


class ThinkingStream:
    """:func:`split_thinking` for text that arrives in pieces: :meth:`push` takes each delta and returns the
    ``(reasoning, answer)`` text it completes; :meth:`flush` returns the rest at the end.

    An output that opens with ``◁think▷`` (whitespace aside) is reasoning up to ``◁/think▷`` and answer after it;
    one that opens otherwise is all answer, as it comes (an Instruct model's output passes unchanged). The
    markers and the whitespace around the reasoning and at the answer's start are dropped, so the joined
    pieces equal ``split_thinking(text)``'s reasoning and its answer (stripped only at the start) for such
    outputs. ``inside=True`` starts inside the block (a prompt that ended with ``◁think▷``). Nothing is held
    back longer than a possible partial marker or a run of whitespace.
    """

    def __init__(self, inside: bool = False) -> None:
        self.state = "reasoning_start" if inside else "start"  # start, reasoning_start, reasoning, answer_start, answer
        self.pending = ""  # text not yet decided
        self.had_reasoning = inside

    def push(self, delta: str) -> tuple[str, str]:
        self.pending += delta
        reasoning, answer = [], []
        while self.pending:
            if self.state == "start":
                head = self.pending.lstrip()
                if head.startswith(THINK_OPEN):
                    self.pending, self.state, self.had_reasoning = head[len(THINK_OPEN):], "reasoning_start", True
                elif not head or THINK_OPEN.startswith(head):
                    break  # maybe a marker still arriving
                else:
                    self.state = "answer"
            elif self.state in ("reasoning_start", "answer_start"):
                self.pending = self.pending.lstrip()
                if self.pending:
                    self.state = self.state.removesuffix("_start")
            elif self.state == "reasoning":
                end = self.pending.find(THINK_CLOSE)
                if end >= 0:
                    reasoning.append(self.pending[:end].rstrip())
                    self.pending, self.state = self.pending[end + len(THINK_CLOSE):], "answer_start"
                    continue
                # hold back a partial close marker, and trailing whitespace (it is dropped before the marker)
                hold = max((k for k in range(1, len(THINK_CLOSE)) if self.pending.endswith(THINK_CLOSE[:k])), default=0)
                body = self.pending[:len(self.pending) - hold]
                keep = len(body.rstrip())
                reasoning.append(body[:keep])
                self.pending = self.pending[keep:]
                break
            else:  # answer
                answer.append(self.pending)
                self.pending = ""
        return "".join(reasoning), "".join(answer)

    def flush(self) -> tuple[str, str]:
        """The held-back rest: a partial marker that never completed is answer text (or reasoning inside the
        block); whitespace at the end of an unclosed reasoning is dropped."""
        rest, self.pending = self.pending, ""
        if self.state in ("reasoning", "reasoning_start"):
            return rest.rstrip(), ""
        return "", rest if self.state in ("start", "answer") else rest.lstrip()


def strip_thinking(messages: Sequence[dict[str, Any]], *, keep_last: bool = False) -> list[dict[str, Any]]:
    """Copy of a conversation with the reasoning removed from assistant turns (the answers stay), for
    sending history back to a thinking model; ``keep_last`` leaves the final assistant turn untouched."""
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=-1)
    out = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant" or (keep_last and i == last):
            out.append(message)
            continue
        content = message.get("content")
        if isinstance(content, str):
            content = split_thinking(content).answer if THINK_CLOSE in content or THINK_OPEN in content else content
        elif isinstance(content, (list, tuple)):
            content = [{**it, "text": split_thinking(it["text"]).answer}
                       if isinstance(it, dict) and isinstance(it.get("text"), str)
                       and (THINK_CLOSE in it["text"] or THINK_OPEN in it["text"]) else it for it in content]
        out.append({**message, "content": content})
    return out


@dataclass(frozen=True)
class RenderedChat:
    """Rendered conversation text and the ``[start, end)`` character spans that are trained on."""

    text: str
    trainable_spans: list[tuple[int, int]]


class ChatRenderer:
    """Compiles a chat template once and renders conversations with it (sandboxed Jinja)."""

    def __init__(self, template: str | None = None, special_tokens: Iterable[str] = ()) -> None:
        self.template = template if template is not None else DEFAULT_CHAT_TEMPLATE
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise_template_error
        try:
            self._compiled = env.from_string(self.template)
        except jinja2.TemplateError as e:
            raise KimiVLInputError(f"the chat template does not compile: {e}") from e
        # longest first, so that a special token that is a prefix of another does not win
        self._specials = sorted(set(special_tokens), key=len, reverse=True)
        self.roles: frozenset[str] = frozenset(ROLES) | frozenset(_TEMPLATE_ROLE.findall(self.template))

    def render(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = False,
               **template_kwargs: Any) -> str:
        """The prompt text (template messages as made by ``prepare_messages``)."""
        try:
            return self._compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         **template_kwargs)
        except jinja2.TemplateError as e:
            raise KimiVLInputError(f"rendering the chat template failed: {e}") from e

    def render_with_mask(self, messages: Sequence[dict[str, Any]], **template_kwargs: Any) -> RenderedChat:
        """Render for training: the text (no generation prefix) and the trainable spans, namely every
        assistant message's content plus the special token right after it (``<|im_end|>``)."""
        wrapped = []
        n_assistant = 0
        for message in messages:
            content = message.get("content")
            if _SENTINELS.search(str(content)):
                raise KimiVLInputError("message content contains the reserved code points U+100000/U+100001")
            if message.get("role") == "assistant":
                n_assistant += 1
                if isinstance(content, str):
                    content = _OPEN + content + _CLOSE
                else:
                    content = [{"type": "text", "text": _OPEN}, *content, {"type": "text", "text": _CLOSE}]
                message = {**message, "content": content}
            wrapped.append(message)
        raw = self.render(wrapped, add_generation_prompt=False, **template_kwargs)
        parts = _SENTINELS.split(raw)
        marks = _SENTINELS.findall(raw)
        if marks != [_OPEN, _CLOSE] * n_assistant:
            raise KimiVLInputError(f"the chat template does not render the content of the {n_assistant} assistant "
                                   "message(s) verbatim and once each, so no loss mask can be derived from it")
        text, spans = parts[0], []
        for k in range(n_assistant):
            start = len(text)
            text += parts[2 * k + 1]
            end = len(text)
            after = parts[2 * k + 2]
            end += next((len(s) for s in self._specials if after.startswith(s)), 0)
            text += after
            spans.append((start, end))
        return RenderedChat(text, spans)


def _raise_template_error(message: str) -> None:
    raise jinja2.TemplateError(message)
