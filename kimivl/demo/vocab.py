"""A small tiktoken vocabulary in the official Kimi file format, for the demo model.

Byte-level BPE trained with tiktoken's reference trainer on the texts the demo model sees
(questions, answers, role names, the default system prompt, frame and page markers), with the
Kimi pre-tokenisation pattern. Digits are left out of the training text so every digit stays a
token of its own (numbers are then read and written digit by digit). The special tokens follow
the official layout: 258 ids starting right after the ranks, at the official offsets
(``[BOS]`` = n, ``[EOS]`` = n+1, ``<|im_end|>`` = n+2, ... ``<|media_pad|>`` = n+21).
"""
from __future__ import annotations

import base64
import json
from pathlib import Path

from kimivl.demo.tasks import COLORS, DIRECTIONS, QUESTIONS, SHAPES

NUM_SPECIAL = 258
# Offsets of the named specials from the first special id (the real tokenizer's layout).
SPECIAL_OFFSETS = {
    "[BOS]": 0, "[EOS]": 1, "<|im_end|>": 2, "<|im_user|>": 3, "<|im_assistant|>": 4,
    "<|start_header_id|>": 6, "<|end_header_id|>": 7, "[EOT]": 9, "<|im_system|>": 10,
    "<|im_middle|>": 17, "<|media_start|>": 18, "<|media_content|>": 19, "<|media_end|>": 20,
    "<|media_pad|>": 21, "[UNK]": 254, "[PAD]": 255,
}
ADDITIONAL = ["<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|start_header_id|>", "<|end_header_id|>",
              "[EOT]", "<|im_system|>", "<|im_middle|>", "<|media_start|>", "<|media_content|>",
              "<|media_end|>", "<|media_pad|>"]


def training_text() -> str:
    words = [*COLORS, *SHAPES, *DIRECTIONS, "first", "second", "system", "user", "assistant",
             "image", "video", "document", "You are a helpful assistant", "page", "pages", "not shown"]
    questions = [q.replace("{page}", "") for q in QUESTIONS.values()]
    # repeated so frequent words merge fully; no digits (see module docstring)
    return "\n".join(words * 20 + questions * 20 + ["[page /]", "[.s]", "the a an is of in on"] * 10)


def train_ranks(vocab_size: int) -> dict[bytes, int]:
    """Byte-level BPE ranks (256 byte tokens + merges) on ``training_text()``."""
    from tiktoken._educational import bpe_train

    from kimivl.processing.tokenizer import KIMI_PAT_STR

    # the `regex` module needs V1 mode for the pattern's && class intersections (tiktoken itself handles them)
    return bpe_train(training_text(), vocab_size, "(?V1)" + KIMI_PAT_STR, visualise=None)


def write_tokenizer(directory: Path, ranks: dict[bytes, int], chat_template: str) -> dict[str, int]:
    """Write ``tiktoken.model`` and ``tokenizer_config.json``; return the named special ids."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = [f"{base64.b64encode(tok).decode()} {rank}" for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])]
    (directory / "tiktoken.model").write_text("\n".join(lines) + "\n", encoding="utf-8")
    first = len(ranks)
    ids = {name: first + off for name, off in SPECIAL_OFFSETS.items()}
    decoder = {str(i): {"content": name, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": True} for name, i in sorted(ids.items(), key=lambda kv: kv[1])}
    config = {
        "added_tokens_decoder": decoder,
        "additional_special_tokens": ADDITIONAL,
        "bos_token": "[BOS]", "eos_token": "[EOS]", "pad_token": "[PAD]", "unk_token": "[UNK]",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "tokenizer_class": "TikTokenTokenizer",
        "chat_template": chat_template,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (directory / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    return ids
