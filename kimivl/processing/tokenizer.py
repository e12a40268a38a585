"""The Kimi tiktoken BPE tokenizer, read from the official ``tiktoken.model`` + ``tokenizer_config.json``.

Spec: ``shared/reference/kimivl-spec.md`` §6.2 (special ids) and §8 (``tokenization_moonshot.py``,
class ``TikTokenTokenizer``). Ranks ``0..n-1`` come from ``tiktoken.model`` (``base64 rank`` per line,
parsed here rather than through ``tiktoken.load``, which caches by path); the next 258 ids are special
tokens named by ``added_tokens_decoder``, the rest ``<|reserved_token_{id}|>``. ``encode`` allows every
special token (as the official ``encode`` does) and adds no BOS. ``decode(skip_special_tokens=True)`` drops
every special id (all ids >= n).
"""
from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import tiktoken

from kimivl.errors import KimiVLInputError

# Pre-tokenisation pattern of the Kimi tokenizers (spec §8): Han runs; cased words (Han excluded) with an
# optional contraction suffix; 1-3 digits; punctuation runs; newlines; whitespace. ``&&`` is a class
# intersection, which tiktoken's fancy-regex engine supports.
_LETTERS_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]"
_LETTERS_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]"
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
KIMI_PAT_STR = "|".join([
    r"[\p{Han}]+",
    rf"[^\r\n\p{{L}}\p{{N}}]?{_LETTERS_UPPER}*{_LETTERS_LOWER}+{_CONTRACTION}",
    rf"[^\r\n\p{{L}}\p{{N}}]?{_LETTERS_UPPER}+{_LETTERS_LOWER}*{_CONTRACTION}",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])
NUM_RESERVED_SPECIAL_TOKENS = 256
# tiktoken panics on very long inputs / runs; the official encode splits text into these chunks first.
_MAX_ENCODE_CHARS = 400_000
_MAX_RUN_CHARS = 25_000

TIKTOKEN_FILE = "tiktoken.model"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


def read_tiktoken_ranks(path: str | os.PathLike[str]) -> dict[bytes, int]:
    """Parse a tiktoken BPE file (one ``base64(token) rank`` pair per line) into ``{bytes: rank}``."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise KimiVLInputError(f"cannot read tokenizer vocabulary {path}: {e}") from e
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError(f"expected 2 fields, got {len(parts)}")
            ranks[base64.b64decode(parts[0], validate=True)] = int(parts[1])
        except (ValueError, binascii.Error) as e:
            raise KimiVLInputError(f"{path}:{lineno} is not a 'base64 rank' line: {e}") from e
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise KimiVLInputError(f"{path}: ranks are not the contiguous range 0..{len(ranks) - 1} "
                               f"({len(ranks)} tokens, {len(set(ranks.values()))} distinct ranks)")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise KimiVLInputError(f"{path}: {len(missing)} single bytes have no rank (first: {missing[:5]}); "
                               "a byte-level BPE vocabulary needs all 256")
    return ranks


def _split_runs(text: str, max_run: int) -> Iterator[str]:
    """Cut ``text`` so that no piece holds more than ``max_run`` consecutive whitespace or
    non-whitespace characters (the official guard against tiktoken's stack limit)."""
    start = 0
    run = 0
    is_space: bool | None = None
    for i, ch in enumerate(text):
        space = ch.isspace()
        run = run + 1 if space == is_space else 1
        is_space = space
        if run > max_run:
            yield text[start:i]
            start = i
            run = 1
    yield text[start:]


class KimiVLTokenizer:
    """tiktoken BPE + 258 special ids, with the HF-like surface used by the processor.

    ``special_tokens`` maps every special string (including reserved names) to its id.
    """

    def __init__(self, mergeable_ranks: dict[bytes, int], special_names: dict[int, str] | None = None, *,
                 bos_token: str = "[BOS]", eos_token: str = "[EOS]", pad_token: str = "[PAD]",
                 unk_token: str = "[UNK]", additional_special_tokens: Sequence[str] | None = None,
                 padding_side: str = "left", chat_template: str | None = None,
                 pat_str: str = KIMI_PAT_STR) -> None:
        self.num_base_tokens = len(mergeable_ranks)
        self.mergeable_ranks = mergeable_ranks
        self.init_config: dict[str, Any] = {}  # the tokenizer_config.json it was read from, kept for saving
        n_special = NUM_RESERVED_SPECIAL_TOKENS + 2
        names = dict(special_names or {})
        outside = sorted(i for i in names if not self.num_base_tokens <= i < self.num_base_tokens + n_special)
        if outside:
            raise KimiVLInputError(f"special token ids {outside[:5]} lie outside the special range "
                                   f"{self.num_base_tokens}..{self.num_base_tokens + n_special - 1}")
        self.special_tokens: dict[str, int] = {}
        for i in range(self.num_base_tokens, self.num_base_tokens + n_special):
            name = names.get(i, f"<|reserved_token_{i}|>")
            if name in self.special_tokens:
                raise KimiVLInputError(f"special token {name!r} is given to ids {self.special_tokens[name]} and {i}")
            self.special_tokens[name] = i
        self._id_to_special = {i: s for s, i in self.special_tokens.items()}
        self._encoding = tiktoken.Encoding(name=f"kimivl-{self.num_base_tokens}", pat_str=pat_str,
                                           mergeable_ranks=mergeable_ranks, special_tokens=self.special_tokens)
        for role, token in (("bos", bos_token), ("eos", eos_token), ("pad", pad_token), ("unk", unk_token)):
            if token not in self.special_tokens:
                raise KimiVLInputError(f"{role}_token {token!r} is not a special token of this vocabulary")
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.additional_special_tokens = list(additional_special_tokens or [])
        if padding_side not in ("left", "right"):
            raise KimiVLInputError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.padding_side = padding_side
        self.chat_template = chat_template

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike[str], **kwargs: Any) -> KimiVLTokenizer:
        """Load ``tiktoken.model`` + ``tokenizer_config.json`` from a checkpoint directory or hub id."""
        from kimivl.checkpoint import resolve_checkpoint_dir

        directory = resolve_checkpoint_dir(path_or_id)
        vocab = directory / TIKTOKEN_FILE
        if not vocab.is_file():
            raise FileNotFoundError(f"no {TIKTOKEN_FILE} in {directory}")
        config: dict[str, Any] = {}
        config_path = directory / TOKENIZER_CONFIG_FILE
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise KimiVLInputError(f"{config_path} is not valid JSON: {e}") from e
        return cls.from_config(read_tiktoken_ranks(vocab), config, **kwargs)

    @classmethod
    def from_config(cls, mergeable_ranks: dict[bytes, int], config: dict[str, Any], **kwargs: Any) -> KimiVLTokenizer:
        """Build from parsed ranks and a ``tokenizer_config.json`` dict."""
        names = {}
        for key, entry in (config.get("added_tokens_decoder") or {}).items():
            content = entry.get("content") if isinstance(entry, dict) else entry
            names[int(key)] = str(content)
        options: dict[str, Any] = {}
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            value = config.get(key)
            if isinstance(value, dict):  # serialised AddedToken
                value = value.get("content")
            if value:
                options[key] = value
        if "additional_special_tokens" in config:
            options["additional_special_tokens"] = config["additional_special_tokens"]
        template = config.get("chat_template")
        if isinstance(template, list):  # HF's named-template form: [{"name": "default", "template": ...}]
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                            None)
        if isinstance(template, str):
            options["chat_template"] = template
        if config.get("padding_side") in ("left", "right"):
            options["padding_side"] = config["padding_side"]
        options.update(kwargs)
        tokenizer = cls(mergeable_ranks, names, **options)
        tokenizer.init_config = dict(config)
        return tokenizer

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        """Write ``tiktoken.model`` and ``tokenizer_config.json`` (the one read, keys kimivl does not use
        included, with this tokenizer's special tokens, padding side and template) to ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        lines = (base64.b64encode(token) + b" " + str(rank).encode()
                 for token, rank in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1]))
        (directory / TIKTOKEN_FILE).write_bytes(b"\n".join(lines) + b"\n")
        config = dict(self.init_config)
        decoder = dict(config.get("added_tokens_decoder") or {})
        for name, i in self.special_tokens.items():
            entry = decoder.get(str(i))
            unnamed = name == f"<|reserved_token_{i}|>"  # ids the file does not name get this name on reading
            named = (isinstance(entry, dict) and entry.get("content") == name) or entry == name
            if not (named or unnamed):
                decoder[str(i)] = {"content": name, "lstrip": False, "normalized": False, "rstrip": False,
                                   "single_word": False, "special": True}
        config["added_tokens_decoder"] = dict(sorted(decoder.items(), key=lambda kv: int(kv[0])))
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            if not isinstance(config.get(key), dict) or config[key].get("content") != getattr(self, key):
                config[key] = getattr(self, key)
        if self.additional_special_tokens or "additional_special_tokens" in config:
            config["additional_special_tokens"] = list(self.additional_special_tokens)
        if "padding_side" in config or self.padding_side != "left":
            config["padding_side"] = self.padding_side
        if self.chat_template is not None and not isinstance(config.get("chat_template"), list):
            config["chat_template"] = self.chat_template
        (directory / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                       encoding="utf-8")

    # ------------------------------------------------------------------ ids
    @property
    def vocab_size(self) -> int:
        return self.num_base_tokens + len(self.special_tokens)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def bos_token_id(self) -> int:
        return self.special_tokens[self.bos_token]

    @property
    def eos_token_id(self) -> int:
        return self.special_tokens[self.eos_token]

    @property
    def pad_token_id(self) -> int:
        return self.special_tokens[self.pad_token]

    @property
    def unk_token_id(self) -> int:
        return self.special_tokens[self.unk_token]

    @property
    def all_special_ids(self) -> list[int]:
        return list(self.special_tokens.values())

    def special_token_id(self, name: str) -> int:
        """Id of a special token by its string, e.g. ``"<|im_end|>"``."""
        try:
            return self.special_tokens[name]
        except KeyError:
            raise KimiVLInputError(f"{name!r} is not a special token of this tokenizer") from None

    def _token_to_id(self, token: str) -> int:
        if token in self.special_tokens:
            return self.special_tokens[token]
        try:
            return self._encoding.encode_single_token(token.encode("utf-8"))
        except KeyError:
            raise KimiVLInputError(f"{token!r} is not a single token of this vocabulary") from None

    def _id_to_token(self, token_id: int) -> str:
        return self._id_to_special.get(token_id) or self.decode([token_id])

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        """Special token strings or single-token byte strings (UTF-8) to ids."""
        if isinstance(tokens, str):
            return self._token_to_id(tokens)
        return [self._token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str]:
        """Special ids to their names, other ids to their text (undecodable bytes as U+FFFD)."""
        if isinstance(ids, int):
            return self._id_to_token(ids)
        return [self._id_to_token(int(i)) for i in ids]

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (a special token: its name in UTF-8); a token may hold part of a
        multi-byte character, which its decoded text shows as U+FFFD."""
        if not 0 <= token_id < self.vocab_size:
            raise KimiVLInputError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")
        special = self._id_to_special.get(token_id)
        return special.encode("utf-8") if special is not None else self._encoding.decode_single_token_bytes(token_id)

    def is_special_id(self, token_id: int) -> bool:
        return token_id >= self.num_base_tokens

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, *, allow_special_tokens: bool = True, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; special token strings become special ids unless disabled. No BOS is added
        (``add_special_tokens`` is accepted for HF compatibility and, as in the official tokenizer, adds none)."""
        if not isinstance(text, str):
            raise KimiVLInputError(f"encode expects a str, got {type(text).__name__}")
        ids: list[int] = []
        for i in range(0, len(text), _MAX_ENCODE_CHARS):
            for piece in _split_runs(text[i:i + _MAX_ENCODE_CHARS], _MAX_RUN_CHARS):
                if allow_special_tokens:
                    ids.extend(self._encoding.encode(piece, allowed_special="all"))
                else:
                    ids.extend(self._encoding.encode(piece, allowed_special=set(), disallowed_special=()))
        return ids

    def decode(self, ids: Sequence[int] | Any, *, skip_special_tokens: bool = False, **_: Any) -> str:
        """Text of ``ids`` (list, 1-D tensor/array or int); bytes that are not UTF-8 become U+FFFD."""
        flat = _as_id_list(ids)
        bad = [i for i in flat if not 0 <= i < self.vocab_size]
        if bad:
            raise KimiVLInputError(f"token ids {bad[:5]} are outside the vocabulary (0..{self.vocab_size - 1})")
        if skip_special_tokens:
            flat = [i for i in flat if i < self.num_base_tokens]
        return self._encoding.decode(flat, errors="replace")

    def batch_decode(self, sequences: Sequence[Sequence[int]] | Any, *, skip_special_tokens: bool = False,
                     **_: Any) -> list[str]:
        """``decode`` for each row of a 2-D tensor/array or list of id lists."""
        if isinstance(sequences, (str, bytes, dict)) or not isinstance(sequences, Iterable):
            raise KimiVLInputError(f"batch_decode expects rows of token ids (a list of id lists or a 2-D tensor / "
                                   f"array), got {type(sequences).__name__} {sequences!r:.40}")
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in sequences]

    def decode_with_offsets(self, ids: Sequence[int]) -> tuple[str, list[int]]:
        """Decoded text and the character offset where each token starts."""
        return self._encoding.decode_with_offsets(list(ids))

    def __call__(self, text: str | Sequence[str]) -> dict[str, list[list[int]]]:
        """``{"input_ids", "attention_mask"}`` as lists, one row per text (no padding)."""
        texts = [text] if isinstance(text, str) else list(text)
        ids = [self.encode(t) for t in texts]
        return {"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids]}


def _as_id_list(ids: Any) -> list[int]:
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, (int, float)):  # one id (a 0-d tensor gives a float when it came through a float tensor)
        return [_as_id(ids)]
    # list(None) / list(5.0) would fail with a bare "not iterable"; a str would be split into characters
    if isinstance(ids, (str, bytes, dict)) or not isinstance(ids, Iterable):
        raise KimiVLInputError(f"decode expects token ids (an int, a list of ints or a 1-D tensor / array), got "
                               f"{type(ids).__name__} {ids!r:.40}")
    out = list(ids)
    if out and isinstance(out[0], list):
        raise KimiVLInputError("decode expects one sequence of ids; use batch_decode for several")
    return [_as_id(i) for i in out]


def _as_id(i: Any) -> int:
    """An int, or a whole float (ids that went through a float tensor); int() would turn 1.5 (a score or
    probability decoded by mistake) into 1 and a string into a crash."""
    if isinstance(i, bool) or not isinstance(i, (int, float)) or (isinstance(i, float) and not i.is_integer()):
        raise KimiVLInputError(f"token ids must be integers, got {i!r}")
    return int(i)
