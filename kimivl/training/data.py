"""SFT data: conversation records -> tokenised examples with assistant-only labels.

Records are either the processor's message format (``{"messages": [...]}`` or a bare list of
messages, items ``text`` / ``image`` / ``video`` / ``document`` as in ``docs/processor.md``) or the
sharegpt layout (``{"conversations": [{"from": "human", "value": "<image>..."}], "images": [...]}``).
Tokenising and the loss mask come from ``KimiVLProcessor.apply_chat_template(return_labels=True)``:
one renderer for chat and training, so they cannot drift apart. Labels are -100 everywhere except
assistant content and the ``<|im_end|>`` that closes it.

Sources: a list / map-style dataset (epochs are seeded permutations), any iterable or
``IterableDataset`` (streamed in order), or a callable ``f(index) -> record`` (or ``f() -> record``),
all read by :class:`SampleStream`, which can restart at any sample position (resumable training).
"""
from __future__ import annotations

import inspect
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kimivl.errors import KimiVLInputError
from kimivl.processing import IGNORE_INDEX, KimiVLProcessor

logger = logging.getLogger(__name__)

_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "model": "assistant"}
_SHAREGPT_TAGS = re.compile(r"(<image>|<video>)")
_MEDIA_KEYS = ("image", "image_url", "video", "document", "url", "path")


@dataclass
class SFTExample:
    """One tokenised conversation. input_ids / labels: (S,) int64; pixel_values: (L, 3, p, p) or None;
    image_grid_hws: (N, 2) int64 or None (N images, video frames and document pages together)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor | None = None
    image_grid_hws: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_trainable_tokens(self) -> int:
        """Positions that contribute to the shifted loss (labels of tokens 1..S-1 that are not ignored)."""
        return int((self.labels[1:] != IGNORE_INDEX).sum())


# ---------------------------------------------------------------------- record formats
def sharegpt_to_messages(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Convert a sharegpt record: ``<image>`` / ``<video>`` tags in the values take ``images`` / ``videos``
    in order; without any tag, all media go before the text of the first user turn."""
    turns = record["conversations"]
    images, videos = list(record.get("images") or []), list(record.get("videos") or [])
    text_all = "".join(str(t.get("value", "")) for t in turns if isinstance(t, dict))
    n_img, n_vid = text_all.count("<image>"), text_all.count("<video>")
    tagged = n_img + n_vid > 0
    if tagged and (n_img != len(images) or n_vid != len(videos)):
        raise KimiVLInputError(f"sharegpt record: {n_img} <image> tags for {len(images)} images and {n_vid} "
                               f"<video> tags for {len(videos)} videos")
    queue = {"<image>": [{"type": "image", "image": s} for s in images],
             "<video>": [{"type": "video", "video": s} for s in videos]}
    messages: list[dict[str, Any]] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise KimiVLInputError(f"sharegpt turn {i} must be a dict with 'from' and 'value', got {turn!r:.80}")
        role = _SHAREGPT_ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise KimiVLInputError(f"sharegpt turn {i}: unknown speaker {turn['from']!r} "
                                   f"(known: {sorted(_SHAREGPT_ROLES)})")
        content: list[dict[str, Any]] = []
        if not tagged and role == "user" and not any(m["role"] == "user" for m in messages):
            content += queue["<image>"] + queue["<video>"]
        for piece in _SHAREGPT_TAGS.split(str(turn["value"])):
            if piece in queue:
                content.append(queue[piece].pop(0))
            elif piece:
                content.append({"type": "text", "text": piece})
        if role != "user" and all(item["type"] == "text" for item in content):
            messages.append({"role": role, "content": "".join(item["text"] for item in content)})
        else:
            messages.append({"role": role, "content": content})
    if not tagged and (images or videos) and not any(m["role"] == "user" for m in messages):
        raise KimiVLInputError("sharegpt record has media but no human turn to attach them to")
    return messages


def _resolve_paths(messages: list[dict[str, Any]], base_dir: Path) -> list[dict[str, Any]]:
    """Make relative media paths in string form relative to the JSONL file's directory (else the working
    directory); a file in neither place is an error now, not hours into training."""
    out = []
    for i, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, list):
            items = []
            for j, item in enumerate(content):
                if isinstance(item, dict):
                    item = dict(item)
                    for key in _MEDIA_KEYS:
                        value = item.get(key)
                        if not isinstance(value, str) or "://" in value or value.startswith("data:"):
                            continue
                        if not os.path.isabs(value) and (base_dir / value).exists():
                            item[key] = str(base_dir / value)
                        elif not os.path.exists(value):
                            places = dict.fromkeys([str(base_dir.resolve()), str(Path.cwd())])
                            where = " or ".join(places) if not os.path.isabs(value) else "that path"
                            raise KimiVLInputError(f"message {i} item {j}: {key} file {value!r} not found (looked in "
                                                   f"{where})")
                items.append(item)
            message = {**message, "content": items}
        out.append(message)
    return out


def _check_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, (list, tuple)) or not messages:
        got = f"{type(messages).__name__} {messages!r:.60}" if messages else "an empty list"
        raise KimiVLInputError(f"'messages' must be a non-empty list of {{'role', 'content'}} dicts, got {got}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or "content" not in message:
            raise KimiVLInputError(f"message {i} must be a dict with a 'role' string and 'content', got "
                                   f"{message!r:.80}")
    return list(messages)


def to_messages(record: Any, *, base_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Any supported record -> the processor's message list (see module docstring)."""
    if isinstance(record, (list, tuple)):
        messages = _check_messages(record)
    elif isinstance(record, dict) and "messages" in record:
        messages = _check_messages(record["messages"])
    elif isinstance(record, dict) and "conversations" in record:
        messages = sharegpt_to_messages(record)
    else:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise KimiVLInputError(f"a training record is a message list, {{'messages': [...]}} or a sharegpt "
                               f"{{'conversations': [...], 'images': [...]}} record; got {keys}")
    if base_dir is not None:
        messages = _resolve_paths(messages, Path(base_dir))
    return messages


def read_jsonl(paths: str | Path | Sequence[str | Path]) -> list[list[dict[str, Any]]]:
    """Conversations of one or more JSONL files (one record per line; blank lines ignored)."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    conversations = []
    for path in map(Path, paths):
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise KimiVLInputError(f"{path}:{n}: not valid JSON ({e})") from e
                try:
                    conversations.append(to_messages(record, base_dir=path.parent))
                except KimiVLInputError as e:
                    raise KimiVLInputError(f"{path}:{n}: {e}") from e
    if not conversations:
        raise KimiVLInputError(f"no records in {', '.join(map(str, paths))}")
    return conversations


# ---------------------------------------------------------------------- encoding
def encode_conversation(processor: KimiVLProcessor, record: Any) -> SFTExample:
    """Tokenise one conversation with the processor's renderer; labels = assistant content + end token."""
    batch = processor.apply_chat_template(to_messages(record), tokenize=True, return_dict=True, return_labels=True,
                                          return_tensors="pt", padding=False)
    return SFTExample(input_ids=batch["input_ids"][0], labels=batch["labels"][0],
                      pixel_values=batch.get("pixel_values"), image_grid_hws=batch.get("image_grid_hws"))


class ConversationDataset(torch.utils.data.Dataset):
    """Map-style dataset of conversations (a list of records, or JSONL files); items are encoded on access."""

    def __init__(self, records: Sequence[Any] | str | Path, processor: KimiVLProcessor) -> None:
        self.records = read_jsonl(records) if isinstance(records, (str, Path)) else list(records)
        self.processor = processor

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> SFTExample:
        return encode_conversation(self.processor, self.records[index])


# ---------------------------------------------------------------------- streaming with a position
class SampleStream:
    """Yields ``(position, record)`` from a data source, starting at any position.

    ``position`` counts raw records from the start of training. Map-style sources (anything with
    ``__len__`` and ``__getitem__``) are read in epochs, each a permutation seeded by ``seed + epoch``
    (or in order without ``shuffle``); callables are called with the position (or with no argument);
    other iterables are read in order, restarting when exhausted (a one-shot iterator just ends), and
    a restart at position ``p`` skips ``p`` records.
    """

    def __init__(self, source: Any, *, seed: int = 0, shuffle: bool = True) -> None:
        if isinstance(source, (str, Path)):
            source = read_jsonl(source)
        self.source = source
        self.seed = seed
        self.shuffle = shuffle
        self.kind = self._kind(source)

    @staticmethod
    def _kind(source: Any) -> str:
        if isinstance(source, torch.utils.data.IterableDataset):
            return "iterable"
        if hasattr(source, "__len__") and hasattr(source, "__getitem__") and not isinstance(source, dict):
            if len(source) == 0:
                raise KimiVLInputError("the training data is empty")
            return "map"
        if callable(source):
            return "callable"
        if isinstance(source, Iterable):
            return "iterable"
        raise KimiVLInputError(f"training data must be a list/dataset, an iterable or a callable, got "
                               f"{type(source).__name__}")

    def _call(self) -> Callable[[int], Any]:
        try:
            takes_index = bool(inspect.signature(self.source).parameters)
        except (TypeError, ValueError):
            takes_index = True
        return self.source if takes_index else (lambda _i: self.source())

    def iterate(self, start: int = 0) -> Iterator[tuple[int, Any]]:
        if self.kind == "map":
            n = len(self.source)
            epoch, offset = divmod(start, n)
            while True:
                if self.shuffle:
                    g = torch.Generator().manual_seed(self.seed + epoch)
                    order = torch.randperm(n, generator=g).tolist()
                else:
                    order = list(range(n))
                for j in range(offset, n):
                    yield epoch * n + j, self.source[order[j]]
                epoch, offset = epoch + 1, 0
        elif self.kind == "callable":
            fn = self._call()
            position = start
            while True:
                yield position, fn(position)
                position += 1
        else:
            position = 0
            while True:
                produced = False
                for record in self.source:
                    produced = True
                    if position >= start:
                        yield position, record
                    position += 1
                if not produced or iter(self.source) is self.source:
                    return
