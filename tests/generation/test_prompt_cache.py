"""Prompt caching (kimivl.generation.PromptCache): a conversation's next turn reads the shared prefix's latents
from the last call instead of prefilling them (and re-encoding its images); the answers and step logits equal
those of a full prefill (float32, within 1e-5), and only a prefix whose ids and pictures both match is reused."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kimivl.errors import KimiVLInputError
from kimivl.generation import PromptCache, generate, stream
from kimivl.modeling import KimiVLForConditionalGeneration

TOL = 1e-5


@pytest.fixture(scope="module")
def processor(golden_dir: Path) -> Any:
    from kimivl.processing import KimiVLProcessor

    return KimiVLProcessor.from_pretrained(golden_dir)


def _inputs(processor: Any, conversation: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return dict(processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                              return_dict=True, return_tensors="pt"))


def _user(golden_dir: Path, text: str, image: str | None = "image_70x98.png") -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "image", "image": str(golden_dir / "inputs" / image)}] if image else []
    return {"role": "user", "content": [*content, {"type": "text", "text": text}]}


def _vision_calls(model: KimiVLForConditionalGeneration) -> list[int]:
    calls: list[int] = []
    model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    return calls


def _same_as_full(model, inputs, cache: PromptCache, **settings: Any) -> torch.Tensor:
    """Generate with the cache and without; the sequences are equal and the step logits within TOL."""
    settings = {"max_new_tokens": 6, "eos_token_id": [], "return_dict_in_generate": True, "output_logits": True,
                **settings}
    cached = generate(model, **inputs, prompt_cache=cache, **settings)
    full = generate(model, **inputs, **settings)
    assert torch.equal(cached.sequences, full.sequences)
    torch.testing.assert_close(torch.cat(cached.logits), torch.cat(full.logits), rtol=TOL, atol=TOL)
    return cached.sequences


@pytest.fixture()
def fresh_model(golden_dir: Path) -> KimiVLForConditionalGeneration:
    return KimiVLForConditionalGeneration.from_pretrained(golden_dir)


def test_the_next_turn_reuses_the_history_and_its_image(fresh_model, processor, golden_dir) -> None:
    model, cache = fresh_model, PromptCache()
    first = [_user(golden_dir, "Describe this picture.")]
    inputs = _inputs(processor, first)
    n = inputs["input_ids"].shape[1]
    out = _same_as_full(model, inputs, cache)
    assert cache.reused == 0 and cache.ids == out[0, :n + 5].tolist()  # the last new token is never fed back
    calls = _vision_calls(model)
    answer = processor.decode(out[0, n:].tolist(), skip_special_tokens=True)
    second = _inputs(processor, first + [{"role": "assistant", "content": answer},
                                         {"role": "user", "content": "And then?"}])
    cached = generate(model, **second, prompt_cache=cache, max_new_tokens=6, eos_token_id=[])
    assert cache.reused >= n and len(calls) == 0  # the first prompt (image included) was read, not recomputed
    assert torch.equal(cached, generate(model, **second, max_new_tokens=6, eos_token_id=[]))
    assert len(calls) == 1  # the full prefill encodes the image


def test_another_picture_behind_the_same_placeholders_is_not_reused(fresh_model, processor, golden_dir) -> None:
    model, cache = fresh_model, PromptCache()
    _same_as_full(model, _inputs(processor, [_user(golden_dir, "Describe this picture.")]), cache)
    flipped = _inputs(processor, [_user(golden_dir, "Describe this picture.")])
    flipped["pixel_values"] = flipped["pixel_values"].flip(0)  # same grid and ids, other pixels
    start = int((flipped["input_ids"][0] == model.config.media_placeholder_token_id).nonzero()[0])
    calls = _vision_calls(model)
    _same_as_full(model, flipped, cache)
    assert cache.reused == start and len(calls) == 2  # up to the image; it is encoded again


def test_an_edited_history_is_reused_up_to_the_edit_and_an_identical_prompt_all_but_one(
        fresh_model, processor, golden_dir) -> None:
    model, cache = fresh_model, PromptCache()
    text = [_user(golden_dir, "Tell me a story about a cat.", image=None)]
    inputs = _inputs(processor, text)
    _same_as_full(model, inputs, cache)
    _same_as_full(model, inputs, cache)
    assert cache.reused == inputs["input_ids"].shape[1] - 1  # one prompt token is prefilled for the logits
    edited = _inputs(processor, [_user(golden_dir, "Tell me a story about a dog.", image=None)])
    common = next(i for i, (a, b) in enumerate(zip(inputs["input_ids"][0].tolist(), edited["input_ids"][0].tolist()))
                  if a != b)
    _same_as_full(model, edited, cache, max_new_tokens=40)  # more than the kept cache holds: it grows
    assert cache.reused == common and cache.cache.max_len >= edited["input_ids"].shape[1] + 39


def test_a_stream_stopped_early_leaves_a_usable_cache(fresh_model, processor, golden_dir) -> None:
    model, cache = fresh_model, PromptCache()
    inputs = _inputs(processor, [_user(golden_dir, "Describe this picture.")])
    deltas = stream(model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                    inputs["image_grid_hws"], tokenizer=processor, max_new_tokens=20, eos_token_id=[],
                    prompt_cache=cache)
    next(deltas), next(deltas)
    deltas.close()  # the consumer went away after two deltas
    assert cache.cache.length == len(cache.ids) >= inputs["input_ids"].shape[1]
    _same_as_full(model, inputs, cache)
    assert cache.reused == inputs["input_ids"].shape[1] - 1


def test_prompt_cache_errors_are_named(fresh_model, processor, golden_dir) -> None:
    inputs = _inputs(processor, [_user(golden_dir, "Describe this picture.", image=None)])
    two = torch.cat((inputs["input_ids"], inputs["input_ids"]))
    with pytest.raises(KimiVLInputError, match="prompt_cache serves one unpadded row of ids .* got 2 rows"):
        generate(fresh_model, two, prompt_cache=PromptCache(), max_new_tokens=2)
    mask = torch.ones_like(inputs["input_ids"])
    mask[0, 0] = 0
    with pytest.raises(KimiVLInputError, match="a padded attention_mask"):
        generate(fresh_model, inputs["input_ids"], mask, prompt_cache=PromptCache(), max_new_tokens=2)
    with pytest.raises(KimiVLInputError, match="prompt_cache must be a kimivl.generation.PromptCache, got dict"):
        generate(fresh_model, inputs["input_ids"], prompt_cache={}, max_new_tokens=2)


def test_a_pool_keeps_one_cache_per_conversation() -> None:
    from kimivl.generation.prompt_cache import PromptCachePool

    pool = PromptCachePool(2)
    template = [1, 2, 3]  # what every prompt starts with (the chat template)
    a, b = template + [10, 11, 12, 13], template + [20, 21, 22, 23]
    first_a = pool.pick(a)
    first_a.ids, first_a.cache = a, object()  # as a generation leaves it
    first_b = pool.pick(b)  # shares only the template with a: an unused cache, a's stays
    assert first_b is not first_a
    first_b.ids, first_b.cache = b, object()
    assert pool.pick(a + [14, 15]) is first_a and pool.pick(b + [24]) is first_b  # each continues its own
    c = pool.pick(template + [30, 31])  # a third conversation takes over the least recently used (a's)
    assert c is first_a
    with pytest.raises(ValueError, match="size >= 1"):
        PromptCachePool(0)


def test_a_pool_keeps_its_latents_within_its_bytes() -> None:
    from kimivl.decoder.cache import MLACache
    from kimivl.generation.prompt_cache import PromptCachePool

    pool = PromptCachePool(3, max_bytes=3 * 1000 * 4)  # three caches of 1,000 float32 values fit
    for first in (1, 2, 3):
        cache = pool.pick([first] * 8)
        cache.ids, cache.cache = [first] * 8, MLACache(1, 1, 10, 90, 10)  # 1 x 1 x 10 x 100 values
    assert [c.nbytes for c in pool.caches] == [4000] * 3
    pool.trim()
    assert all(c.cache is not None for c in pool.caches)
    pool.caches[-1].cache = MLACache(1, 1, 20, 90, 10)  # the most recent grew to 2,000 values
    pool.trim()  # 16,000 bytes > 12,000: the least recently used is emptied, then the total fits
    assert [c.nbytes for c in pool.caches] == [0, 4000, 8000]
    pool.caches[-1].cache = MLACache(1, 1, 40, 90, 10)  # alone over the bound: emptied too
    pool.trim()
    assert [c.nbytes for c in pool.caches] == [0, 4000, 0]
