"""OpenAI's presence / frequency penalties and logit bias, and vLLM's min_p / repetition_penalty / min_tokens,
through the server: each answer equals the library's with the same settings (the penalties as
``kimivl.generation`` logits processors), and bad values are 400s naming them."""
from __future__ import annotations

from typing import Any

import pytest
import torch

STORY = [{"role": "user", "content": "Tell me a story."}]  # the tiny model's greedy answer repeats tokens 903, 968


def _library(tiny, **settings: Any) -> str:
    from kimivl.generation import generate

    model, processor = tiny
    inputs = processor.apply_chat_template(STORY, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    processors = [make(inputs["input_ids"].shape[1]) for make in settings.pop("processors", [])]
    with torch.inference_mode():
        out = generate(model, **inputs, max_new_tokens=16, eos_token_id=[], logits_processor=processors, **settings)
    return processor.decode(out[0, inputs["input_ids"].shape[1]:].tolist(), skip_special_tokens=True)


def _answer(server, h, **fields: Any) -> str:
    status, body = h.post_json(server, {"messages": STORY, "max_tokens": 16, "ignore_eos": True, **fields})
    assert status == 200, body
    return body["choices"][0]["message"]["content"]


def test_penalties_and_bias_equal_the_librarys_processors(server, tiny, h):
    from kimivl.generation import LogitBias, PresenceFrequencyPenalty

    plain = _answer(server, h)
    assert plain == _library(tiny)
    # what many clients send by default changes nothing
    assert _answer(server, h, presence_penalty=0, frequency_penalty=0, logit_bias={}) == plain
    penalised = _answer(server, h, frequency_penalty=2.0, presence_penalty=0.5)
    assert penalised == _library(tiny, processors=[lambda n: PresenceFrequencyPenalty(n, 0.5, 2.0)]) != plain
    biased = _answer(server, h, logit_bias={"915": -100, "598": 5})
    assert biased == _library(tiny, processors=[lambda n: LogitBias({915: -100, 598: 5}, 1000)]) != plain


def test_vllm_sampling_extensions_reach_generate(server, tiny, h):
    assert _answer(server, h, repetition_penalty=1.5) == _library(tiny, repetition_penalty=1.5) != _answer(server, h)
    sampled = dict(temperature=1.0, seed=3)
    assert _answer(server, h, min_p=0.2, **sampled) == _library(tiny, min_p=0.2, do_sample=True, temperature=1.0,
                                                                  seed=3)
    status, body = h.post_json(server, {"messages": STORY, "max_tokens": 4, "min_tokens": 4,
                                        "logit_bias": {str(i): 100 for i in tiny[0].generation_config.eos_ids()}})
    assert status == 200 and body["choices"][0]["finish_reason"] == "length", body  # no stop before min_tokens


@pytest.mark.parametrize(("fields", "param", "words"), [
    ({"logit_bias": {"abc": 1}}, "logit_bias", "logit_bias key 'abc' is not a token id of this model (0..999)"),
    ({"logit_bias": {"1000": 1}}, "logit_bias", "logit_bias key '1000' is not a token id"),
    ({"logit_bias": {"5": 101}}, "logit_bias", "logit_bias['5'] must be in [-100, 100], got 101"),
    ({"presence_penalty": 2.5}, "presence_penalty", "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty", "frequency_penalty"),
    ({"min_p": 1.5}, "min_p", "min_p"),
    ({"repetition_penalty": 0}, "repetition_penalty", "repetition_penalty"),
    ({"min_tokens": -1}, "min_tokens", "min_tokens"),
])
def test_bad_sampling_values_are_named(server, h, fields, param, words):
    status, body = h.post_json(server, {"messages": STORY, **fields})
    assert status == 400 and body["error"]["param"] == param and words in body["error"]["message"], body
