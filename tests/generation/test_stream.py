"""Streaming text deltas, streamer objects, stop strings (the text-level features need the tiny tokenizer)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kimivl.generation import stream
from kimivl.modeling import KimiVLForConditionalGeneration

GOLDEN_NEW = [525, 638, 345, 480, 168, 557, 83, 743]


@pytest.fixture(scope="module")
def prompt(golden: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"input_ids": golden["prompt.input_ids"], "pixel_values": golden["prompt.pixel_values"],
            "image_grid_hws": golden["prompt.image_grid_hws"]}


class RecordingStreamer:
    def __init__(self) -> None:
        self.values: list[torch.Tensor] = []
        self.ended = 0

    def put(self, value: torch.Tensor) -> None:
        self.values.append(value)

    def end(self) -> None:
        self.ended += 1


def test_streamer_gets_the_prompt_then_each_token(model: KimiVLForConditionalGeneration,
                                                  prompt: dict[str, torch.Tensor]) -> None:
    streamer = RecordingStreamer()
    out = model.generate(**prompt, max_new_tokens=8, streamer=streamer)
    assert torch.equal(streamer.values[0], prompt["input_ids"])
    assert [v.tolist() for v in streamer.values[1:]] == [[t] for t in GOLDEN_NEW]
    assert streamer.ended == 1 and out[0, 55:].tolist() == GOLDEN_NEW


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_stream_deltas_concatenate_to_the_full_decode(model: KimiVLForConditionalGeneration, tokenizer: Any,
                                                      prompt: dict[str, torch.Tensor],
                                                      skip_special_tokens: bool) -> None:
    deltas = list(stream(model, **prompt, tokenizer=tokenizer, max_new_tokens=8,
                         skip_special_tokens=skip_special_tokens))
    full = tokenizer.decode(GOLDEN_NEW, skip_special_tokens=skip_special_tokens)
    assert "".join(deltas) == full
    assert all(d and "\ufffd" not in d[-1:] for d in deltas[:-1])  # no delta ends in a broken character
    assert full.endswith("[EOS]") != skip_special_tokens


def test_stream_takes_a_processor_and_sampling_settings(model: KimiVLForConditionalGeneration, tokenizer: Any,
                                                        golden_dir: Path, prompt: dict[str, torch.Tensor]) -> None:
    from kimivl.processing import KimiVLProcessor

    processor = KimiVLProcessor.from_pretrained(golden_dir)
    text = "".join(stream(model, **prompt, tokenizer=processor, do_sample=True, seed=9, max_new_tokens=10,
                          eos_token_id=[]))
    ids = model.generate(**prompt, do_sample=True, seed=9, max_new_tokens=10, eos_token_id=[])[0, 55:]
    assert text == tokenizer.decode(ids.tolist(), skip_special_tokens=True)


def test_stream_takes_the_transformers_options_of_generate(model: KimiVLForConditionalGeneration, tokenizer: Any,
                                                     prompt: dict[str, torch.Tensor]) -> None:
    """max_length, generation_config and logits_processor mean in stream() what they mean in generate()."""
    def ban_first(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores.index_fill(1, torch.tensor([GOLDEN_NEW[0]]), float("-inf"))

    settings = dict(generation_config={"max_new_tokens": 4, "eos_token_id": []}, logits_processor=[ban_first])
    ids = model.generate(**prompt, **settings)[0, 55:]
    assert len(ids) == 4 and int(ids[0]) != GOLDEN_NEW[0]
    assert "".join(stream(model, **prompt, tokenizer=tokenizer, skip_special_tokens=False, **settings)) == \
        tokenizer.decode(ids.tolist())
    text = "".join(stream(model, **prompt, tokenizer=tokenizer, max_length=55 + 3, eos_token_id=[],
                          skip_special_tokens=False))
    assert text == tokenizer.decode(GOLDEN_NEW[:3])


def test_stream_does_not_leak_inference_mode(model: KimiVLForConditionalGeneration, tokenizer: Any,
                                             prompt: dict[str, torch.Tensor]) -> None:
    it = stream(model, **prompt, tokenizer=tokenizer, max_new_tokens=4)
    next(it)
    assert not torch.is_inference_mode_enabled()
    list(it)


def test_stop_strings_end_a_row_on_its_decoded_text(model: KimiVLForConditionalGeneration, tokenizer: Any,
                                                    prompt: dict[str, torch.Tensor]) -> None:
    texts = [tokenizer.decode(GOLDEN_NEW[:k]) for k in range(1, 9)]
    for stop in ("et", " sitt", "[EOS]"):
        n = next(k for k, t in enumerate(texts, 1) if stop in t)
        out = model.generate(**prompt, max_new_tokens=8, eos_token_id=[], stop_strings=[stop, "never-seen"],
                             tokenizer=tokenizer)
        assert out[0, 55:].tolist() == GOLDEN_NEW[:n], stop
        assert stop in tokenizer.decode(out[0, 55:].tolist()) and stop not in texts[n - 2]


def test_stop_strings_in_a_batch(model: KimiVLForConditionalGeneration, tokenizer: Any,
                                 golden: dict[str, torch.Tensor]) -> None:
    ids = golden["text_only.input_ids"]
    batch = torch.cat((ids, ids.roll(1, dims=1)))  # two different prompts
    alone = [model.generate(row[None], max_new_tokens=8, eos_token_id=[])[0, 35:].tolist() for row in batch]
    stop = tokenizer.decode(alone[0][:3])[-2:]  # completed by row 0's third token at the latest

    def cut(tokens: list[int]) -> int:
        return next((k for k in range(1, 9) if stop in tokenizer.decode(tokens[:k])), 8)

    out = model.generate(batch, max_new_tokens=8, eos_token_id=[], stop_strings=stop, tokenizer=tokenizer,
                         pad_token_id=0)
    for row, tokens in enumerate(alone):
        n = cut(tokens)
        assert out[row, 35:35 + n].tolist() == tokens[:n], row
        assert set(out[row, 35 + n:].tolist()) <= {0}, row
    assert cut(alone[0]) <= 3 < cut(alone[1])  # the rows really stop at different steps


def test_processor_output_generates_the_golden_tokens(model: KimiVLForConditionalGeneration, tokenizer: Any,
                                                      golden_dir: Path) -> None:
    """End to end from the image file: processor -> generate / stream (left-padded two-conversation batch)."""
    from kimivl.processing import KimiVLProcessor

    processor = KimiVLProcessor.from_pretrained(golden_dir)
    image = str(golden_dir / "inputs" / "image_70x98.png")
    image_chat = [{"role": "user", "content": [{"type": "image", "image": image},
                                               {"type": "text", "text": "Describe this picture."}]}]
    inputs = processor.apply_chat_template(image_chat, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    assert model.generate(**inputs, max_new_tokens=8)[0, 55:].tolist() == GOLDEN_NEW
    assert "".join(stream(model, **inputs, tokenizer=processor, max_new_tokens=8)) == tokenizer.decode(
        GOLDEN_NEW, skip_special_tokens=True)
    text_chat = [{"role": "user", "content": "What is in the image?"}]
    batch = processor.apply_chat_template([text_chat, image_chat], add_generation_prompt=True, tokenize=True,
                                          return_dict=True, return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=8)
    assert out[1, -8:].tolist() == GOLDEN_NEW
