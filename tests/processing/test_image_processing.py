"""Image processor: golden pixels and grids, resize arithmetic, PIL modes, sizes that must be refused."""
from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kimivl.configuration import MoonViTConfig
from kimivl.errors import KimiVLInputError
from kimivl.processing import KimiVLImageProcessor, image_grid_hw, num_image_tokens, resized_size


@pytest.fixture(scope="module")
def ip(tiny_dir: Path) -> KimiVLImageProcessor:
    return KimiVLImageProcessor.from_pretrained(tiny_dir)


def _smooth_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    arr = np.stack([127 + 100 * np.sin(x / 37 + c) * np.cos(y / 23 - c) for c in range(3)], axis=-1)
    arr += rng.normal(0, 8, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def test_settings_from_preprocessor_config(ip):
    assert (ip.patch_size, ip.pad_input, ip.in_token_limit, ip.merge_kernel_size) == (14, True, 4096, [2, 2])
    assert ip.image_mean == [0.5] * 3 and ip.image_std == [0.5] * 3
    assert ip.to_dict()["image_processor_type"] == "KimiVLImageProcessor"  # unknown keys kept


def test_golden_pixel_values_and_grids(ip, tiny_dir, expected, expected_json):
    images = [Image.open(tiny_dir / "inputs" / name) for name in expected_json["images"]]
    out = ip.preprocess(images)
    assert out["pixel_values"].dtype == torch.float32
    torch.testing.assert_close(out["pixel_values"], expected["processor.pixel_values"], atol=1e-6, rtol=0)
    assert torch.equal(out["image_grid_hws"], expected["processor.image_grid_hws"])
    for (w, h), (gh, gw), img in zip(expected_json["processor"]["rescaled_sizes_wh"],
                                     expected_json["processor"]["image_grid_hws"], images):
        assert (gw * 14, gh * 14) == (w, h)
        assert num_image_tokens(*img.size) == gh * gw // 4


def test_large_image_grid_matches_golden(ip, expected, expected_json):
    """The 1000x980 image of the golden set (pixels not stored): token-limit resize then pad."""
    large = expected_json["large_image"]
    w, h = large["width"], large["height"]
    assert resized_size(w, h) == (907, 889)
    grid = expected["large.image_grid_hws"][0].tolist()
    assert list(image_grid_hw(w, h)) == grid == [64, 66]
    assert num_image_tokens(w, h) == 64 * 66 // 4 == ip.num_image_tokens(w, h)
    assert [grid[1] * 14, grid[0] * 14] == large["rescaled_size_wh"]
    out = ip.preprocess(_smooth_image(w, h))
    assert out["image_grid_hws"].tolist() == [grid]
    assert list(out["pixel_values"].shape) == large["pixel_values_shape"]
    # padding geometry against the stored last two patches: pixels right of x=907 or below y=889 are the
    # black padding (-1 after the 0.5/0.5 normalisation), the rest is image
    last2 = expected["large.pixel_values_last2"]
    ys = 63 * 14 + torch.arange(14).view(14, 1)
    for k, col in enumerate((64, 65)):
        xs = col * 14 + torch.arange(14).view(1, 14)
        pad = (xs >= 907) | (ys >= 889)
        assert torch.all(last2[k][:, pad] == -1.0)
        assert torch.all(out["pixel_values"][-2 + k][:, pad] == -1.0)
        if not pad.all():  # patch 64 still holds image pixels
            assert not torch.all(last2[k][:, ~pad] == -1.0)


def test_num_image_tokens_agrees_with_processor(ip):
    rng = random.Random(0)
    sizes = [(1, 1), (14, 14), (27, 29), (28, 28), (900, 1), (1, 500)] + [
        (rng.randint(1, 1400), rng.randint(1, 1400)) for _ in range(12)]
    for w, h in sizes:
        out = ip.preprocess(Image.new("RGB", (w, h), (10, 20, 30)))
        gh, gw = out["image_grid_hws"][0].tolist()
        assert num_image_tokens(w, h) == gh * gw // 4, (w, h)
        assert out["pixel_values"].shape[0] == gh * gw


def test_patch_layout_row_major_channel_major(ip):
    arr = np.zeros((28, 56, 3), np.uint8)
    arr[:14, 14:28] = (255, 0, 0)   # patch (0, 1)
    arr[14:, :14, 2] = 255          # patch (1, 0), blue
    pv = ip.preprocess(Image.fromarray(arr))["pixel_values"]
    assert pv.shape == (8, 3, 14, 14)
    assert torch.all(pv[1, 0] == 1) and torch.all(pv[1, 1:] == -1)
    assert torch.all(pv[4, 2] == 1) and torch.all(pv[4, :2] == -1)
    assert torch.all(pv[0] == -1)


@pytest.mark.parametrize("mode", ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr",
                                  "LAB", "HSV", "I", "I;16", "I;16B", "F"])
def test_every_pil_mode(ip, mode):
    base = _smooth_image(61, 45)
    image = base.convert(mode) if mode not in ("I;16", "I;16B", "La", "PA", "RGBa") else None
    if mode in ("I;16", "I;16B"):
        arr = np.asarray(base.convert("L")).astype(np.uint16) * 257
        image = Image.frombytes(mode, base.size, arr.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
    elif mode in ("La", "PA", "RGBa"):
        image = base.convert({"La": "LA", "PA": "RGBA", "RGBa": "RGBA"}[mode])
        image = image.convert("P").convert("PA") if mode == "PA" else image.convert(mode)
    assert image.mode == mode
    out = ip.preprocess(image)
    pv = out["pixel_values"]
    assert out["image_grid_hws"].tolist() == [[4, 6]]
    assert torch.isfinite(pv).all() and pv.min() >= -1 and pv.max() <= 1
    if mode in ("L", "I;16", "I;16B"):  # 16-bit is scaled to 8 bits, not clipped to white
        reference = ip.preprocess(base.convert("L"))["pixel_values"]
        torch.testing.assert_close(pv, reference, atol=1e-6, rtol=0)


def test_rgba_drops_alpha_and_pads_in_source_mode(ip):
    rgba = Image.new("RGBA", (20, 20), (200, 100, 50, 0))
    pv = ip.preprocess(rgba)["pixel_values"].reshape(2, 2, 3, 14, 14)
    assert torch.allclose(pv[0, 0, :, 0, 0], torch.tensor([200, 100, 50]) / 255 * 2 - 1)
    # official order pads before the RGB conversion: CMYK zeros are white, RGB zeros black
    cmyk = ip.preprocess(Image.new("CMYK", (20, 20), (0, 0, 0, 255)))["pixel_values"].reshape(2, 2, 3, 14, 14)
    assert torch.all(cmyk[0, 0] == -1) and torch.all(cmyk[1, 1, :, 13, 13] == 1)


@pytest.mark.parametrize("size", [(0, 10), (10, 0), (0, 0)])
def test_zero_size_image(ip, size):
    with pytest.raises(KimiVLInputError, match=rf"empty \({size[0]}x{size[1]} pixels\)"):
        ip.preprocess(Image.new("RGB", size))
    with pytest.raises(KimiVLInputError, match="empty"):
        num_image_tokens(*size)


@pytest.mark.parametrize("size", [(1, 10_000), (20_000, 20), (8000, 14)])
def test_extreme_aspect_ratio_refused_with_numbers(ip, size):
    with pytest.raises(KimiVLInputError) as err:
        ip.preprocess(Image.new("RGB", size))
    msg = str(err.value)
    assert f"{size[0]}x{size[1]}" in msg and "rope_max_grid=512" in msg and "in_token_limit=4096" in msg
    assert "511 patches per side" in msg


def test_thin_but_valid_images(ip):
    assert ip.preprocess(Image.new("RGB", (5000, 14)))["image_grid_hws"].tolist() == [[2, 358]]
    assert ip.preprocess(Image.new("RGB", (1, 1)))["image_grid_hws"].tolist() == [[2, 2]]


def test_position_limit_is_the_config_constant(monkeypatch):
    assert image_grid_hw(300, 300) == (22, 22)
    monkeypatch.setattr(MoonViTConfig, "rope_max_grid", 20)
    with pytest.raises(KimiVLInputError, match="rope_max_grid=20"):
        image_grid_hw(300, 300)


def test_token_limit_resize_arithmetic():
    for w, h, limit in [(1000, 980, 4096), (1792, 1792, 16384), (4000, 3000, 16384), (3000, 20, 16)]:
        patches = (w // 14) * (h // 14)
        nw, nh = resized_size(w, h, in_token_limit=limit)
        if patches > limit:
            s = math.sqrt(limit / patches)
            assert (nw, nh) == (int(w * s), int(h * s))
        else:
            assert (nw, nh) == (w, h)
    assert num_image_tokens(1792, 1792, in_token_limit=16384) == 4096


def test_centre_crop_path():
    ip = KimiVLImageProcessor(pad_input=False)
    arr = np.zeros((60, 60, 3), np.uint8)
    arr[2:58, 2:58] = 255  # 56x56 centre crop starts at (2, 2): all white
    out = ip.preprocess(Image.fromarray(arr))
    assert out["image_grid_hws"].tolist() == [[4, 4]] and torch.all(out["pixel_values"] == 1)
    with pytest.raises(KimiVLInputError, match="not a multiple of merge_kernel_size"):
        ip.preprocess(Image.new("RGB", (42, 28)))
    with pytest.raises(KimiVLInputError, match="smaller than one 14x14 patch"):
        ip.preprocess(Image.new("RGB", (10, 30)))


def test_hf_style_call(ip, tiny_dir, expected):
    image = Image.open(tiny_dir / "inputs" / "image_28x28.png")
    out = ip(image, return_tensors="np")
    assert isinstance(out["pixel_values"], np.ndarray) and out["image_grid_hws"].tolist() == [[2, 2]]
    assert np.array_equal(out["pixel_values"], expected["processor.pixel_values"][-4:].numpy())


def test_not_a_pil_image(ip):
    with pytest.raises(KimiVLInputError, match="expected a PIL image"):
        ip.preprocess([np.zeros((4, 4, 3), np.uint8)])


def test_bad_settings():
    with pytest.raises(KimiVLInputError, match="merge_kernel_size"):
        KimiVLImageProcessor(merge_kernel_size=[2])
    with pytest.raises(KimiVLInputError, match="image_std"):
        KimiVLImageProcessor(image_std=[0.5, 0.0, 0.5])


@pytest.mark.parametrize("key, value, message", [
    ("patch_size", "14", "patch_size = '14' must be an integer, got str"),
    ("in_token_limit", True, "in_token_limit = True must be an integer, got bool"),
    ("merge_kernel_size", "2x2", r"merge_kernel_size = '2x2' must be a list \(an integer each\), got str"),
    ("merge_kernel_size", [2.0, 2], r"merge_kernel_size = \[2.0, 2\] must be a list \(an integer each\)"),
    ("image_mean", ["0.5", 0.5, 0.5], r"image_mean = \['0.5', 0.5, 0.5\] must be a list \(a number each\)"),
    ("pad_input", "yes", "pad_input = 'yes' must be true/false, got str"),
])
def test_mistyped_settings_in_the_file_are_named(tiny_dir, tmp_path, key, value, message):
    import json
    import re

    data = json.loads((tiny_dir / "preprocessor_config.json").read_text())
    data[key] = value
    path = tmp_path / "preprocessor_config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(KimiVLInputError, match=f"{re.escape(str(path))}: image processor setting {message}"):
        KimiVLImageProcessor.from_pretrained(path)
    data.pop(key)  # integers are numbers: mean/std may be written 0 / 1
    path.write_text(json.dumps({**data, "image_mean": [0, 0, 0], "image_std": [1, 1, 1]}))
    assert KimiVLImageProcessor.from_pretrained(path).image_std == [1.0, 1.0, 1.0]
