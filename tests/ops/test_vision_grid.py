"""Packed patch-grid helpers: cu_seqlens, positions, pos-emb resize, patch merge order."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kimivl.ops.vision_grid import (
    cu_seqlens_from_grid,
    grid_positions,
    interpolate_pos_emb,
    patch_merge,
    patch_merge_index,
)

GRID = torch.tensor([[4, 6], [2, 2], [6, 4], [2, 8]])


def _hand_merge_index(grid: list[list[int]], kh: int = 2, kw: int = 2) -> list[int]:
    """Explicit loops over images, blocks and in-block offsets in the official merger order."""
    index, start = [], 0
    for h, w in grid:
        for br in range(h // kh):
            for bc in range(w // kw):
                for dr in range(kh):
                    for dc in range(kw):
                        index.append(start + (br * kh + dr) * w + bc * kw + dc)
        start += h * w
    return index


def test_cu_seqlens_from_grid() -> None:
    cu = cu_seqlens_from_grid(GRID)
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 24, 28, 52, 68]


def test_grid_positions_restart_per_image() -> None:
    rows, cols = grid_positions(torch.tensor([[2, 3], [1, 2]]))
    assert rows.tolist() == [0, 0, 0, 1, 1, 1, 0, 0]
    assert cols.tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
    expected_rows = [r for h, w in GRID.tolist() for r in range(h) for _ in range(w)]
    expected_cols = [c for h, w in GRID.tolist() for _ in range(h) for c in range(w)]
    rows, cols = grid_positions(GRID, num_patches=68)
    assert rows.tolist() == expected_rows and cols.tolist() == expected_cols


def test_patch_merge_order_matches_hand_built_index() -> None:
    assert patch_merge_index(GRID).tolist() == _hand_merge_index(GRID.tolist())
    x = torch.randn(68, 5)
    merged = patch_merge(x, GRID)
    assert merged.shape == (17, 4, 5) and merged.is_contiguous()
    torch.testing.assert_close(merged, x[_hand_merge_index(GRID.tolist())].view(17, 4, 5), atol=0, rtol=0)


def test_patch_merge_first_block_layout() -> None:
    """First token of a 4x6 image = patches (0,0), (0,1), (1,0), (1,1) = flat 0, 1, 6, 7."""
    x = torch.arange(24, dtype=torch.float32)[:, None]
    merged = patch_merge(x, torch.tensor([[4, 6]]))
    assert merged[0, :, 0].tolist() == [0, 1, 6, 7]
    assert merged[1, :, 0].tolist() == [2, 3, 8, 9]
    assert merged[3, :, 0].tolist() == [12, 13, 18, 19]  # second block row starts after 3 blocks


def test_patch_merge_is_a_permutation_and_invertible() -> None:
    index = patch_merge_index(GRID)
    assert sorted(index.tolist()) == list(range(68))
    x = torch.randn(68, 3)
    flat = patch_merge(x, GRID).reshape(68, 3)
    restored = torch.empty_like(x)
    restored[index] = flat
    torch.testing.assert_close(restored, x, atol=0, rtol=0)


def test_patch_merge_other_kernel() -> None:
    grid = torch.tensor([[3, 4], [6, 2]])
    assert patch_merge_index(grid, (3, 2)).tolist() == _hand_merge_index(grid.tolist(), 3, 2)
    with pytest.raises(ValueError, match=r"not all divisible by the 2x2 merge kernel"):
        patch_merge_index(grid, (2, 2))


def test_interpolation_identity_at_native_size() -> None:
    table = torch.randn(8, 6, 5, generator=torch.Generator().manual_seed(0))
    out = interpolate_pos_emb(table, torch.tensor([[8, 6]]))
    torch.testing.assert_close(out, table.reshape(48, 5), atol=0, rtol=0)


def test_interpolation_packs_images_row_major() -> None:
    table = torch.randn(8, 8, 3, generator=torch.Generator().manual_seed(1))
    grid = [[4, 6], [8, 8], [4, 6], [10, 2]]
    out = interpolate_pos_emb(table, torch.tensor(grid))
    assert out.shape == (24 + 64 + 24 + 20, 3)
    parts = []
    for h, w in grid:
        resized = F.interpolate(table.permute(2, 0, 1)[None], size=(h, w), mode="bicubic", align_corners=False)
        parts.append(resized[0].permute(1, 2, 0).reshape(h * w, 3))  # (h, w, D) row-major
    torch.testing.assert_close(out, torch.cat(parts), atol=1e-6, rtol=1e-6)
    # Same input via a plain list of (h, w) pairs.
    torch.testing.assert_close(interpolate_pos_emb(table, grid), out, atol=0, rtol=0)


def test_interpolation_of_constant_table_is_constant() -> None:
    """Bicubic weights sum to 1 (border clamped), so a constant table stays constant at any size."""
    table = torch.full((8, 8, 2), 0.75)
    torch.testing.assert_close(interpolate_pos_emb(table, torch.tensor([[3, 17]])), torch.full((51, 2), 0.75),
                               atol=1e-6, rtol=0)


def test_empty_grid() -> None:
    empty = torch.zeros(0, 2, dtype=torch.long)
    assert interpolate_pos_emb(torch.randn(4, 4, 3), empty).shape == (0, 3)
    assert patch_merge(torch.randn(0, 3), empty).shape == (0, 4, 3)
    assert cu_seqlens_from_grid(empty).tolist() == [0]
