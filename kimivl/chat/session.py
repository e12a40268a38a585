"""ChatSession: a multi-turn conversation with media, streamed answers and thinking handling.

The serving layer (CLI, HTTP server) sits on this; nothing below imports it. History is kept in
the processor's message format; media attached before a question go into that user turn. For
Thinking models the reasoning (``◁think▷…◁/think▷``) is split off the answer and not re-sent in
later turns (the official evaluation code reads only the text after ``◁/think▷``). Each turn reads the
latents of the history it shares with the last one from a :class:`~kimivl.generation.PromptCache`.
"""
from __future__ import annotations

import difflib
import inspect
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from kimivl.errors import KimiVLInputError
from kimivl.generation import PromptCache, stream
from kimivl.processing import split_thinking

logger = logging.getLogger(__name__)

MEDIA_KINDS = ("image", "video", "document")


# stream()'s arguments that the session fills in itself: not settings
_SESSION_ARGUMENTS = frozenset({"model", "input_ids", "attention_mask", "pixel_values", "image_grid_hws", "tokenizer",
                                "prompt_cache"})


def generation_settings() -> list[str]:
    """The names a session's ``generation`` dict may use: the keyword settings of :func:`kimivl.generation.stream`."""
    return [name for name in inspect.signature(stream).parameters if name not in _SESSION_ARGUMENTS]


def model_path_or_demo(path: str | None) -> str:
    """``path``, or the shipped demo model when none is named (a clear error if it is not there)."""
    if path:
        return path
    from pathlib import Path

    from kimivl import DEMO_MODEL

    if not (Path(DEMO_MODEL) / "config.json").is_file():
        raise FileNotFoundError(f"no model named and the demo model is not shipped in this version ({DEMO_MODEL}; "
                                "see docs/demo-model.md): pass --model PATH_OR_HUB_ID")
    return DEMO_MODEL


@dataclass
class Turn:
    """One answered question: the raw text, its reasoning part (Thinking models) and the answer."""

    text: str
    reasoning: str
    answer: str


@dataclass
class ChatSession:
    model: Any
    processor: Any
    system: str | None = None
    generation: dict[str, Any] = field(default_factory=dict)  # generate() settings, e.g. max_new_tokens
    history: list[dict[str, Any]] = field(default_factory=list)
    pending: list[dict[str, Any]] = field(default_factory=list)
    # the last turn's latents: the next turn prefills only its new part (the history is read, images included)
    prompt_cache: PromptCache = field(default_factory=PromptCache)

    def __post_init__(self) -> None:
        # A misspelt setting would otherwise fail only at the first answer, as stream()'s TypeError.
        if not isinstance(self.generation, dict):
            raise KimiVLInputError(f"generation must be a dict of stream() settings, got "
                                   f"{type(self.generation).__name__}")
        known = generation_settings()
        for key in self.generation:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise KimiVLInputError(f"unknown generation setting {key!r}{hint}; the settings are "
                                       f"{', '.join(known)}")

    @classmethod
    def from_pretrained(cls, path: str | None = None, *, dtype: torch.dtype | str | None = "auto",
                        device: str | None = None, progress: bool = False, quantization: str | None = None,
                        **kwargs: Any) -> ChatSession:
        """Load model + processor from ``path`` (default: the shipped demo model).

        ``dtype="auto"`` is the checkpoint's ``torch_dtype`` (bfloat16 for the released models, float32 for the
        demo); ``None`` keeps each tensor as stored; ``"float32"`` / ``torch.float32`` upcasts. ``quantization``
        as in :meth:`KimiVLForConditionalGeneration.from_pretrained` (``"int8"``)."""
        from kimivl.modeling import KimiVLForConditionalGeneration
        from kimivl.processing import KimiVLProcessor

        path = model_path_or_demo(path)
        model = KimiVLForConditionalGeneration.from_pretrained(path, dtype=dtype, device=device, progress=progress,
                                                               quantization=quantization)
        return cls(model, KimiVLProcessor.from_pretrained(path), **kwargs)

    def attach(self, kind: str, source: Any) -> None:
        """Attach an image / video / document to the next question."""
        if kind not in MEDIA_KINDS:
            raise ValueError(f"unknown media kind {kind!r}; choose one of {MEDIA_KINDS}")
        self.pending.append({"type": kind, kind: source})

    def reset(self) -> None:
        self.history.clear()
        self.pending.clear()
        self.prompt_cache.reset()

    def messages_for(self, question: str) -> list[dict[str, Any]]:
        """The conversation that would be sent for ``question`` (history + pending media + text)."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        content = [*self.pending, {"type": "text", "text": question}]
        return [*system, *self.history, {"role": "user", "content": content}]

    def ask(self, question: str) -> Iterator[str]:
        """Stream the answer's text deltas; the turn joins the history when the stream ends.

        If the turn cannot start (an unreadable attachment, a conversation over the context), the error is
        raised and the attached media are dropped, so that the next question does not fail the same way; the
        history is unchanged."""
        messages = self.messages_for(question)
        try:
            inputs = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                        return_dict=True, return_tensors="pt")
            inputs = inputs.to(self.model.device)
            with torch.inference_mode():  # stream() checks its arguments and the prompt length now
                deltas = stream(self.model, inputs["input_ids"], inputs["attention_mask"],
                                inputs.get("pixel_values"), inputs.get("image_grid_hws"),
                                tokenizer=self.processor.tokenizer, prompt_cache=self.prompt_cache,
                                **self.generation)
        except Exception:
            self.pending = []
            raise
        pieces: list[str] = []
        with torch.inference_mode():
            for delta in deltas:
                pieces.append(delta)
                yield delta
        turn = self._finish(messages[-1], "".join(pieces))
        self.last_turn = turn

    def answer(self, question: str) -> Turn:
        """Non-streaming ``ask``: the whole turn."""
        for _ in self.ask(question):
            pass
        return self.last_turn

    def _finish(self, user_message: dict[str, Any], text: str) -> Turn:
        split = split_thinking(text)
        self.history.append(user_message)
        # earlier reasoning is not re-sent: only the answer stays in the history
        self.history.append({"role": "assistant", "content": split.answer.strip()})
        self.pending = []
        return Turn(text=text, reasoning=split.reasoning, answer=split.answer.strip())
