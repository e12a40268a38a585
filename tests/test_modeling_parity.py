"""End-to-end parity with the official implementation through the public API.

Golden: shared/golden/kimivl-tiny (official remote code, fp32 CPU). Tolerance from its README:
float activations/logits atol 1e-4, rtol 1e-4.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kimivl import KimiVLForConditionalGeneration, KimiVLInputError

TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def model(golden_dir):
    return KimiVLForConditionalGeneration.from_pretrained(golden_dir)


def _prompt(golden):
    return dict(input_ids=golden["prompt.input_ids"], attention_mask=golden["prompt.attention_mask"],
                pixel_values=golden["prompt.pixel_values"], image_grid_hws=golden["prompt.image_grid_hws"])


def test_multimodal_logits_and_every_hidden_state(model, golden):
    with torch.no_grad():
        out = model(**_prompt(golden), output_hidden_states=True)
    assert out.logits.dtype == torch.float32
    torch.testing.assert_close(out.logits, golden["prompt.logits"], **TOL)
    assert len(out.hidden_states) == 4
    for i, h in enumerate(out.hidden_states):
        torch.testing.assert_close(h, golden[f"prompt.hidden_states.{i}"], **TOL, msg=f"hidden state {i}")


def test_text_only_logits(model, golden):
    with torch.no_grad():
        out = model(input_ids=golden["text_only.input_ids"])
    torch.testing.assert_close(out.logits, golden["text_only.logits"], **TOL)


def test_image_features_equal_projector_rows(model, golden):
    with torch.no_grad():
        feats = model.get_image_features(golden["processor.pixel_values"], golden["processor.image_grid_hws"])
    torch.testing.assert_close(feats, golden["vision.projector_out"], **TOL)


def test_loss_is_shifted_cross_entropy_with_ignore_index(model, golden):
    ids = golden["prompt.input_ids"]
    labels = ids.clone()
    labels[:, :30] = -100  # e.g. the prompt part of a training sample
    with torch.no_grad():
        out = model(**_prompt(golden), labels=labels)
    logits = golden["prompt.logits"][0]
    expected = F.cross_entropy(logits[29:-1], ids[0, 30:])
    torch.testing.assert_close(out.loss, expected, **TOL)
    # padded positions (attention_mask 0) never count
    mask = torch.ones_like(ids)
    mask[:, -5:] = 0
    with torch.no_grad():
        masked = model(**_prompt(golden) | {"attention_mask": mask}, labels=ids)
    assert torch.isfinite(masked.loss)


def test_loss_backward_reaches_all_towers(golden_dir, golden):
    model = KimiVLForConditionalGeneration.from_pretrained(golden_dir).train()
    out = model(**_prompt(golden), labels=golden["prompt.input_ids"])
    out.loss.backward()
    for name in ("vision_tower.patch_embed.proj.weight", "multi_modal_projector.linear_1.weight",
                 "language_model.model.layers.1.mlp.gate.weight", "language_model.lm_head.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_placeholder_count_mismatch_names_both_counts(model, golden):
    p = _prompt(golden)
    ids = p["input_ids"].clone()
    ids[0, ids[0].tolist().index(763)] = 5  # one placeholder fewer than image features
    with pytest.raises(KimiVLInputError, match=r"11 image placeholder token\(s\).*12 feature row\(s\)"):
        model(**(p | {"input_ids": ids}))
    with pytest.raises(ValueError, match=r"12 image placeholder token\(s\).*0 feature row\(s\)"):
        model(input_ids=p["input_ids"])


def test_input_errors(model, golden):
    p = _prompt(golden)
    with pytest.raises(KimiVLInputError, match="without image_grid_hws"):
        model(input_ids=p["input_ids"], pixel_values=p["pixel_values"])
    with pytest.raises(KimiVLInputError, match=r"ids in \[1, 1000\].*1000 rows"):
        model(input_ids=torch.tensor([[1, 2, 1000]]))
    with pytest.raises(KimiVLInputError, match="attention_mask has shape"):
        model(input_ids=p["input_ids"], attention_mask=torch.ones(1, 3), pixel_values=p["pixel_values"],
              image_grid_hws=p["image_grid_hws"])
    with pytest.raises(KimiVLInputError, match="exactly one of input_ids or inputs_embeds"):
        model()
    with pytest.raises(KimiVLInputError, match="input_ids must be an integer tensor .token ids., got torch.float32"):
        model(input_ids=torch.tensor([[1.0, 2.0]]))
