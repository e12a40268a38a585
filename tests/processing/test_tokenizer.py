"""Tokenizer: golden ids of the official TikTokenTokenizer, special ids, decode, vocabulary parsing."""
from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import torch

from kimivl.errors import KimiVLInputError
from kimivl.processing import KIMI_PAT_STR, KimiVLTokenizer, read_tiktoken_ranks


@pytest.fixture(scope="module")
def tok(tiny_dir: Path) -> KimiVLTokenizer:
    return KimiVLTokenizer.from_pretrained(tiny_dir)


def test_text_only_ids_equal_golden(tok, expected_json, expected):
    ids = tok.encode(expected_json["text_only"]["chat_text"])
    assert ids == expected_json["text_only"]["input_ids"]
    assert ids == expected["text_only.input_ids"][0].tolist()


def test_special_ids_by_name_equal_golden(tok, expected_json):
    for name, token_id in expected_json["prompt"]["special_ids"].items():
        assert tok.special_token_id(name) == token_id
        assert tok.convert_tokens_to_ids(name) == token_id
        assert tok.convert_ids_to_tokens(token_id) == name
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (742, 743, 997, 996)
    assert tok.num_base_tokens == 742 and tok.vocab_size == len(tok) == 1000
    assert tok.convert_ids_to_tokens(747) == "<|reserved_token_747|>"
    with pytest.raises(KimiVLInputError, match="not a special token"):
        tok.special_token_id("<|nope|>")


def test_decode_matches_golden_generation(tok, expected_json):
    new = expected_json["generate"]["new_tokens"]
    assert tok.decode(new) == expected_json["generate"]["decoded"]
    assert tok.decode(torch.tensor(new)) == expected_json["generate"]["decoded"]
    assert "[EOS]" not in tok.decode(new, skip_special_tokens=True)


def test_batch_decode_and_skip_special(tok, expected_json):
    ids = expected_json["text_only"]["input_ids"]
    text = expected_json["text_only"]["chat_text"]
    assert tok.batch_decode(torch.tensor([ids, ids])) == [text, text]
    plain = tok.decode(ids, skip_special_tokens=True)
    assert plain == "systemYou are a helpful assistantuserWhat is in the image?assistant"


def test_round_trip_and_no_bos(tok):
    for text in ["Hello World! It's DON'T PANIC", "你好世界abc中文Mixed", "naïve café 12345 6789\r\n\t x",
                 "emoji 😀👍", "def f(x):\n    return x**2\n", " " * 30_000 + "end"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert ids[:1] != [tok.bos_token_id]
    # special strings are special ids unless disabled
    assert tok.encode("<|im_end|>") == [744]
    assert 744 not in tok.encode("<|im_end|>", allow_special_tokens=False)


def test_pattern_matches_an_independent_regex_engine(tok, tiny_dir):
    """HF tokenizers (Oniguruma) with the same pattern gives the same ids as tiktoken (fancy-regex)."""
    converter = pytest.importorskip("transformers.convert_slow_tokenizer", reason="needs transformers")
    specials = [s for s, _ in sorted(tok.special_tokens.items(), key=lambda kv: kv[1])]
    hf = converter.TikTokenConverter(vocab_file=str(tiny_dir / "tiktoken.model"), pattern=KIMI_PAT_STR,
                                     extra_special_tokens=specials).converted()
    for text in ["Hello World! It's DON'T PANIC they'LL", "中文Mixed和English", "HTTPServer camelCase",
                 "x  \n\n\t y\r\n", "Ǆungla ǅ ᾈ 1234567", "<|im_end|> a<|media_pad|>"]:
        assert tok.encode(text) == hf.encode(text).ids, text


def test_vocab_file_is_reread_not_cached(tmp_path, tiny_dir):
    """Parsing the file ourselves: rewriting it at the same path gives the new ranks (tiktoken.load caches)."""
    path = tmp_path / "tiktoken.model"
    lines = (tiny_dir / "tiktoken.model").read_text().splitlines()
    path.write_text("\n".join(lines[:300]) + "\n")
    assert len(read_tiktoken_ranks(path)) == 300
    path.write_text("\n".join(lines) + "\n")
    assert len(read_tiktoken_ranks(path)) == 742


@pytest.mark.parametrize("content, message", [
    ("AA== 0\nnot-base64!! 1\n", "not a 'base64 rank' line"),
    ("AA== 0\nAQ== 5\n", "not the contiguous range"),
    ("\n".join(f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(200)), "single bytes have no rank"),
])
def test_bad_vocab_files(tmp_path, content, message):
    path = tmp_path / "tiktoken.model"
    path.write_text(content)
    with pytest.raises(KimiVLInputError, match=message):
        read_tiktoken_ranks(path)


def test_decode_out_of_range(tok):
    with pytest.raises(KimiVLInputError, match="outside the vocabulary"):
        tok.decode([5, 1000])


def test_decode_refuses_what_is_not_an_id(tok):
    import torch

    assert tok.decode(torch.tensor([65.0, 66.0])) == tok.decode([65, 66])  # whole numbers in a float tensor
    with pytest.raises(KimiVLInputError, match=r"token ids must be integers, got 1\.5"):
        tok.batch_decode(torch.tensor([[1.5, 2.0]]))
    with pytest.raises(KimiVLInputError, match="token ids must be integers, got 'a'"):
        tok.decode(["a"])
    for value, name in ((None, "NoneType None"), ("hi", "str 'hi'"), (2.5, None)):
        with pytest.raises(KimiVLInputError, match=f"decode expects token ids .*got {name}" if name else "got 2.5"):
            tok.decode(value)
    assert tok.decode(torch.tensor(65.0)) == tok.decode(65)  # a 0-d tensor is one id
    with pytest.raises(KimiVLInputError, match="batch_decode expects rows of token ids .*got int 5"):
        tok.batch_decode(5)


def test_real_vocabulary_layout(tmp_path):
    """A vocabulary of the real size (163,584 ranks) with the released special-id table (spec §6.2)."""
    lines = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)]
    lines += [f"{base64.b64encode(b'~' + i.to_bytes(3, 'big')).decode()} {i}" for i in range(256, 163_584)]
    (tmp_path / "tiktoken.model").write_text("\n".join(lines) + "\n")
    table = {163584: "[BOS]", 163585: "[EOS]", 163586: "<|im_end|>", 163587: "<|im_user|>",
             163588: "<|im_assistant|>", 163594: "<|im_system|>", 163601: "<|im_middle|>",
             163602: "<|media_start|>", 163603: "<|media_content|>", 163604: "<|media_end|>",
             163605: "<|media_pad|>", 163838: "[UNK]", 163839: "[PAD]"}
    config = {"added_tokens_decoder": {str(i): {"content": s, "special": True} for i, s in table.items()},
              "bos_token": "[BOS]", "eos_token": "[EOS]", "pad_token": "[PAD]", "unk_token": "[UNK]"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = KimiVLTokenizer.from_pretrained(tmp_path)
    assert tok.vocab_size == 163_842 and tok.num_base_tokens == 163_584
    for token_id, name in table.items():
        assert tok.special_token_id(name) == token_id
    assert tok.convert_ids_to_tokens(163_841) == "<|reserved_token_163841|>"
    ids = tok.encode("<|im_user|>ab<|im_middle|>")
    assert ids[0] == 163587 and ids[-1] == 163601 and tok.decode(ids) == "<|im_user|>ab<|im_middle|>"
