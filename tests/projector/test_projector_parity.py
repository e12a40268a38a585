"""KimiVLMultiModalProjector vs the official golden outputs (tiny config, float32, CPU).

Tolerance: float32 atol 1e-4, rtol 1e-4 (golden README); measured max-abs errors are ~1e-6.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from kimivl.configuration import KimiVLConfig
from kimivl.errors import KimiVLInputError
from kimivl.projector import KimiVLMultiModalProjector
from kimivl.vision import MoonVitPretrainedModel

TOL: dict[str, Any] = {"atol": 1e-4, "rtol": 1e-4}  # float32


def _strip(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def config(golden_dir: Path) -> KimiVLConfig:
    return KimiVLConfig.from_json_file(golden_dir / "config.json")


@pytest.fixture
def projector(config: KimiVLConfig, golden_weights: dict[str, torch.Tensor]) -> KimiVLMultiModalProjector:
    with torch.device("meta"):
        model = KimiVLMultiModalProjector(config.vision_config, config.text_config)
    model.load_state_dict(_strip(golden_weights, "multi_modal_projector."), strict=True, assign=True)
    return model.eval()


@pytest.fixture
def tower(config: KimiVLConfig, golden_weights: dict[str, torch.Tensor]) -> MoonVitPretrainedModel:
    with torch.device("meta"):
        model = MoonVitPretrainedModel(config.vision_config)
    model.load_state_dict(_strip(golden_weights, "vision_tower."), strict=True, assign=True)
    return model.eval()


def test_keys_equal_official(projector: KimiVLMultiModalProjector, golden_weights: dict[str, torch.Tensor]) -> None:
    assert set(projector.state_dict()) == set(_strip(golden_weights, "multi_modal_projector."))
    assert list(projector.buffers()) == []


@torch.no_grad()
def test_projector_parity(projector: KimiVLMultiModalProjector, golden: dict[str, torch.Tensor]) -> None:
    torch.testing.assert_close(projector(golden["vision.tower_out"]), golden["vision.projector_out"], **TOL)
    # A second, very different input: the official eager (leaky) tower output and its projection.
    torch.testing.assert_close(projector(golden["vision.tower_out_eager_packed"]),
                               golden["vision.projector_out_eager_packed"], **TOL)


@torch.no_grad()
def test_tower_then_projector_parity(tower: MoonVitPretrainedModel, projector: KimiVLMultiModalProjector,
                                     golden: dict[str, torch.Tensor]) -> None:
    features = projector(tower(golden["processor.pixel_values"], golden["processor.image_grid_hws"]))
    torch.testing.assert_close(features, golden["vision.projector_out"], **TOL)


@torch.no_grad()
def test_prompt_pixel_values_path(tower: MoonVitPretrainedModel, projector: KimiVLMultiModalProjector,
                                  config: KimiVLConfig, golden: dict[str, torch.Tensor]) -> None:
    """Image features of the prompt image == the <|media_pad|> rows of the official inputs_embeds."""
    features = projector(tower(golden["prompt.pixel_values"], golden["prompt.image_grid_hws"]))
    rows = golden["prompt.input_ids"][0] == config.media_placeholder_token_id
    assert int(rows.sum()) == features.shape[0] == 12
    torch.testing.assert_close(features, golden["prompt.hidden_states.0"][0][rows], **TOL)


@torch.no_grad()
def test_sub_patches_normalised_separately_then_concatenated(projector: KimiVLMultiModalProjector) -> None:
    """Formula check: LayerNorm per (T, i, :) then concat in merger order, erf GELU between the linears."""
    x = torch.randn(5, 4, 64, generator=torch.Generator().manual_seed(0))
    norm = projector.pre_norm
    normed = torch.cat([F.layer_norm(x[:, i], (64,), norm.weight, norm.bias, 1e-5) for i in range(4)], dim=-1)
    hidden = projector.linear_1(normed)
    expected = projector.linear_2(0.5 * hidden * (1.0 + torch.erf(hidden / 2 ** 0.5)))
    torch.testing.assert_close(projector(x), expected, atol=1e-5, rtol=1e-5)


def test_shape_error_names_the_numbers(projector: KimiVLMultiModalProjector) -> None:
    with pytest.raises(KimiVLInputError, match=r"shape \(num_tokens, 4, 64\); got \(23, 256\)"):
        projector(torch.zeros(23, 256))
    with pytest.raises(KimiVLInputError, match=r"got \(23, 4, 32\)"):
        projector(torch.zeros(23, 4, 32))
