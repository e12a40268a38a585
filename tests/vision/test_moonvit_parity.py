"""MoonViT vs the official implementation's golden outputs (tiny config, float32, CPU).

Tolerances: float32 activations atol 1e-4, rtol 1e-4 (golden README); measured max-abs errors
are ~2e-6. Golden ``vision.tower_out`` was made with the official sdpa (= flash) semantics.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from kimivl.configuration import KimiVLConfig, MoonViTConfig
from kimivl.errors import KimiVLInputError
from kimivl.vision import MoonVitPretrainedModel
from tensor_recorder import TensorRecorder

PREFIX = "vision_tower."
TOL: dict[str, Any] = {"atol": 1e-4, "rtol": 1e-4}  # float32
TOKENS_PER_IMAGE = [12, 10, 1]  # golden grids 8x6, 4x10, 2x2


@pytest.fixture(scope="module")
def vision_config(golden_dir: Path) -> MoonViTConfig:
    return KimiVLConfig.from_json_file(golden_dir / "config.json").vision_config


@pytest.fixture(scope="module")
def vision_weights(golden_weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(PREFIX):]: v for k, v in golden_weights.items() if k.startswith(PREFIX)}


@pytest.fixture
def tower(vision_config: MoonViTConfig, vision_weights: dict[str, torch.Tensor]) -> MoonVitPretrainedModel:
    """Built on meta and filled by assignment, exactly as the checkpoint loader does."""
    with torch.device("meta"):
        model = MoonVitPretrainedModel(vision_config)
    model.load_state_dict(vision_weights, strict=True, assign=True)
    return model.eval()


@pytest.fixture
def packed(golden: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return golden["processor.pixel_values"], golden["processor.image_grid_hws"]


def _token_slices() -> list[slice]:
    bounds = torch.tensor([0, *TOKENS_PER_IMAGE]).cumsum(0).tolist()
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def test_keys_equal_official_and_no_buffers(tower: MoonVitPretrainedModel,
                                            vision_weights: dict[str, torch.Tensor]) -> None:
    assert set(tower.state_dict()) == set(vision_weights)
    assert list(tower.buffers()) == []
    assert not any(p.is_meta for p in tower.parameters())


@torch.no_grad()
def test_patch_embed_parity(tower: MoonVitPretrainedModel, golden: dict[str, torch.Tensor],
                            packed: tuple[torch.Tensor, torch.Tensor]) -> None:
    torch.testing.assert_close(tower.patch_embed(*packed), golden["vision.patch_embed_out"], **TOL)


@torch.no_grad()
def test_encoder_parity(tower: MoonVitPretrainedModel, golden: dict[str, torch.Tensor],
                        packed: tuple[torch.Tensor, torch.Tensor]) -> None:
    grid = packed[1]
    # On the golden input (encoder alone) and chained after our own patch embedding.
    torch.testing.assert_close(tower.encoder(golden["vision.patch_embed_out"], grid), golden["vision.encoder_out"], **TOL)
    torch.testing.assert_close(tower.encoder(tower.patch_embed(*packed), grid), golden["vision.encoder_out"], **TOL)


@torch.no_grad()
def test_merge_parity(tower: MoonVitPretrainedModel, golden: dict[str, torch.Tensor],
                      packed: tuple[torch.Tensor, torch.Tensor]) -> None:
    torch.testing.assert_close(tower.merge(golden["vision.encoder_out"], packed[1]), golden["vision.tower_out"],
                               atol=0, rtol=0)  # a pure permutation


@pytest.mark.parametrize("backend", ["auto", "sdpa", "eager"])
@torch.no_grad()
def test_tower_parity(backend: str, tower: MoonVitPretrainedModel, golden: dict[str, torch.Tensor],
                      packed: tuple[torch.Tensor, torch.Tensor]) -> None:
    tower.attn_backend = backend
    out = tower(*packed)
    assert out.shape == (23, 4, 64) and out.is_contiguous()
    torch.testing.assert_close(out, golden["vision.tower_out"], **TOL)


@torch.no_grad()
def test_official_eager_leak_is_not_reproduced(tower: MoonVitPretrainedModel, golden: dict[str, torch.Tensor],
                                               packed: tuple[torch.Tensor, torch.Tensor]) -> None:
    """The official eager path adds the mask (+1) so packed images see each other; ours never does."""
    for backend in ("sdpa", "eager"):
        tower.attn_backend = backend
        diff = (tower(*packed) - golden["vision.tower_out_eager_packed"]).abs().max()
        assert diff > 1.0, f"{backend}: output matches the official eager cross-image leak (max diff {diff})"


@torch.no_grad()
def test_packed_equals_each_image_alone(tower: MoonVitPretrainedModel, golden: dict[str, torch.Tensor],
                                        packed: tuple[torch.Tensor, torch.Tensor]) -> None:
    pixels, grid = packed
    out = tower(pixels, grid)
    torch.testing.assert_close(out, golden["vision.tower_out_each_image_alone"], **TOL)
    alone, start = [], 0
    for h, w in grid.tolist():
        alone.append(tower(pixels[start:start + h * w], torch.tensor([[h, w]])))
        start += h * w
    torch.testing.assert_close(out, torch.cat(alone), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@torch.no_grad()
def test_per_image_isolation(backend: str, tower: MoonVitPretrainedModel,
                             packed: tuple[torch.Tensor, torch.Tensor]) -> None:
    tower.attn_backend = backend
    pixels, grid = packed
    base = tower(pixels, grid)
    patch_bounds = [0, 48, 88, 92]
    slices = _token_slices()
    for j in range(3):
        perturbed = pixels.clone()
        perturbed[patch_bounds[j]:patch_bounds[j + 1]] += torch.randn_like(perturbed[patch_bounds[j]:patch_bounds[j + 1]])
        out = tower(perturbed, grid)
        for i in range(3):
            if i == j:
                assert (out[slices[i]] - base[slices[i]]).abs().max() > 1e-2
            else:
                torch.testing.assert_close(out[slices[i]], base[slices[i]], atol=1e-6, rtol=0)


@torch.no_grad()
def test_backends_agree_on_packed_input(tower: MoonVitPretrainedModel,
                                        packed: tuple[torch.Tensor, torch.Tensor]) -> None:
    outs = {}
    for backend in ("sdpa", "eager"):
        tower.attn_backend = backend
        outs[backend] = tower(*packed)
    torch.testing.assert_close(outs["sdpa"], outs["eager"], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_flash_agrees_with_sdpa(tower: MoonVitPretrainedModel, packed: tuple[torch.Tensor, torch.Tensor]) -> None:
    pytest.importorskip("flash_attn", reason="flash-attn not installed (the `flash` extra)")
    if not torch.cuda.is_available():
        pytest.skip("flash-attn needs a CUDA device")
    model = tower.to(device="cuda", dtype=torch.bfloat16)
    pixels, grid = packed[0].cuda(), packed[1]
    model.attn_backend = "flash"
    flash = model(pixels, grid).float()
    model.attn_backend = "sdpa"
    torch.testing.assert_close(flash, model(pixels, grid).float(), atol=5e-2, rtol=5e-2)  # bf16


@torch.no_grad()
def test_cpu_bf16_kernel_is_as_close_to_golden_as_sdpa(tower: MoonVitPretrainedModel,
                                                        golden: dict[str, torch.Tensor],
                                                        packed: tuple[torch.Tensor, torch.Tensor]) -> None:
    """The 'avx512_bf16' backend (kimivl's C++ kernel, what ``auto`` takes on AVX512-BF16 CPUs without AMX) on a
    bf16 tower: as close to the float32 golden output as the same tower through torch's SDPA."""
    from kimivl.ops import cpu_kernels

    ext = cpu_kernels.kernels() if "avx512_bf16" in cpu_kernels.cpu_flags() else None
    if ext is None or not ext.bf16_isa():
        pytest.skip("the avx512_bf16 attention kernel needs a CPU with AVX512-BF16 and kimivl's CPU kernels built")
    model = copy.deepcopy(tower).to(torch.bfloat16)
    errors = {}
    for backend in ("avx512_bf16", "sdpa"):
        model.attn_backend = backend
        errors[backend] = (model(*packed).float() - golden["vision.tower_out"]).abs().max().item()
    assert errors["avx512_bf16"] <= 1.25 * errors["sdpa"] + 1e-2, errors


@torch.no_grad()
def test_torch_varlen_agrees_with_sdpa_on_cuda(tower: MoonVitPretrainedModel,
                                               packed: tuple[torch.Tensor, torch.Tensor]) -> None:
    """The 'varlen' backend (PyTorch's flash varlen kernel) and CPU-side processor outputs on a CUDA tower."""
    if not torch.cuda.is_available():
        pytest.skip("the varlen backend needs a CUDA device")
    pytest.importorskip("torch.nn.attention.varlen", reason=f"torch {torch.__version__} has no varlen_attn")
    model = copy.deepcopy(tower).to(device="cuda", dtype=torch.bfloat16)
    pixels, grid = packed  # left on the CPU: the tower moves them to its device
    model.attn_backend = "varlen"
    got = model(pixels, grid).float()
    model.attn_backend = "sdpa"
    torch.testing.assert_close(got, model(pixels, grid).float(), atol=5e-2, rtol=5e-2)  # bf16


@torch.no_grad()
def test_prompt_pixel_values_path(tower: MoonVitPretrainedModel, golden: dict[str, torch.Tensor]) -> None:
    """The prompt image is the first processor image (70x98 -> 8x6 patches): same 12 merged tokens."""
    pixels, grid = golden["prompt.pixel_values"], golden["prompt.image_grid_hws"]
    assert grid.tolist() == [[8, 6]]
    torch.testing.assert_close(pixels, golden["processor.pixel_values"][:48], atol=0, rtol=0)
    torch.testing.assert_close(tower(pixels, grid), golden["vision.tower_out"][:12], **TOL)


@torch.no_grad()
def test_pixel_values_cast_to_weight_dtype(tower: MoonVitPretrainedModel, golden: dict[str, torch.Tensor],
                                           packed: tuple[torch.Tensor, torch.Tensor]) -> None:
    pixels, grid = packed
    torch.testing.assert_close(tower(pixels.double(), grid), golden["vision.tower_out"], **TOL)
    out = tower.to(torch.bfloat16)(pixels, grid)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), golden["vision.tower_out"], atol=0.25, rtol=0.05)  # bf16 weights


@torch.no_grad()
def test_empty_input(tower: MoonVitPretrainedModel) -> None:
    out = tower(torch.zeros(0, 3, 14, 14), torch.zeros(0, 2, dtype=torch.long))
    assert out.shape == (0, 4, 64)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@torch.no_grad()
def test_no_dense_packed_mask_or_scores(backend: str, tower: MoonVitPretrainedModel,
                                        packed: tuple[torch.Tensor, torch.Tensor],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """No tensor with two dims of the packed length L is built; SDPA runs unmasked, per image size."""
    pixels, grid = packed
    total, largest = pixels.shape[0], 48
    calls: list[tuple[int, int, bool]] = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        masked = (len(args) > 0 and args[0] is not None) or kwargs.get("attn_mask") is not None
        calls.append((query.shape[0] * query.shape[-2], key.shape[-2], masked))
        return real_sdpa(query, key, value, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    tower.attn_backend = backend
    recorder = TensorRecorder()
    with recorder:
        tower(pixels, grid)
    assert not [s for s in recorder.shapes if sum(d == total for d in s) >= 2]
    # Attention scores are (..., n, n) with n an image's length; nothing larger is square.
    assert not [s for s in recorder.shapes if len(s) >= 3 and s[-1] > largest and s[-1] == s[-2]]
    if backend == "sdpa":
        assert len(calls) == 2 * 3  # 2 layers x 3 distinct image lengths
        assert all(not masked and keys <= largest and rows * keys <= largest * largest for rows, keys, masked in calls)


@pytest.mark.parametrize(
    ("pixels_shape", "grid", "message"),
    [
        ((92, 3, 16, 16), [[8, 6], [4, 10], [2, 2]], r"pixel_values must have shape \(num_patches, 3, 14, 14\); "
                                                      r"got \(92, 3, 16, 16\)"),
        ((92, 588), [[8, 6], [4, 10], [2, 2]], r"got \(92, 588\)"),
        ((92, 3, 14, 14), [8, 6, 4, 10], r"image_grid_hws must have shape \(num_images, 2\); got \(4,\)"),
        ((92, 3, 14, 14), [[8.0, 6.0], [4.0, 10.0], [2.0, 2.0]], r"must hold integers .* got dtype torch.float32"),
        ((92, 3, 14, 14), [[8, 6], [0, 10], [2, 2]], r"image 1 has grid 0x10 patches; both sides must be positive"),
        ((92, 3, 14, 14), [[8, 6], [4, -10], [2, 2]], r"image 1 has grid 4x-10 patches; both sides must be positive"),
        ((114, 3, 14, 14), [[8, 6], [4, 10], [7, 2], [2, 2], [2, 4]],
         r"image 2 has grid 7x2 patches; the 2x2 patch merger needs the height divisible by 2 and the width by 2"),
        ((512 * 2, 3, 14, 14), [[2, 512]], r"image 0 has grid 2x512 patches; the 2-D RoPE allows fewer than 512"),
        ((96, 3, 14, 14), [[8, 6], [4, 10], [2, 2]],
         r"image_grid_hws \[\[8, 6\], \[4, 10\], \[2, 2\]\] cover 92 patches but pixel_values has 96"),
    ],
)
def test_input_errors_name_the_numbers(tower: MoonVitPretrainedModel, pixels_shape: tuple[int, ...],
                                       grid: list[Any], message: str) -> None:
    with pytest.raises(KimiVLInputError, match=message):
        tower(torch.zeros(pixels_shape), torch.tensor(grid))


def test_integer_pixels_are_refused(tower: MoonVitPretrainedModel) -> None:
    """Raw 0-255 patches (not the processor's normalized floats) would be cast and encoded as nonsense."""
    with pytest.raises(KimiVLInputError, match=r"pixel_values must be a float tensor .* got dtype torch.uint8"):
        tower(torch.zeros(92, 3, 14, 14, dtype=torch.uint8), torch.tensor([[8, 6], [4, 10], [2, 2]]))


def test_unknown_backend_rejected(vision_config: MoonViTConfig) -> None:
    with torch.device("meta"):
        with pytest.raises(ValueError, match="unknown attention backend 'fast'"):
            MoonVitPretrainedModel(vision_config, attn_backend="fast")
