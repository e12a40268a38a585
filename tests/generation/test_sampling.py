"""Sampling in generate(): seeded reproducibility, filters, repetition penalty; the pure filters' support sets."""
from __future__ import annotations

import pytest
import torch

from kimivl.errors import KimiVLInputError
from kimivl.modeling import KimiVLForConditionalGeneration
from kimivl.ops.sampling import apply_repetition_penalty, filter_logits, select_next_token

GOLDEN_NEW = [525, 638, 345, 480, 168, 557, 83, 743]


@pytest.fixture(scope="module")
def prompt(golden: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"input_ids": golden["prompt.input_ids"], "pixel_values": golden["prompt.pixel_values"],
            "image_grid_hws": golden["prompt.image_grid_hws"]}


def _sample(model: KimiVLForConditionalGeneration, prompt: dict[str, torch.Tensor], **kwargs: object) -> list[int]:
    out = model.generate(**prompt, do_sample=True, max_new_tokens=16, eos_token_id=[], **kwargs)
    return out[0, 55:].tolist()


def test_seeded_sampling_is_reproducible_and_leaves_the_global_rng_alone(
        model: KimiVLForConditionalGeneration, prompt: dict[str, torch.Tensor]) -> None:
    state = torch.get_rng_state()
    a = _sample(model, prompt, seed=1234)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(0)  # the global RNG has no say
    assert _sample(model, prompt, seed=1234) == a
    assert _sample(model, prompt, seed=1235) != a
    assert _sample(model, prompt, seed=1234, temperature=0.7) != a


def test_batched_sampling_is_reproducible(model: KimiVLForConditionalGeneration,
                                          golden: dict[str, torch.Tensor]) -> None:
    ids = golden["text_only.input_ids"].repeat(2, 1)
    a = model.generate(ids, do_sample=True, seed=7, max_new_tokens=12, eos_token_id=[])
    assert torch.equal(a, model.generate(ids, do_sample=True, seed=7, max_new_tokens=12, eos_token_id=[]))
    assert a[0, 35:].tolist() != a[1, 35:].tolist()  # rows draw independently


@pytest.mark.parametrize("filters", [{"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}])
def test_filters_that_keep_one_token_give_greedy(model: KimiVLForConditionalGeneration,
                                                 prompt: dict[str, torch.Tensor], filters: dict[str, float]) -> None:
    assert _sample(model, prompt, seed=3, **filters)[:8] == GOLDEN_NEW


def test_temperature_near_zero_gives_greedy(model: KimiVLForConditionalGeneration,
                                            prompt: dict[str, torch.Tensor]) -> None:
    assert _sample(model, prompt, seed=3, temperature=1e-4)[:8] == GOLDEN_NEW


def test_top_k_sampling_stays_in_the_top_k(model: KimiVLForConditionalGeneration,
                                           golden: dict[str, torch.Tensor]) -> None:
    first_logits = golden["generate.step_logits"][0]
    allowed = set(first_logits.topk(3).indices.tolist())
    firsts = {model.generate(golden["prompt.input_ids"], pixel_values=golden["prompt.pixel_values"],
                             image_grid_hws=golden["prompt.image_grid_hws"], do_sample=True, top_k=3, seed=s,
                             max_new_tokens=1)[0, -1].item() for s in range(12)}
    assert firsts <= allowed and len(firsts) > 1


def test_repetition_penalty(model: KimiVLForConditionalGeneration, prompt: dict[str, torch.Tensor],
                            golden: dict[str, torch.Tensor]) -> None:
    out = model.generate(**prompt, max_new_tokens=1, repetition_penalty=1.3)
    seen = torch.zeros(1, 1000, dtype=torch.bool)
    seen[0, golden["prompt.input_ids"][0]] = True
    expected = apply_repetition_penalty(golden["generate.step_logits"][:1], seen, 1.3).argmax(-1)
    assert out[0, -1].item() == expected.item()
    # a huge penalty forbids every token already in the context
    new = model.generate(**prompt, max_new_tokens=24, repetition_penalty=1e6, eos_token_id=[])[0, 55:].tolist()
    assert len(set(new)) == len(new) and not set(new) & set(golden["prompt.input_ids"][0].tolist())


# --- the pure filters ------------------------------------------------------------------------------------

def test_filter_support_sets() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 3.0]])
    probs = logits.softmax(-1)[0]

    def keep(out: torch.Tensor) -> list[int]:
        return (out[0] > torch.finfo(out.dtype).min).nonzero().flatten().tolist()

    assert keep(filter_logits(logits, top_k=2)) == [0, 4]
    # top-p: the smallest prefix (by probability) whose mass reaches p
    order = probs.argsort(descending=True)
    for p in (0.5, 0.8, 0.95):
        n = int((probs[order].cumsum(0) < p).sum()) + 1
        assert keep(filter_logits(logits, top_p=p)) == sorted(order[:n].tolist())
    assert keep(filter_logits(logits, min_p=0.3)) == sorted((probs >= 0.3 * probs.max()).nonzero().flatten().tolist())
    assert keep(filter_logits(logits, top_k=None, top_p=1.0, min_p=0.0)) == [0, 1, 2, 3, 4]


def test_select_next_token_is_pure_and_seeded() -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(select_next_token(logits), logits.argmax(-1))

    def draw(seed: int) -> torch.Tensor:
        return select_next_token(logits, do_sample=True, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(5), draw(5))


def test_presence_frequency_penalty_counts_only_the_new_tokens() -> None:
    from kimivl.generation import PresenceFrequencyPenalty

    ids = torch.tensor([[1, 2, 2, 3, 3, 3, 0], [3, 0, 0, 0, 1, 1, 1]])  # a 2-token prompt, then 5 new tokens
    scores = torch.zeros(2, 5)
    got = PresenceFrequencyPenalty(2, presence=0.5, frequency=0.25)(ids, scores)
    # row 0 new: 2, 3, 3, 3, 0 -> counts [1, 0, 1, 3, 0]; row 1 new: 0, 0, 1, 1, 1 -> [2, 3, 0, 0, 0]
    want = -torch.tensor([[0.75, 0.0, 0.75, 1.25, 0.0], [1.0, 1.25, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(got, want)
    assert PresenceFrequencyPenalty(7, 1.0, 1.0)(ids, scores) is scores  # nothing generated yet
    with pytest.raises(KimiVLInputError, match=r"frequency_penalty must be a number in \[-2, 2\], got 3"):
        PresenceFrequencyPenalty(2, frequency=3)


def test_logit_bias_adds_to_the_named_tokens() -> None:
    from kimivl.generation import LogitBias

    scores = torch.zeros(2, 6)
    got = LogitBias({4: -100, 1: 2.5}, vocab_size=6)(torch.zeros(2, 3, dtype=torch.long), scores)
    torch.testing.assert_close(got, torch.tensor([[0, 2.5, 0, 0, -100, 0]] * 2))
    with pytest.raises(KimiVLInputError, match=r"logit_bias token 6 is not a token id of this model \(0..5\)"):
        LogitBias({6: 1.0}, vocab_size=6)
    with pytest.raises(KimiVLInputError, match=r"logit_bias\[1\] must be a number in \[-100, 100\], got 200"):
        LogitBias({1: 200}, vocab_size=6)
