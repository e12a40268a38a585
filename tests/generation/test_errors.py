"""generate()/stream() reject bad prompts and settings with KimiVLInputError (a ValueError) naming the value."""
from __future__ import annotations

from typing import Any

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
