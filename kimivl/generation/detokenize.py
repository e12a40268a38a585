"""Incremental detokenisation: token ids in, UTF-8-safe text deltas out.

A byte-level BPE token can end in the middle of a multi-byte character; decoding such a prefix
yields U+FFFD. The delta is held back until the text stops ending in a replacement character,
so a stream never shows a broken character and the concatenated deltas equal the full decode.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Feed ids with ``push``; get the new text (possibly empty). ``flush`` returns what is left."""

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._emitted = 0  # characters of the decoded text already returned
        self._prefix_start = 0  # decode from a recent token onwards so each step costs O(window)
        self._prefix_text = ""

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        text = self._prefix_text + self._decode(self._ids[self._prefix_start:])
        if text.endswith(_REPLACEMENT):
            return ""
        delta = text[self._emitted:]
        self._emitted = len(text)
        # re-anchor the window: everything decoded so far is final
        self._prefix_text = text
        self._prefix_start = len(self._ids)
        return delta

    def flush(self) -> str:
        text = self._prefix_text + self._decode(self._ids[self._prefix_start:])
        delta = text[self._emitted:]
        self._emitted = len(text)
        return delta

    @property
    def text(self) -> str:
        return self._prefix_text + self._decode(self._ids[self._prefix_start:])
