"""generate()/stream() reject bad prompts and settings with KimiVLInputError (a ValueError) naming the value."""
from __future__ import annotations

from typing import Any

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from kimivl.errors import KimiVLInputError
from kimivl.generation import stream
from kimivl.modeling import KimiVLForConditionalGeneration

IDS = torch.tensor([[752, 115, 121, 285]])


@pytest.mark.parametrize("kwargs, message", [
    ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer, got 0"),
    ({"max_new_tokens": -3}, "max_new_tokens must be a positive integer, got -3"),
    ({"max_new_tokens": 2.5}, "max_new_tokens must be a positive integer, got 2.5"),
    ({"temperature": -0.5}, r"temperature must be a finite number >= 0, got -0.5"),
    ({"temperature": float("nan")}, r"temperature must be a finite number >= 0, got nan"),
    ({"do_sample": True, "temperature": 0.0}, r"temperature must be > 0 when sampling .*got 0.0"),
    ({"do_sample": True, "top_k": 0}, r"top_k must be a positive integer or None .*got 0"),
    ({"top_k": -1}, r"top_k must be a positive integer or None .*got -1"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
    ({"min_p": -0.1}, r"min_p must be in \[0, 1\], got -0.1"),
    ({"repetition_penalty": 0.0}, r"repetition_penalty must be a finite number > 0 .*got 0.0"),
    ({"repetition_penalty": -1}, r"repetition_penalty must be a finite number > 0 .*got -1"),
    ({"eos_token_id": "743"}, r"eos_token_id must be an int or a list of ints, got '743'"),
    ({"pad_token_id": 1.0}, r"pad_token_id must be an int, got 1.0"),
    ({"stop_strings": [""]}, r"stop_strings must be a non-empty string or a list of them, got \[''\]"),
    ({"stop_strings": "."}, r"stop_strings='.' need a tokenizer"),
    ({"do_sample": True, "seed": "1"}, r"seed must be an int or None, got '1'"),
    ({"tokenizer": object(), "stop_strings": "x"}, r"tokenizer must have a decode\(ids\) method, got object"),
    ({"do_sample": "no"}, r"do_sample must be True or False, got 'no'"),
    ({"do_sample": 1}, r"do_sample must be True or False, got 1"),
    ({"pad_token_id": 99999}, r"pad_token_id must be a token id of the vocabulary, in \[0, 1000\), got 99999"),
    ({"pad_token_id": -1}, r"pad_token_id must be a token id of the vocabulary, in \[0, 1000\), got -1"),
    ({"eos_token_id": 99999}, r"eos_token_id must be token ids of the vocabulary, in \[0, 1000\), got 99999"),
    ({"eos_token_id": [743, -1]}, r"eos_token_id must be token ids of the vocabulary, in \[0, 1000\), got \[743, -1\]"),
    ({"generation_config": {"pad_token_id": 1000}}, r"pad_token_id must be a token id .* \[0, 1000\), got 1000"),
    ({"streamer": 5}, r"streamer must have put\(ids\) and end\(\) methods .*got int"),
    ({"pixel_values": np.zeros((4, 3, 14, 14)), "image_grid_hws": torch.tensor([[2, 2]])},
     "pixel_values must be a torch.Tensor, got ndarray"),
    ({"image_grid_hws": [[2, 2]], "pixel_values": torch.zeros(4, 3, 14, 14)},
     "image_grid_hws must be a torch.Tensor, got list"),
])
def test_invalid_settings(model: KimiVLForConditionalGeneration, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        model.generate(IDS, **kwargs)
    assert isinstance(info.value, KimiVLInputError)


@pytest.mark.parametrize("input_ids, mask, message", [
    (torch.zeros(1, 0, dtype=torch.long), None, r"empty prompt: input_ids has shape \(1, 0\)"),
    (torch.zeros(0, 3, dtype=torch.long), None, r"empty prompt: input_ids has shape \(0, 3\)"),
    (torch.ones(2, 3, dtype=torch.long), torch.tensor([[0, 1, 1], [0, 0, 0]]),
     r"empty prompt: row\(s\) \[1\] of attention_mask have no tokens"),
    (torch.ones(2, 3, dtype=torch.long), torch.tensor([[1, 1, 0], [1, 1, 1]]),
     r"row\(s\) \[0\] of attention_mask have a pad after a token: generation needs left padding"),
    (torch.ones(1, 3, dtype=torch.long), torch.ones(1, 4),
     r"attention_mask has shape \(1, 4\) but input_ids has \(1, 3\)"),
    (torch.ones(3, dtype=torch.long), None, r"input_ids must be a \(batch, seq_len\) integer tensor, got \(3,\)"),
    (torch.ones(1, 3), None, "input_ids must be an integer tensor, got torch.float32"),
    (torch.ones(1, 3, dtype=torch.uint8), None, "input_ids must be int64 or int32 token ids, got torch.uint8"),
    (torch.ones(1, 3, dtype=torch.int16), None, "input_ids must be int64 or int32 token ids, got torch.int16"),
    (torch.ones(1, 3, dtype=torch.long), torch.tensor([[0, 2, 2]]),
     r"attention_mask must hold only 0 \(pad\) and 1 \(token\), got 2"),
    (torch.ones(1, 3, dtype=torch.long), torch.tensor([[0.0, 0.5, 1.0]]),
     r"attention_mask must hold only 0 \(pad\) and 1 \(token\), got 0.5"),
    (torch.ones(1, 3, dtype=torch.long), -torch.ones(1, 3, dtype=torch.long),
     r"attention_mask must hold only 0 \(pad\) and 1 \(token\), got -1"),
    (torch.ones(1, 3, dtype=torch.long), [[1, 1, 1]], "attention_mask must be a torch.Tensor, got list"),
    (torch.ones(1, 512, dtype=torch.long), None,
     "the prompt has 512 tokens but the context is max_position_embeddings=512: it must be at most 511 tokens"),
])
def test_invalid_prompts(model: KimiVLForConditionalGeneration, input_ids: torch.Tensor,
                         mask: torch.Tensor | None, message: str) -> None:
    with pytest.raises(KimiVLInputError, match=message):
        model.generate(input_ids, attention_mask=mask, max_new_tokens=2)


def test_max_new_tokens_is_clamped_to_the_context(model: KimiVLForConditionalGeneration,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    ids = torch.full((1, 508), 115)
    out = model.generate(ids, max_new_tokens=10, eos_token_id=[])
    assert out.shape == (1, 512)
    assert "max_new_tokens=10 would pass the context of 512 tokens; generating at most 4" in caplog.text


def test_stream_errors_are_raised_by_the_call(model: KimiVLForConditionalGeneration) -> None:
    class Tok:
        def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
            return "".join(chr(65 + i % 26) for i in ids)

    with pytest.raises(KimiVLInputError, match="stream\\(\\) takes one prompt row, got a batch of 2"):
        stream(model, IDS.repeat(2, 1), tokenizer=Tok())
    with pytest.raises(KimiVLInputError, match="max_new_tokens must be a positive integer, got 0"):
        stream(model, IDS, tokenizer=Tok(), max_new_tokens=0)
    assert "".join(stream(model, IDS, tokenizer=Tok(), max_new_tokens=3, eos_token_id=[])) != ""


def test_pixels_for_a_text_only_model(model: KimiVLForConditionalGeneration,
                                      golden: dict[str, torch.Tensor]) -> None:
    from kimivl.generation import generate

    with pytest.raises(KimiVLInputError, match="DeepseekV3ForCausalLM is a text-only model"):
        generate(model.language_model, golden["prompt.input_ids"], pixel_values=golden["prompt.pixel_values"],
                 image_grid_hws=golden["prompt.image_grid_hws"])


def test_masks_of_zeros_and_ones_in_any_dtype_and_int32_ids_are_accepted(model: KimiVLForConditionalGeneration) -> None:
    ids = torch.tensor([[0, 752, 115, 121]])
    mask = torch.tensor([[0, 1, 1, 1]])
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=3, eos_token_id=[])
    for same in (mask.bool(), mask.float(), mask.to(torch.uint8)):
        assert torch.equal(model.generate(ids, attention_mask=same, max_new_tokens=3, eos_token_id=[]), expected)
    # int32 ids: the repetition penalty's scatter needs int64 ids (it failed inside torch before)
    out = model.generate(ids.int(), attention_mask=mask, max_new_tokens=3, eos_token_id=[], repetition_penalty=1.0001)
    assert out.dtype == torch.int64 and torch.equal(out, expected)


def test_misspelt_generation_config_keys_are_named(model: KimiVLForConditionalGeneration,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="kimivl.generation.generate"):
        out = model.generate(IDS, generation_config={"max_new_token": 2, "max_new_tokens": 3, "eos_token_id": [],
                                                     "transformers_version": "4.0"})
    assert out.shape == (1, 7)
    assert ("generation_config key 'max_new_token' is not a kimivl generation setting and is ignored "
            "(did you mean 'max_new_tokens'?)") in caplog.text
    assert "transformers_version" not in caplog.text  # what transformers writes into every generation_config.json


@pytest.mark.parametrize("content, message", [
    ({"max_new_tokens": "lots", "temperature": -3}, "max_new_tokens must be a positive integer, got 'lots'"),
    ({"temperature": -3}, r"temperature must be a finite number >= 0, got -3"),
    ({"do_sample": "yes"}, "do_sample must be True or False, got 'yes'"),
    ({"pad_token_id": 5000}, r"pad_token_id must be a token id of the vocabulary, in \[0, 1000\), got 5000"),
    ({"eos_token_id": [743, 1000]}, r"eos_token_id must be token ids of the vocabulary, in \[0, 1000\)"),
    ([1, 2], "must hold a JSON object, got a JSON list"),
])
def test_a_bad_generation_config_json_fails_the_load_naming_the_file(golden_dir: Path, tmp_path: Path,
                                                                     content: object, message: str) -> None:
    for name in os.listdir(golden_dir):
        (tmp_path / name).symlink_to(golden_dir / name)
    (tmp_path / "generation_config.json").write_text(json.dumps(content))
    with pytest.raises(KimiVLInputError, match=r"generation_config\.json:? " + message):
        KimiVLForConditionalGeneration.from_pretrained(tmp_path)


def test_generation_config_json_nulls_and_transformers_top_k_0_mean_unset(golden_dir: Path, tmp_path: Path) -> None:
    for name in os.listdir(golden_dir):
        (tmp_path / name).symlink_to(golden_dir / name)
    (tmp_path / "generation_config.json").write_text(json.dumps({"max_new_tokens": None, "top_k": 0, "top_p": None,
                                                                 "transformers_version": "4.48.0"}))
    config = KimiVLForConditionalGeneration.from_pretrained(tmp_path).generation_config
    assert config is not None and (config.max_new_tokens, config.top_k, config.top_p) == (512, None, None)
