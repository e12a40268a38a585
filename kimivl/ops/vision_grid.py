"""Index arithmetic over packed image patch grids: segments, positions, pos-emb resize, 2x2 merge.

Spec: ``shared/reference/kimivl-spec.md`` §3.1, §3.2, §3.5. Official names: ``Learnable2DInterpPosEmb``
(bicubic resize of the table), ``patch_merger`` and the ``cu_seqlens`` built in ``MoonVitEncoder``.
Deliberate deviation: ``patch_merge`` returns one (T, kh*kw, D) tensor (images in order) instead
of a list of per-image tensors; it is built with a single gather index instead of a per-image loop.

A grid is ``image_grid_hws``: (N, 2) integer (h, w) patches per image. Packed patches are all
images concatenated, row-major inside each image.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kimivl.ops.attention import cu_seqlens_from_grid

__all__ = ["cu_seqlens_from_grid", "grid_positions", "interpolate_pos_emb", "patch_merge", "patch_merge_index",
           "resize_pos_emb"]


def _image_of_patch(grid: torch.Tensor, num_patches: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(image id, index inside its image) of every packed patch, each (L,) int64."""
    lengths = grid[:, 0] * grid[:, 1]
    if num_patches is None:
        num_patches = int(lengths.sum())
    image = torch.repeat_interleave(torch.arange(grid.shape[0], device=grid.device), lengths,
                                    output_size=num_patches)
    starts = torch.cumsum(lengths, 0) - lengths
    local = torch.arange(num_patches, device=grid.device) - starts[image]
    return image, local


def grid_positions(grid_hws: torch.Tensor, num_patches: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of every packed patch inside its own image (restarting at (0, 0) per image).

    grid_hws: (N, 2) -> (rows, cols), each (L,) int64 with L = sum h*w (pass ``num_patches`` = L
    when known to avoid a device->host copy).
    """
    grid = grid_hws.long()
    image, local = _image_of_patch(grid, num_patches)
    width = grid[image, 1]
    return torch.div(local, width, rounding_mode="floor"), local % width


def resize_pos_emb(table: torch.Tensor, hw: Sequence[int]) -> torch.Tensor:
    """The learnable (H0, W0, D) position table resized to one (h, w) grid: (h*w, D), row-major.

    Bicubic, align_corners=False and no antialias to match the reference, in the table's dtype.
    At the table's own size it returns a view of the table: bicubic to the same size is an exact
    identity (every tap weight is 0 or 1), so only the cost differs from the reference, which
    always interpolates (its same-size shortcut never fires).
    """
    h, w = int(hw[0]), int(hw[1])
    height, width, dim = table.shape
    if (h, w) == (height, width):
        return table.reshape(h * w, dim)
    source = table.permute(2, 0, 1).unsqueeze(0)  # (1, D, H0, W0)
    out = F.interpolate(source, size=(h, w), mode="bicubic", align_corners=False, antialias=False)
    return out[0].flatten(1).transpose(0, 1)  # (h*w, D)


def interpolate_pos_emb(table: torch.Tensor, grid_hws: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
    """Resize the learnable (H0, W0, D) position table to every image's grid and pack the results.

    Returns (L, D), row-major per image (``resize_pos_emb`` per image). One resize per distinct
    (h, w), since sizes differ in general.
    """
    hws = [tuple(int(v) for v in hw) for hw in (grid_hws.tolist() if isinstance(grid_hws, torch.Tensor) else grid_hws)]
    if not hws:
        return table.new_zeros(0, table.shape[-1])
    resized: dict[tuple[int, ...], torch.Tensor] = {}
    for hw in hws:
        if hw not in resized:
            resized[hw] = resize_pos_emb(table, hw)
    return torch.cat([resized[hw] for hw in hws], dim=0)


def patch_merge_index(grid_hws: torch.Tensor, kernel: Sequence[int] = (2, 2),
                      num_patches: int | None = None) -> torch.Tensor:
    """Gather index (L,) int64 such that ``x[index].view(L // (kh*kw), kh*kw, D)`` is the merged output.

    Order of the official merger: per image, kh x kw blocks row-major, and inside a block the
    patches row-major ((0,0), (0,1), (1,0), (1,1) for 2x2). Needs h % kh == 0 and w % kw == 0.
    """
    kh, kw = (int(v) for v in kernel)
    grid = grid_hws.long()
    if bool(((grid[:, 0] % kh) != 0).any() or ((grid[:, 1] % kw) != 0).any()):
        raise ValueError(f"patch grids {grid.tolist()} are not all divisible by the {kh}x{kw} merge kernel")
    image, local = _image_of_patch(grid, num_patches)
    width = grid[image, 1]
    row = torch.div(local, width, rounding_mode="floor")
    col = local % width
    blocks_per_row = torch.div(width, kw, rounding_mode="floor")
    block = torch.div(row, kh, rounding_mode="floor") * blocks_per_row + torch.div(col, kw, rounding_mode="floor")
    within = (row % kh) * kw + col % kw
    image_start = torch.arange(local.numel(), device=local.device) - local
    dest = image_start + block * (kh * kw) + within  # where each source patch lands in the flat output
    index = torch.empty_like(dest)
    index[dest] = torch.arange(dest.numel(), device=dest.device)
    return index


def patch_merge(x: torch.Tensor, grid_hws: torch.Tensor, kernel: Sequence[int] = (2, 2)) -> torch.Tensor:
    """Group each kh x kw block of patches: x (L, D) -> (L / (kh*kw), kh*kw, D), contiguous, images in order."""
    kh, kw = (int(v) for v in kernel)
    index = patch_merge_index(grid_hws.to(x.device), (kh, kw), num_patches=x.shape[0])
    return x.index_select(0, index).view(-1, kh * kw, x.shape[-1])
