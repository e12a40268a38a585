"""MoonViT's CPU fast paths change cost, not results: cached position tables, GEMM patch embedding,
in-place GELU / residual adds, q and k rotated together.

Each test compares against the plain computation (fresh bicubic resize, Conv2d, out-of-place ops) or
checks autograd numerically (float64 ``gradcheck`` on a tiny tower), since the fast paths must switch
off exactly when a gradient is needed. The golden-data parity of the same code is in
``test_moonvit_parity.py``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from kimivl.configuration import MoonViTConfig
from kimivl.ops.vision_grid import interpolate_pos_emb, resize_pos_emb
from kimivl.vision import MoonVitPretrainedModel
from kimivl.vision.moonvit import POS_EMB_CACHE_ROWS, gelu_

GRID = torch.tensor([[4, 6], [2, 2], [4, 6], [6, 4]])  # repeated and transposed sizes


def _tiny(seed: int = 0, dtype: torch.dtype = torch.float32) -> MoonVitPretrainedModel:
    config = MoonViTConfig(patch_size=2, init_pos_emb_height=4, init_pos_emb_width=4, num_attention_heads=2,
                           num_hidden_layers=2, hidden_size=8, intermediate_size=16)
    torch.manual_seed(seed)
    return MoonVitPretrainedModel(config).to(dtype).eval()


def _pixels(grid: torch.Tensor, patch: int = 2, dtype: torch.dtype = torch.float32, seed: int = 1) -> torch.Tensor:
    total = int(grid.prod(-1).sum())
    return torch.randn(total, 3, patch, patch, generator=torch.Generator().manual_seed(seed)).to(dtype)


@torch.no_grad()
def test_resize_at_native_size_is_exact_identity() -> None:
    table = torch.randn(5, 7, 3, dtype=torch.float64)
    native = resize_pos_emb(table, (5, 7))
    bicubic = F.interpolate(table.permute(2, 0, 1)[None], size=(5, 7), mode="bicubic", align_corners=False)
    torch.testing.assert_close(native, bicubic[0].flatten(1).T, atol=0, rtol=0)
    assert native.data_ptr() == table.data_ptr()  # a view: no work at all


@torch.no_grad()
def test_patch_embedding_gemm_equals_conv() -> None:
    tower = _tiny()
    pixels = _pixels(GRID)
    embed = tower.patch_embed
    conv = embed.proj(pixels).flatten(1)
    torch.testing.assert_close(embed(pixels, GRID), conv + interpolate_pos_emb(embed.pos_emb.weight, GRID),
                               atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_position_cache_reused_and_invalidated() -> None:
    pos = _tiny().patch_embed.pos_emb
    x = torch.randn(int(GRID.prod(-1).sum()), 8)
    torch.testing.assert_close(pos(x, GRID), x + interpolate_pos_emb(pos.weight, GRID), atol=0, rtol=0)
    assert pos.table((4, 6)) is pos.table((4, 6))  # kept, not recomputed

    pos.weight.mul_(3.0)  # an in-place update (an optimizer step) must not leave stale tables
    torch.testing.assert_close(pos(x, GRID), x + interpolate_pos_emb(pos.weight, GRID), atol=0, rtol=0)

    pos.weight = torch.nn.Parameter(torch.randn_like(pos.weight))  # replaced (load with assign=True)
    torch.testing.assert_close(pos(x, GRID), x + interpolate_pos_emb(pos.weight, GRID), atol=0, rtol=0)

    pos.to(torch.float64)  # cast
    torch.testing.assert_close(pos(x.double(), GRID), x.double() + interpolate_pos_emb(pos.weight, GRID),
                               atol=0, rtol=0)


@torch.no_grad()
def test_position_cache_is_bounded() -> None:
    pos = _tiny().patch_embed.pos_emb
    sizes = [(h, w) for h in range(40, 100, 6) for w in (50, 90)]  # far more rows than the bound
    for hw in sizes:
        torch.testing.assert_close(pos.table(hw), resize_pos_emb(pos.weight, hw), atol=0, rtol=0)
    assert sum(t.shape[0] for t in pos._resized.values()) <= POS_EMB_CACHE_ROWS
    assert sizes[-1] in pos._resized and sizes[0] not in pos._resized


def test_no_cache_when_the_table_needs_a_gradient() -> None:
    pos = _tiny().patch_embed.pos_emb
    x = torch.randn(int(GRID.prod(-1).sum()), 8)
    pos(x, GRID).square().sum().backward()
    table = pos.weight.detach().clone().requires_grad_(True)
    (x + interpolate_pos_emb(table, GRID)).square().sum().backward()
    torch.testing.assert_close(pos.weight.grad, table.grad, atol=1e-6, rtol=1e-6)
    assert not pos._resized


def test_gelu_in_place_only_without_gradient() -> None:
    x = torch.randn(5, 7)
    expected = F.gelu(x, approximate="tanh")
    y = x.clone()
    with torch.no_grad():
        assert gelu_(y, approximate="tanh") is y
    torch.testing.assert_close(y, expected, atol=0, rtol=0)
    leaf = x.clone().requires_grad_(True)
    h = leaf * 1.0
    out = gelu_(h, approximate="tanh")
    assert out is not h
    out.sum().backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()


def test_grad_mode_output_equals_inference_output() -> None:
    tower = _tiny()
    pixels = _pixels(GRID)
    with torch.inference_mode():
        fast = tower(pixels, GRID)
    slow = tower(pixels, GRID)  # parameters require grad: every fast path is off
    assert slow.requires_grad
    torch.testing.assert_close(slow.detach(), fast, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_gradients_are_exact(backend: str) -> None:
    """float64 gradcheck through patch embedding, cached-or-not positions, RoPE, attention, in-place adds."""
    tower = _tiny(dtype=torch.float64)
    tower.attn_backend = backend
    grid = torch.tensor([[2, 4], [2, 2]])
    pixels = _pixels(grid, dtype=torch.float64).requires_grad_(True)
    table = tower.patch_embed.pos_emb.weight.detach().clone().requires_grad_(True)

    def run(pv: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return functional_call(tower, {"patch_embed.pos_emb.weight": pos}, (pv, grid))

    assert torch.autograd.gradcheck(run, (pixels, table), eps=1e-6, atol=1e-5, rtol=1e-4)
