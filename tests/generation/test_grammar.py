"""Structured output (kimivl.generation.GrammarConstraint, llguidance): the answers of the random-weight golden
model parse and validate against the schema by construction, end with a stop id right after the grammar
completes, and change nothing but what the grammar forbids; the demo model's answer under a regex is its own."""
from __future__ import annotations

import json
from pathlib import Path
import re
from typing import Any

import pytest
import torch

from kimivl.errors import KimiVLInputError
from kimivl.ops.sampling import apply_token_bitmask

pytest.importorskip("llguidance", reason="structured output needs llguidance (pip install 'kimivl[structured]')")

from kimivl.generation import GrammarConstraint, LogitBias  # noqa: E402

SCHEMA = {"type": "object", "properties": {"color": {"enum": ["red", "blue"]},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 100},
                                           "tags": {"type": "array", "items": {"type": "string", "maxLength": 4},
                                                    "maxItems": 2}},
          "required": ["color", "n", "tags"], "additionalProperties": False}


@pytest.fixture(scope="module")
def story(golden_dir: Path) -> dict[str, torch.Tensor]:
    """A text prompt whose unconstrained greedy answer is no JSON (the golden weights are random)."""
    from kimivl.processing import KimiVLProcessor

    processor = KimiVLProcessor.from_pretrained(golden_dir)
    inputs = processor.apply_chat_template([{"role": "user", "content": "Tell me a story."}],
                                           add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    return {"input_ids": inputs["input_ids"]}


def _valid(value: Any) -> bool:
    return (isinstance(value, dict) and set(value) == {"color", "n", "tags"} and value["color"] in ("red", "blue")
            and isinstance(value["n"], int) and 0 <= value["n"] <= 100 and isinstance(value["tags"], list)
            and len(value["tags"]) <= 2 and all(isinstance(t, str) and len(t) <= 4 for t in value["tags"]))


def test_bitmask_keeps_exactly_the_set_bits() -> None:
    logits = torch.arange(70, dtype=torch.float32).repeat(2, 1)
    mask = torch.zeros(2, 3, dtype=torch.int32)
    mask[0, 0] = 0b101  # tokens 0 and 2
    mask[1, 2] = 1 << 5  # token 69
    mask[1, 1] = -1  # tokens 32..63 (the sign bit is token 63)
    out = apply_token_bitmask(logits, mask)
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [0, 2]
    assert torch.isfinite(out[1]).nonzero().flatten().tolist() == list(range(32, 64)) + [69]
    # the grammar engine's mask is made on the CPU; the logits may be elsewhere (CUDA): stand-in device "meta"
    assert apply_token_bitmask(logits.to("meta"), mask).device.type == "meta"


def test_greedy_and_sampled_answers_validate(model, tokenizer, story) -> None:
    n = story["input_ids"].shape[1]
    stop_ids = set(model.generation_config.eos_ids())
    greedy = model.generate(**story, max_new_tokens=60, logits_processor=[GrammarConstraint.json_schema(tokenizer,
                                                                                                        SCHEMA)])
    sampled = model.generate(**story, max_new_tokens=60, do_sample=True, temperature=1.0, seed=4,
                             num_return_sequences=3, logits_processor=[GrammarConstraint.json_schema(tokenizer,
                                                                                                     SCHEMA)])
    for row in [*greedy, *sampled]:
        new = row[n:].tolist()
        end = next(i for i, t in enumerate(new) if t in stop_ids)  # it stopped: the grammar completed
        text = tokenizer.decode(new[:end])
        assert _valid(json.loads(text)), text
        assert text == json.dumps(json.loads(text), separators=(",", ":"), ensure_ascii=False)  # compact
    assert len({tokenizer.decode(r[n:].tolist()) for r in sampled}) > 1


def test_the_constraint_only_masks(model, tokenizer, story, golden) -> None:
    """The first token is the model's own best among those the grammar allows ('{' is the only one here), and a
    regex that allows the golden continuation's first token keeps it (the rest of that answer is not UTF-8 text,
    which no regex matches), then stops."""
    n = story["input_ids"].shape[1]
    first = GrammarConstraint.json_object(tokenizer)
    assert model.generate(**story, max_new_tokens=1, logits_processor=[first])[0, n:].tolist() == \
        tokenizer.encode("{")
    prompt = {"input_ids": golden["prompt.input_ids"], "pixel_values": golden["prompt.pixel_values"],
              "image_grid_hws": golden["prompt.image_grid_hws"]}
    first_token = int(golden["generate.sequences"][0, 55])  # " many"
    out = model.generate(**prompt, max_new_tokens=8, logits_processor=[GrammarConstraint.regex(
        tokenizer, re.escape(tokenizer.decode([first_token])))])
    assert out[0, 55] == first_token and int(out[0, 56]) in model.generation_config.eos_ids() and out.shape[1] == 57
    other = model.generate(**prompt, max_new_tokens=8, logits_processor=[GrammarConstraint.regex(tokenizer, "[0-9]+")])
    assert tokenizer.decode(other[0, 55:].tolist(), skip_special_tokens=True).isdigit()


def test_a_lark_grammar_bounds_the_answer(model, tokenizer, story) -> None:
    n = story["input_ids"].shape[1]
    grammar = 'start: ("yes" | "no") " " NUM\nNUM: /[1-9][0-9]?/'
    out = model.generate(**story, max_new_tokens=10, do_sample=True, seed=0, num_return_sequences=4,
                         logits_processor=[GrammarConstraint.lark(tokenizer, grammar)])
    for row in out:
        assert re.fullmatch(r"(yes|no) [1-9][0-9]?", tokenizer.decode(row[n:].tolist(), skip_special_tokens=True))


def test_model_rows_fewer_or_more_than_the_tokenizers_ids(tokenizer) -> None:
    """The released model has 163,840 rows for the tokenizer's 163,842 ids (the last two specials have none); a
    padded model may have more rows than ids: those are never allowed."""
    ids = torch.zeros(1, 4, dtype=torch.long)
    fewer = GrammarConstraint.json_object(tokenizer, vocab_size=tokenizer.vocab_size - 2)
    out = fewer(ids, torch.zeros(1, tokenizer.vocab_size - 2))
    assert out.shape == (1, tokenizer.vocab_size - 2) and torch.isfinite(out).nonzero()[:, 1].tolist() == \
        tokenizer.encode("{")
    more = GrammarConstraint.json_object(tokenizer, vocab_size=tokenizer.vocab_size + 40)
    out = more(ids, torch.zeros(1, tokenizer.vocab_size + 40))
    assert torch.isfinite(out).nonzero()[:, 1].tolist() == tokenizer.encode("{")


def test_errors_are_named(tokenizer) -> None:
    with pytest.raises(KimiVLInputError, match="the JSON schema cannot be used"):
        GrammarConstraint.json_schema(tokenizer, {"type": "object", "properties": {"a": {"type": "nonsense"}}})
    with pytest.raises(KimiVLInputError, match="needs kimivl's tokenizer"):
        GrammarConstraint.json_object(object())
    constraint = GrammarConstraint.json_object(tokenizer)
    constraint(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 1000))
    with pytest.raises(KimiVLInputError, match="serves one generate\\(\\) call: it started with 1 rows, now 2"):
        constraint(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 1000))


def test_demo_model_answers_the_color_under_a_regex() -> None:
    """A real answer: the shipped model's reply to the bundled image, constrained to colour names, is its own."""
    from kimivl import DEMO_MODEL, KimiVLForConditionalGeneration, KimiVLProcessor

    model = KimiVLForConditionalGeneration.from_pretrained(DEMO_MODEL)
    processor = KimiVLProcessor.from_pretrained(DEMO_MODEL)
    image = Path(DEMO_MODEL).parent / "examples" / "shape.png"
    answers = {}
    for question in ("What color is the shape?", "What shape is it?"):
        inputs = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image", "image": str(image)}, {"type": "text", "text": question}]}],
            add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
        colors = GrammarConstraint.regex(processor, "(red|green|blue|yellow|purple|orange)",
                                         vocab_size=model.language_model.config.vocab_size)
        out = model.generate(**inputs, max_new_tokens=10, logits_processor=[colors])
        answers[question] = processor.decode(out[0, inputs["input_ids"].shape[1]:].tolist(), skip_special_tokens=True)
    assert answers["What color is the shape?"] == "blue"  # the unconstrained answer too (README)
    assert answers["What shape is it?"] in {"red", "green", "blue", "yellow", "purple", "orange"}


class _Scripted:
    """A logits processor that forces ``ids`` as the first new tokens (a Thinking model's reasoning block, here),
    then lets the model's own logits through."""

    def __init__(self, prompt_length: int, ids: list[int]) -> None:
        self.prompt_length, self.ids = prompt_length, ids

    def __call__(self, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = ids.shape[1] - self.prompt_length
        if step >= len(self.ids):
            return scores
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.ids[step]] = 0.0
        return forced


def test_after_reasoning_the_grammar_starts_after_the_thinking_block(model, tokenizer, story) -> None:
    n = story["input_ids"].shape[1]
    thinking = "◁think▷ The user wants JSON. ◁/think▷"
    script = _Scripted(n, tokenizer.encode(thinking))
    out = model.generate(**story, max_new_tokens=80, logits_processor=[
        script, GrammarConstraint.json_schema(tokenizer, SCHEMA, after_reasoning=True)])
    text = tokenizer.decode(out[0, n:].tolist(), skip_special_tokens=True)
    assert text.startswith(thinking) and _valid(json.loads(text[len(thinking):])), text
    # an answer that does not open with the block (its first byte banned here: an Instruct model's) is
    # constrained from its first token, as without the option
    no_block = LogitBias({tokenizer.encode("◁")[0]: -100}, tokenizer.vocab_size)
    plain = model.generate(**story, max_new_tokens=80, logits_processor=[
        no_block, GrammarConstraint.json_schema(tokenizer, SCHEMA, after_reasoning=True)])
    assert _valid(json.loads(tokenizer.decode(plain[0, n:].tolist(), skip_special_tokens=True)))
