"""Structured output: a logits processor that keeps each row's new tokens inside a grammar (JSON Schema, any JSON
object, a regex or a Lark grammar), so the answer parses by construction.

The grammar engine is llguidance (the ``structured`` extra; the engine behind vLLM's ``guidance`` backend and
llama.cpp's): it walks the grammar over the token trie of the tokenizer and returns, per step, a bitmask of the
tokens that keep the text inside the grammar; once the grammar is complete only the stop ids are allowed, so the
row ends there. Used as ``generate(logits_processor=[GrammarConstraint.json_schema(tokenizer, schema)])`` and by
``kimivl serve`` for ``response_format``.
"""
from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kimivl.errors import KimiVLInputError
from kimivl.ops.sampling import apply_token_bitmask
from kimivl.processing.chat_template import THINK_CLOSE, THINK_OPEN

logger = logging.getLogger(__name__)

STOP_TOKENS = ("<|im_end|>", "[EOS]")
_OPEN, _CLOSE = THINK_OPEN.encode(), THINK_CLOSE.encode()  # what ends an answer (the chat's end of turn, the text end)
# What is derived from a tokenizer once: llguidance's view of it (~1 s to build for the 163,840-token vocabulary),
# its ids' bytes and the reasoning marker's masks
_PER_TOKENIZER: weakref.WeakKeyDictionary[Any, dict[Any, Any]] = weakref.WeakKeyDictionary()


class _ReasoningRow:
    """Where one row of a Thinking model's answer is: ``start`` (nothing, or part of ``◁think▷``), ``reasoning``
    (free, until ``◁/think▷``), ``grammar`` (constrained), ``free`` (text after the close marker that the
    grammar cannot take up in the middle of a token: left unconstrained)."""

    def __init__(self) -> None:
        self.state = "start"
        self.text = b""  # the row's bytes while not constrained

    def grammar_tokens(self, tokens: list[int], tok: Any) -> list[int]:
        """The new tokens the grammar must consume (those after the reasoning block, or all without one)."""
        out: list[int] = []
        for token in tokens:
            if self.state == "grammar":
                out.append(token)
                continue
            if self.state == "free":
                continue
            self.text += tok.token_bytes(token)
            if self.state == "start":
                if _OPEN.startswith(self.text):
                    continue  # still the marker's beginning
                if not self.text.startswith(_OPEN):  # no reasoning block: the grammar from the first token
                    self.state, self.text = "grammar", b""
                    out.append(token)
                    continue
                self.state = "reasoning"
            end = self.text.find(_CLOSE)
            if end >= 0:
                rest = self.text[end + len(_CLOSE):]
                self.state, self.text = ("grammar" if not rest.strip() else "free"), b""
        return out


def _marker_mask(tok: Any, vocab_size: int, text: bytes) -> torch.Tensor:
    """Bitmask of the tokens that continue ``text`` (a prefix of ``◁think▷``) along the marker (cached)."""
    cache = _PER_TOKENIZER.setdefault(tok, {})
    key = ("marker", vocab_size, text)
    if key not in cache:
        words = (vocab_size + 31) // 32
        bits = torch.zeros(words * 32, dtype=torch.bool)
        bits[[i for i, piece in enumerate(_token_pieces(tok)) if piece and _compatible(text + piece)]] = True
        packed = (bits.view(words, 32).long() << torch.arange(32)).sum(-1)  # each word < 2**32
        cache[key] = torch.from_numpy(packed.numpy().astype(np.uint32).view(np.int32))
    return cache[key]


def _compatible(text: bytes) -> bool:
    return _OPEN.startswith(text) or text.startswith(_OPEN)


def _token_pieces(tok: Any) -> list[bytes]:
    """Every id's bytes (empty for specials), once per tokenizer."""
    cache = _PER_TOKENIZER.setdefault(tok, {})
    if "pieces" not in cache:
        cache["pieces"] = [b"" if tok.is_special_id(i) else tok.token_bytes(i) for i in range(tok.vocab_size)]
    return cache["pieces"]


def _llguidance() -> Any:
    try:
        import llguidance
        import llguidance.tiktoken  # noqa: F401
    except ImportError as e:
        raise ImportError("structured output needs llguidance: pip install 'kimivl[structured]' "
                          "(or pip install llguidance)") from e
    return llguidance


def _ll_tokenizer(tokenizer: Any, vocab_size: int, stop_ids: tuple[int, ...]) -> Any:
    llguidance = _llguidance()
    cache = _PER_TOKENIZER.setdefault(tokenizer, {})
    key = (vocab_size, stop_ids)
    if key not in cache:
        cache[key] = llguidance.tiktoken.lltokenizer_from_encoding(tokenizer._encoding, n_vocab=vocab_size,
                                                                   eos_token=list(stop_ids))
    return cache[key]


class GrammarConstraint:
    """``logits_processor``: each row's new tokens stay inside ``grammar`` (an llguidance grammar string; use
    the constructors). The first call sees the prompt and starts one matcher per row; each later call first
    feeds every row the token it got. A row whose text completes the grammar may only stop; rows whose matcher
    stopped (a stop id) are fed nothing more, and rows whose matcher failed (text the grammar does not allow,
    e.g. the padding after a stop string ended the row) are left unmasked: their tokens are padding."""

    def __init__(self, tokenizer: Any, grammar: str, *, vocab_size: int | None = None,
                 stop_ids: Sequence[int] | None = None, what: str = "grammar", after_reasoning: bool = False) -> None:
        tok = getattr(tokenizer, "tokenizer", tokenizer)  # a processor or its tokenizer
        if not hasattr(tok, "_encoding"):
            raise KimiVLInputError(f"GrammarConstraint needs kimivl's tokenizer (or processor), got "
                                   f"{type(tokenizer).__name__}")
        llguidance = _llguidance()
        stops = tuple(stop_ids) if stop_ids is not None else tuple(tok.special_token_id(t) for t in STOP_TOKENS)
        self.text_vocab = tok.vocab_size  # ids with text; the model's rows may be fewer (163,840 of 163,842) or more
        self.vocab_size = max(vocab_size or 0, self.text_vocab)
        self._tokenizer = _ll_tokenizer(tok, self.vocab_size, stops)
        self._template = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
        if self._template.is_error():
            raise KimiVLInputError(f"the {what} cannot be used: {self._template.get_error()}")
        self._matchers: list[Any] | None = None
        self._fed = 0  # ids seen so far (prompt + new)
        self._tok = tok
        # Thinking models: rows that open with ◁think▷ are free until ◁/think▷, constrained after it
        self._rows: list[_ReasoningRow] | None = None if not after_reasoning else []

    @classmethod
    def json_schema(cls, tokenizer: Any, schema: dict[str, Any] | str, *, compact: bool = True,
                    **kwargs: Any) -> GrammarConstraint:
        """JSON that validates against ``schema`` (a dict or its JSON text). ``compact``: no whitespace between
        tokens (``{"a":1}``), so a model cannot stall in whitespace. Every constructor takes
        ``after_reasoning=True`` for Thinking models: an answer may open with a free ``◁think▷ … ◁/think▷``
        block, and the grammar holds from after it (or from the first token when the answer opens otherwise)."""
        llguidance = _llguidance()
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                schema, defaults={"whitespace_flexible": not compact})
        except (ValueError, TypeError) as e:
            raise KimiVLInputError(f"the JSON schema is not a JSON object: {e}") from e
        return cls(tokenizer, grammar, what="JSON schema", **kwargs)

    @classmethod
    def json_object(cls, tokenizer: Any, **kwargs: Any) -> GrammarConstraint:
        """Any JSON object (OpenAI's ``response_format: {"type": "json_object"}``)."""
        return cls.json_schema(tokenizer, {"type": "object"}, **kwargs)

    @classmethod
    def regex(cls, tokenizer: Any, pattern: str, **kwargs: Any) -> GrammarConstraint:
        """Text matching ``pattern`` as a whole."""
        return cls(tokenizer, _llguidance().LLMatcher.grammar_from_regex(pattern), what="regex", **kwargs)

    @classmethod
    def lark(cls, tokenizer: Any, grammar: str, **kwargs: Any) -> GrammarConstraint:
        """Text of a Lark grammar (llguidance's dialect: ``start: ...``)."""
        return cls(tokenizer, _llguidance().LLMatcher.grammar_from_lark(grammar), what="Lark grammar", **kwargs)

    def __call__(self, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        rows = scores.shape[0]
        if self._matchers is None:
            self._matchers = [self._template.deep_copy() for _ in range(rows)]
            if self._rows is not None:
                self._rows = [_ReasoningRow() for _ in range(rows)]
        elif len(self._matchers) != rows:
            raise KimiVLInputError(f"a GrammarConstraint serves one generate() call: it started with "
                                   f"{len(self._matchers)} rows, now {rows}")
        else:
            new = ids[:, self._fed:].tolist()
            for row, (matcher, tokens) in enumerate(zip(self._matchers, new)):
                if self._rows is not None:
                    tokens = self._rows[row].grammar_tokens(tokens, self._tok)
                if tokens and not matcher.is_stopped() and not matcher.is_error():
                    matcher.consume_tokens(tokens)
        self._fed = ids.shape[1]
        words = (self.vocab_size + 31) // 32
        mask = torch.full((rows, words), -1, dtype=torch.int32)
        for row, matcher in enumerate(self._matchers):
            state = self._rows[row].state if self._rows is not None else "grammar"
            if state == "grammar" and not matcher.is_error():  # a complete grammar allows only the stop ids
                mask[row] = torch.frombuffer(bytearray(matcher.compute_bitmask()), dtype=torch.int32)
            elif state == "start":  # the grammar's first tokens or the opening of a reasoning block; once the
                text = self._rows[row].text  # marker has begun, only its continuation
                mask[row] = _marker_mask(self._tok, self.vocab_size, text)
                if not text:
                    mask[row] |= torch.frombuffer(bytearray(matcher.compute_bitmask()), dtype=torch.int32)
        if scores.shape[-1] > self.text_vocab:  # rows past the tokenizer's ids: never allowed
            scores = scores.clone()
            scores[:, self.text_vocab:] = float("-inf")
        return apply_token_bitmask(scores, mask)
