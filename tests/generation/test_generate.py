"""generate(): golden greedy tokens, vision once, batches equal single rows, stop ids, config defaults."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from kimivl.decoder import MLACache
from kimivl.errors import KimiVLInputError
from kimivl.generation import GenerationConfig, decode_step, generate, prefill
from kimivl.modeling import KimiVLForConditionalGeneration

GOLDEN_NEW = [525, 638, 345, 480, 168, 557, 83, 743]  # golden README: official greedy continuation
STEP_ATOL = STEP_RTOL = 1e-4  # fp32 logits vs the official implementation (golden README)
PAD = 997  # text_config.pad_token_id of the golden config


def _prompt(golden: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"input_ids": golden["prompt.input_ids"], "pixel_values": golden["prompt.pixel_values"],
            "image_grid_hws": golden["prompt.image_grid_hws"]}


def test_greedy_generate_equals_golden_sequences(model: KimiVLForConditionalGeneration,
                                                 golden: dict[str, torch.Tensor]) -> None:
    out = model.generate(**_prompt(golden), max_new_tokens=8, eos_token_id=[])
    assert out.dtype == torch.int64
    assert torch.equal(out, golden["generate.sequences"])


def test_step_logits_equal_golden(model: KimiVLForConditionalGeneration, golden: dict[str, torch.Tensor]) -> None:
    p = _prompt(golden)
    cache = MLACache.from_config(model.config.text_config, 1, 62)
    with torch.inference_mode():
        logits = [prefill(model, p["input_ids"], cache, None, p["pixel_values"], p["image_grid_hws"])]
        for _ in range(7):
            logits.append(decode_step(model, logits[-1].argmax(-1), cache))
    torch.testing.assert_close(torch.cat(logits), golden["generate.step_logits"], rtol=STEP_RTOL, atol=STEP_ATOL)
    assert torch.cat(logits).argmax(-1).tolist() == GOLDEN_NEW
    assert cache.length == 62


def test_vision_runs_once_and_decode_embeds_only_the_new_token(model: KimiVLForConditionalGeneration,
                                                               golden: dict[str, torch.Tensor]) -> None:
    vision_calls: list[tuple[int, ...]] = []
    embed_calls: list[tuple[int, ...]] = []
    hooks = [model.vision_tower.register_forward_hook(lambda m, args, out: vision_calls.append(args[0].shape)),
             model.language_model.model.embed_tokens.register_forward_hook(
                 lambda m, args, out: embed_calls.append(tuple(args[0].shape)))]
    try:
        out = model.generate(**_prompt(golden), max_new_tokens=8, eos_token_id=[])
    finally:
        for h in hooks:
            h.remove()
    assert out[0, 55:].tolist() == GOLDEN_NEW
    assert len(vision_calls) == 1
    assert embed_calls == [(1, 55)] + [(1, 1)] * 7


def test_default_stop_ids_come_from_the_checkpoint(model: KimiVLForConditionalGeneration,
                                                   golden: dict[str, torch.Tensor]) -> None:
    # <|im_end|> (744) and [EOS] (743) from tokenizer_config.json, then text_config.eos_token_id (743)
    assert model.generation_config is not None and model.generation_config.eos_ids() == [744, 743]
    out = model.generate(**_prompt(golden), max_new_tokens=20)
    assert out[0, 55:].tolist() == GOLDEN_NEW  # stops after [EOS], the 8th token
    out = model.generate(**_prompt(golden), max_new_tokens=20, eos_token_id=480)
    assert out[0, 55:].tolist() == GOLDEN_NEW[:4]
    out = model.generate(**_prompt(golden), max_new_tokens=10, eos_token_id=[])
    assert out.shape == (1, 65) and out[0, 55:63].tolist() == GOLDEN_NEW


def test_generation_config_json_gives_defaults_and_arguments_override(golden_dir: Path, tmp_path: Path,
                                                                      golden: dict[str, torch.Tensor]) -> None:
    for name in os.listdir(golden_dir):
        (tmp_path / name).symlink_to(golden_dir / name)
    (tmp_path / "generation_config.json").write_text(json.dumps({"max_new_tokens": 3, "eos_token_id": 345,
                                                                 "temperature": 0.2, "transformers_version": "x"}))
    model = KimiVLForConditionalGeneration.from_pretrained(tmp_path)
    config = model.generation_config
    assert config is not None and config.eos_ids() == [345, 744, 743] and config.temperature == 0.2
    assert config.extra == {"transformers_version": "x"}
    assert model.generate(**_prompt(golden))[0, 55:].tolist() == GOLDEN_NEW[:3]  # stop id 345 at step 3
    assert model.generate(**_prompt(golden), max_new_tokens=2)[0, 55:].tolist() == GOLDEN_NEW[:2]
    assert model.generate(**_prompt(golden), eos_token_id=[], max_new_tokens=4)[0, 55:].tolist() == GOLDEN_NEW[:4]


def test_text_only_model_generates_like_the_full_model(model: KimiVLForConditionalGeneration,
                                                       golden: dict[str, torch.Tensor]) -> None:
    ids = golden["text_only.input_ids"]
    full = model.generate(ids, max_new_tokens=6, eos_token_id=[])
    text_only = generate(model.language_model, ids, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(full, text_only)
    # and equals a greedy loop of uncached full forwards
    seq = ids
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat((seq, model(seq).logits[:, -1:].argmax(-1)), dim=1)
    assert torch.equal(full, seq)


# --- batches ---------------------------------------------------------------------------------------------

def _left_pad(prompts: list[dict[str, Any]]) -> dict[str, torch.Tensor | None]:
    n = max(len(p["ids"]) for p in prompts)
    ids = torch.tensor([[PAD] * (n - len(p["ids"])) + p["ids"] for p in prompts])
    mask = torch.tensor([[0] * (n - len(p["ids"])) + [1] * len(p["ids"]) for p in prompts])
    pixels = [p["pixel_values"] for p in prompts if p["pixel_values"] is not None]
    grids = [p["grids"] for p in prompts if p["grids"] is not None]
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.cat(pixels) if pixels else None,
            "image_grid_hws": torch.cat(grids) if grids else None}


def _alone(model: KimiVLForConditionalGeneration, p: dict[str, Any], **kwargs: Any) -> list[int]:
    out = model.generate(torch.tensor([p["ids"]]), pixel_values=p["pixel_values"], image_grid_hws=p["grids"],
                         **kwargs)
    return out[0, len(p["ids"]):].tolist()


@pytest.fixture(scope="module")
def alone(model: KimiVLForConditionalGeneration, mixed_prompts: list[dict[str, Any]]) -> list[list[int]]:
    """12 greedy tokens of each mixed prompt run on its own (no stop ids)."""
    return [_alone(model, p, max_new_tokens=12, eos_token_id=[]) for p in mixed_prompts]


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 0, 1)])
def test_batched_greedy_equals_one_by_one(model: KimiVLForConditionalGeneration, mixed_prompts: list[dict[str, Any]],
                                          alone: list[list[int]], order: tuple[int, ...]) -> None:
    batch = _left_pad([mixed_prompts[i] for i in order])
    n = batch["input_ids"].shape[1]
    out = model.generate(**batch, max_new_tokens=12, eos_token_id=[])
    assert out.shape == (3, n + 12)
    assert torch.equal(out[:, :n], batch["input_ids"])
    for row, i in enumerate(order):
        assert out[row, n:].tolist() == alone[i], f"row {row} (prompt {i})"


def test_rows_finish_independently(model: KimiVLForConditionalGeneration, mixed_prompts: list[dict[str, Any]],
                                   alone: list[list[int]]) -> None:
    stop = alone[0][2]  # row 0 stops at its 3rd token; the others continue unless they meet it too
    expected = []
    for tokens in alone:
        cut = tokens.index(stop) + 1 if stop in tokens else len(tokens)
        expected.append(tokens[:cut])
    batch = _left_pad(mixed_prompts)
    n = batch["input_ids"].shape[1]
    out = model.generate(**batch, max_new_tokens=12, eos_token_id=stop, pad_token_id=0)
    assert out.shape[1] == n + max(len(e) for e in expected)
    for row, tokens in enumerate(expected):
        new = out[row, n:].tolist()
        assert new == tokens + [0] * (len(new) - len(tokens)), f"row {row}"
    assert len(expected[0]) == 3 and max(len(e) for e in expected) > 3


def test_a_fully_stopped_batch_ends_early(model: KimiVLForConditionalGeneration,
                                          mixed_prompts: list[dict[str, Any]]) -> None:
    firsts = [_alone(model, p, max_new_tokens=1)[0] for p in mixed_prompts]
    batch = _left_pad(mixed_prompts)
    out = model.generate(**batch, max_new_tokens=12, eos_token_id=firsts)
    assert out[:, -1].tolist() == firsts and out.shape[1] == batch["input_ids"].shape[1] + 1


def test_generation_config_defaults_are_used_without_a_checkpoint(golden: dict[str, torch.Tensor],
                                                                  model: KimiVLForConditionalGeneration) -> None:
    bare = KimiVLForConditionalGeneration(model.config)
    bare.load_state_dict(model.state_dict())
    assert bare.generation_config is None
    out = bare.generate(**_prompt(golden), max_new_tokens=20)  # stops on text_config.eos_token_id (743)
    assert out[0, 55:].tolist() == GOLDEN_NEW
    assert GenerationConfig().max_new_tokens == 512


# ---------------------------------------------------------------------------------------------- transformers' spellings

def test_return_dict_scores_equal_golden_step_logits(model: KimiVLForConditionalGeneration,
                                                     golden: dict[str, torch.Tensor]) -> None:
    # the golden step logits are the official generate's `scores` (greedy: the raw logits)
    out = model.generate(**_prompt(golden), max_new_tokens=8, eos_token_id=[], return_dict_in_generate=True,
                         output_scores=True, output_logits=True, use_cache=True, num_beams=1)
    assert torch.equal(out.sequences, golden["generate.sequences"])
    assert len(out.scores) == len(out.logits) == 8
    torch.testing.assert_close(torch.cat(out.scores), golden["generate.step_logits"], rtol=STEP_RTOL, atol=STEP_ATOL)
    torch.testing.assert_close(torch.cat(out.logits), golden["generate.step_logits"], rtol=STEP_RTOL, atol=STEP_ATOL)
    plain = model.generate(**_prompt(golden), max_new_tokens=8, eos_token_id=[], return_dict_in_generate=True)
    assert plain.scores is None and plain.logits is None and torch.equal(plain.sequences, out.sequences)


def test_sampling_scores_are_tempered_and_filtered(model: KimiVLForConditionalGeneration,
                                                   golden: dict[str, torch.Tensor]) -> None:
    out = model.generate(**_prompt(golden), max_new_tokens=4, eos_token_id=[], do_sample=True, temperature=0.5,
                         top_k=5, seed=3, return_dict_in_generate=True, output_scores=True, output_logits=True)
    new = out.sequences[0, -4:].tolist()
    for token, scores, logits in zip(new, out.scores, out.logits):
        kept = scores[0] > torch.finfo(torch.float32).min
        assert int(kept.sum()) == 5 and bool(kept[token])
        assert set(kept.nonzero().flatten().tolist()) == set(logits[0].topk(5).indices.tolist())
        torch.testing.assert_close(scores[0][kept], logits[0][kept] / 0.5)


def test_min_new_tokens_holds_back_the_stop_id(model: KimiVLForConditionalGeneration,
                                               golden: dict[str, torch.Tensor]) -> None:
    # the golden greedy continuation's 8th token is the stop id 743
    assert model.generate(**_prompt(golden), max_new_tokens=8, eos_token_id=743)[0, -8:].tolist() == GOLDEN_NEW
    out = model.generate(**_prompt(golden), max_new_tokens=8, eos_token_id=743, min_new_tokens=8)
    assert out[0, -8:-1].tolist() == GOLDEN_NEW[:7] and int(out[0, -1]) != 743
    with pytest.raises(KimiVLInputError, match="min_new_tokens must be an integer >= 0 or None, got -1"):
        model.generate(**_prompt(golden), min_new_tokens=-1)


def test_max_length_counts_the_prompt(model: KimiVLForConditionalGeneration, golden: dict[str, torch.Tensor]) -> None:
    p = _prompt(golden)
    n = p["input_ids"].shape[1]
    assert torch.equal(model.generate(**p, max_length=n + 3, eos_token_id=[]), golden["generate.sequences"][:, :n + 3])
    assert model.generate(**p, max_length=n + 3, max_new_tokens=5, eos_token_id=[]).shape[1] == n + 5
    with pytest.raises(KimiVLInputError, match=rf"max_length must be longer than the prompt \({n} tokens\).*got {n}"):
        model.generate(**p, max_length=n)


def test_generation_config_argument_is_the_base(model: KimiVLForConditionalGeneration,
                                                golden: dict[str, torch.Tensor]) -> None:
    class HFLike:  # transformers' GenerationConfig has to_dict()
        def to_dict(self) -> dict[str, Any]:
            return {"max_new_tokens": 3, "eos_token_id": None, "num_beams": 1}

    n = golden["prompt.input_ids"].shape[1]
    for base in (GenerationConfig(max_new_tokens=2, eos_token_id=[]), {"max_new_tokens": 2}, HFLike()):
        out = model.generate(**_prompt(golden), generation_config=base, eos_token_id=[])
        assert out[0, n:].tolist() == GOLDEN_NEW[:out.shape[1] - n]
        assert out.shape[1] - n == (3 if isinstance(base, HFLike) else 2)
    assert model.generate(**_prompt(golden), generation_config={"max_new_tokens": 2}, max_new_tokens=4,
                          eos_token_id=[]).shape[1] == n + 4  # arguments override it
    with pytest.raises(KimiVLInputError, match="generation_config must be a GenerationConfig, a dict or have to_dict"):
        model.generate(**_prompt(golden), generation_config=3)


def test_beam_search_is_refused_by_name(model: KimiVLForConditionalGeneration, golden: dict[str, torch.Tensor]) -> None:
    with pytest.raises(KimiVLInputError, match="num_beams must be 1: beam search is not implemented.*got 4"):
        model.generate(**_prompt(golden), num_beams=4)


def test_logits_processors_see_the_ids_so_far_and_steer(model: KimiVLForConditionalGeneration,
                                                        golden: dict[str, torch.Tensor]) -> None:
    seen: list[list[int]] = []

    def ban_first_golden_token(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        seen.append(ids[0].tolist())
        return scores.index_fill(1, torch.tensor([GOLDEN_NEW[0]]), float("-inf"))

    p = _prompt(golden)
    out = model.generate(**p, max_new_tokens=3, eos_token_id=[], logits_processor=[ban_first_golden_token])
    prompt = p["input_ids"][0].tolist()
    assert seen[0] == prompt and seen[1] == prompt + [int(out[0, -3])] and seen[2] == out[0, :-1].tolist()
    # the first new token is the golden step's runner-up; transformers takes one callable as well as a list
    assert int(out[0, -3]) == int(golden["generate.step_logits"][0].topk(2).indices[1])
    assert torch.equal(model.generate(**p, max_new_tokens=3, eos_token_id=[], logits_processor=ban_first_golden_token),
                       out)


def test_a_logits_processor_of_the_wrong_shape_is_named(model: KimiVLForConditionalGeneration,
                                                        golden: dict[str, torch.Tensor]) -> None:
    def first_row(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores[0]

    with pytest.raises(KimiVLInputError, match=r"logits_processor\[0\] \(first_row\) returned \(1000,\); it must "
                                               r"return scores of the shape it was given, \(1, 1000\)"):
        model.generate(**_prompt(golden), max_new_tokens=2, logits_processor=[first_row])
    with pytest.raises(KimiVLInputError, match="logits_processor must be a callable"):
        model.generate(**_prompt(golden), max_new_tokens=2, logits_processor=[3])


def test_inputs_embeds_in_place_of_ids(model: KimiVLForConditionalGeneration, golden: dict[str, torch.Tensor]) -> None:
    p = _prompt(golden)
    with torch.no_grad():
        embeds = model.embed_inputs(p["input_ids"], p["pixel_values"], p["image_grid_hws"])
    puts: list[tuple[int, ...]] = []

    class Shapes:
        def put(self, value: torch.Tensor) -> None:
            puts.append(tuple(value.shape))

        def end(self) -> None:
            pass

    # without input_ids the output is the new ids alone (transformers' rule); the streamer gets an empty prompt
    new = model.generate(inputs_embeds=embeds, max_new_tokens=8, eos_token_id=[], streamer=Shapes())
    assert new[0].tolist() == GOLDEN_NEW and puts[0] == (1, 0) and puts[1:] == [(1,)] * 8
    both = model.generate(p["input_ids"], inputs_embeds=embeds, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(both, golden["generate.sequences"])
    # the prompt's ids are unknown, so nothing of it is penalised: the first step is the plain argmax
    assert int(model.generate(inputs_embeds=embeds, max_new_tokens=1, repetition_penalty=100.0)[0, 0]) == GOLDEN_NEW[0]


def test_inputs_embeds_errors_are_named(model: KimiVLForConditionalGeneration, golden: dict[str, torch.Tensor]) -> None:
    p = _prompt(golden)
    embeds = torch.zeros(1, 5, 64)
    with pytest.raises(KimiVLInputError, match=r"inputs_embeds must be a float \(batch, seq_len, 64\) tensor, got \(1, 5, 32\)"):
        model.generate(inputs_embeds=torch.zeros(1, 5, 32))
    with pytest.raises(KimiVLInputError, match="pixel_values cannot come with inputs_embeds"):
        model.generate(inputs_embeds=embeds, pixel_values=p["pixel_values"], image_grid_hws=p["image_grid_hws"])
    with pytest.raises(KimiVLInputError, match=r"input_ids \(1, 55\) and inputs_embeds \(1, 5, 64\) must cover"):
        model.generate(p["input_ids"], inputs_embeds=embeds)
    with pytest.raises(KimiVLInputError, match=r"pass input_ids \(or inputs_embeds\)"):
        model.generate()


def test_num_return_sequences_equals_the_prompt_repeated_by_hand(model: KimiVLForConditionalGeneration,
                                                                  golden: dict[str, torch.Tensor]) -> None:
    p = _prompt(golden)
    settings = dict(max_new_tokens=6, eos_token_id=[], do_sample=True, temperature=1.0, seed=0)
    out = model.generate(**p, num_return_sequences=3, **settings)
    by_hand = model.generate(p["input_ids"].repeat(3, 1), pixel_values=p["pixel_values"].repeat(3, 1, 1, 1),
                             image_grid_hws=p["image_grid_hws"].repeat(3, 1), **settings)
    assert torch.equal(out, by_hand)
    assert len({tuple(row) for row in out[:, -6:].tolist()}) > 1  # the copies are sampled apart
    with pytest.raises(KimiVLInputError, match="num_return_sequences needs do_sample=True"):
        model.generate(**p, num_return_sequences=2)
