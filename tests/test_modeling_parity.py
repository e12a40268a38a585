"""End-to-end parity with the official implementation through the public API.

Golden: shared/golden/kimivl-tiny (official remote code, fp32 CPU). Tolerance from its README:
float activations/logits atol 1e-4, rtol 1e-4.
"""
from __future__ import annotations

import logging

import numpy as np
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


@pytest.mark.parametrize("labels, message", [
    (lambda ids: ids.float(),
     r"labels must be token ids in a signed integer dtype \(int64, int32, ...\), got torch.float32"),
    (lambda ids: ids.bool(), "labels must be token ids in a signed integer dtype .*got torch.bool"),
    (lambda ids: ids.to(torch.uint8), r"got torch.uint8 \(it cannot hold ignore_index=-100\)"),
    (lambda ids: ids + 10000, r"labels contain 10\d\d\d, outside the vocabulary \[0, 1000\) and not ignore_index=-100"),
    (lambda ids: torch.full_like(ids, -5), r"labels contain -5, outside the vocabulary \[0, 1000\)"),
    (lambda ids: ids[:, :3], r"labels have shape \(1, 3\) but the inputs are \(1, 4\)"),
])
def test_labels_that_are_not_token_ids_are_named(model, labels, message):
    ids = torch.tensor([[1, 2, 3, 4]])
    with pytest.raises(KimiVLInputError, match=message):
        model(input_ids=ids, labels=labels(ids))


def test_int32_labels_and_padded_positions_outside_the_vocabulary_are_fine(model):
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        expected = model(input_ids=ids, labels=ids).loss
        torch.testing.assert_close(model(input_ids=ids, labels=ids.int()).loss, expected, rtol=0, atol=0)
        # a padded position's label never counts, whatever it holds
        mask = torch.tensor([[1, 1, 1, 0]])
        labels = torch.tensor([[1, 2, 3, 99999]])
        assert torch.isfinite(model(input_ids=ids, attention_mask=mask, labels=labels).loss)


@pytest.mark.parametrize("kwargs, message", [
    ({"input_ids": torch.tensor([[1, 2]], dtype=torch.uint8)},
     r"input_ids must be int64 or int32 \(token ids up to 999\), got torch.uint8"),
    ({"input_ids": torch.tensor([[1, 2]], dtype=torch.int16)}, "input_ids must be int64 or int32 .*got torch.int16"),
    ({"input_ids": [[1, 2]]}, "input_ids must be a torch.Tensor, got list"),
    ({"input_ids": torch.tensor([[1, 2]]), "attention_mask": [[1, 1]]},
     "attention_mask must be a torch.Tensor, got list"),
    ({"input_ids": torch.tensor([[1, 2]]), "attention_mask": torch.tensor([[2, 2]])},
     r"attention_mask must hold only 0 \(pad\) and 1 \(token\), got 2"),
    ({"input_ids": torch.tensor([[1, 2]]), "attention_mask": torch.tensor([[0.5, 1.0]])},
     r"attention_mask must hold only 0 \(pad\) and 1 \(token\), got 0.5"),
    ({"input_ids": torch.tensor([[1, 2]]), "attention_mask": -torch.ones(1, 2, dtype=torch.long)},
     r"attention_mask must hold only 0 \(pad\) and 1 \(token\), got -1"),
    ({"input_ids": torch.tensor([[1, 2]]), "position_ids": torch.arange(3)[None]},
     r"position_ids must have shape \(1, 2\), got \(1, 3\)$"),
    ({"input_ids": torch.tensor([[1, 2], [3, 4]]), "position_ids": torch.arange(3)[None]},
     r"position_ids must have shape \(2, 2\) or \(1, 2\), got \(1, 3\)"),
    ({"input_ids": torch.tensor([[1, 2]]), "image_grid_hws": [[2, 2]], "pixel_values": torch.zeros(4, 3, 14, 14)},
     "image_grid_hws must be a torch.Tensor, got list"),
    ({"input_ids": torch.tensor([[1, 2]]), "pixel_values": np.zeros((4, 3, 14, 14)),
      "image_grid_hws": torch.tensor([[2, 2]])},
     "pixel_values must be a torch.Tensor, got ndarray"),
])
def test_inputs_of_the_wrong_kind_are_named(model, kwargs, message):
    with pytest.raises(KimiVLInputError, match=message):
        model(**kwargs)


def test_masks_of_zeros_and_ones_are_accepted_in_any_dtype(model):
    ids = torch.tensor([[5, 1, 2, 3]])
    mask = torch.tensor([[0, 1, 1, 1]])
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        for same in (mask.bool(), mask.float(), mask.to(torch.uint8), mask.bfloat16()):
            torch.testing.assert_close(model(input_ids=ids, attention_mask=same).logits, expected, rtol=0, atol=0)


def test_a_sequence_past_the_context_is_warned_about_once(golden_dir, caplog):
    model = KimiVLForConditionalGeneration.from_pretrained(golden_dir)  # a fresh one: the warning is once per model
    ids = torch.ones(1, 513, dtype=torch.long)
    with caplog.at_level(logging.WARNING, logger="kimivl.decoder.model"), torch.no_grad():
        model(input_ids=ids[:, :512])
        assert "max_position_embeddings" not in caplog.text
        model(input_ids=ids)
        model(input_ids=ids)
    warnings = [r.getMessage() for r in caplog.records if "max_position_embeddings" in r.getMessage()]
    assert warnings == ["a sequence of 513 tokens is longer than the model's context (max_position_embeddings=512): "
                        "positions past it are outside what the model was trained on"]


def test_the_bare_decoder_names_inputs_of_the_wrong_kind(model):
    lm = model.language_model
    with pytest.raises(KimiVLInputError, match="input_ids must be a torch.Tensor, got list"):
        lm(input_ids=[[1, 2]])
    with pytest.raises(KimiVLInputError, match="position_ids must be a torch.Tensor, got list"):
        lm(input_ids=torch.tensor([[1, 2]]), position_ids=[[0, 1]])
    with pytest.raises(KimiVLInputError, match=r"input_ids must be int64 or int32 \(token ids up to 999\), got "
                                               r"torch.uint8"):
        lm(input_ids=torch.tensor([[1, 2]], dtype=torch.uint8))
    with pytest.raises(KimiVLInputError, match=r"attention_mask must hold only 0 \(pad\) and 1 \(token\), got 3"):
        lm(input_ids=torch.tensor([[1, 2]]), attention_mask=torch.tensor([[1, 3]]))
