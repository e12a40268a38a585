"""MoonViT: the native-resolution vision encoder of Kimi-VL.

Spec: ``shared/reference/kimivl-spec.md`` §2 (module tree, ``vision_tower.*`` keys) and §3 (numerics).
Official classes: ``MoonVitPretrainedModel``, ``MoonVisionPatchEmbed``, ``Learnable2DInterpPosEmb``,
``MoonVitEncoder``, ``MoonVitEncoderLayer``, ``MLP2``; attribute names equal the checkpoint keys.
Deliberate deviations: no ``rope_2d`` attribute or buffers (RoPE cos/sin are computed from the grid
once per forward, so the model can be built on ``meta`` and assigned); attention is strictly per
image for every backend (the official eager path leaks across packed images); the output is one
(T, 4, D) tensor instead of a list; the attention backend is a runtime attribute, not a config field.
CPU-throughput choices (same maths, ``docs/performance.md``): the patch Conv2d runs as one
GEMM on the flattened patches; resized position tables are kept per grid size while the table is
unchanged and no gradient is needed; q and k are rotated together in one pass; the GELU and the
residual adds write into fresh activations instead of allocating new ones.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from kimivl.configuration import MoonViTConfig
from kimivl.errors import KimiVLInputError
from kimivl.ops.attention import BACKENDS, varlen_attention
from kimivl.ops.linear import Linear, gelu_, linear, linear_gelu
from kimivl.ops.rope_2d import VISION_ROPE_THETA, rope_2d_cos_sin, rope_2d_rotation, rotate_pairs
from kimivl.ops.vision_grid import cu_seqlens_from_grid, grid_positions, patch_merge, resize_pos_emb

# LayerNorm eps of every vision-side norm (encoder and projector pre_norm): the official
# nn.LayerNorm default, never read from the config.
VISION_LAYER_NORM_EPS: float = 1e-5


# Resized position tables kept per module (rows of all cached grids together): 4 full 64x64 grids,
# i.e. ~75 MB in float32 at width 1152.
POS_EMB_CACHE_ROWS: int = 4 * 64 * 64


class Learnable2DInterpPosEmb(nn.Module):
    """Learnable (H0, W0, D) position table, bicubically resized to each image's grid and added.

    The bicubic resize costs 10-80 ms per image size at the released width on CPU, every forward in
    the reference. Here the resized tables are kept per (h, w) (oldest dropped first, at most
    ``POS_EMB_CACHE_ROWS`` rows) while the table is unchanged (same storage, no in-place update since)
    and no gradient flows to it; otherwise they are computed afresh. Not part of the state dict.
    """

    def __init__(self, height: int, width: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(height, width, dim))
        self._resized: OrderedDict[tuple[int, int], torch.Tensor] = OrderedDict()
        self._resized_from: tuple[torch.Tensor, int] | None = None  # (alias of the table, its version)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Not on the meta device (from_pretrained's skeleton, whose weights are loaded next): as decoder.model's
        # Embedding, which says why.
        if not self.weight.is_meta:
            nn.init.normal_(self.weight)

    def table(self, hw: tuple[int, int]) -> torch.Tensor:
        """The table resized to one (h, w) grid: (h*w, D)."""
        table = self.weight
        if (torch.is_grad_enabled() and table.requires_grad) or table.is_meta:
            return resize_pos_emb(table, hw)
        source = self._resized_from
        # The alias keeps the old storage alive, so an equal data_ptr means the same tensor; the
        # version counter (shared with the alias) catches in-place updates such as optimizer steps.
        if source is None or source[0].data_ptr() != table.data_ptr() or source[0].dtype != table.dtype \
                or source[0].device != table.device or source[1] != table._version:
            self._resized.clear()
            self._resized_from = (table.detach(), table._version)
        cached = self._resized.get(hw)
        if cached is None:
            cached = resize_pos_emb(table.detach(), hw)
            self._resized[hw] = cached
            while sum(t.shape[0] for t in self._resized.values()) > POS_EMB_CACHE_ROWS and len(self._resized) > 1:
                self._resized.popitem(last=False)
        return cached

    def forward(self, x: torch.Tensor, grid_hws: torch.Tensor) -> torch.Tensor:
        """x: (L, D) patch embeddings -> (L, D) with the resized table added."""
        tables = [self.table((int(h), int(w))) for h, w in grid_hws.tolist()]
        if not tables:
            return x
        return x + (tables[0] if len(tables) == 1 else torch.cat(tables, dim=0))


class MoonVisionPatchEmbed(nn.Module):
    """Conv2d patch embedding (kernel = stride = patch_size) plus the learnable 2-D position embedding."""

    def __init__(self, config: MoonViTConfig) -> None:
        super().__init__()
        p = config.patch_size
        self.patch_size = p
        self.proj = nn.Conv2d(3, config.hidden_size, kernel_size=p, stride=p)
        self.pos_emb = Learnable2DInterpPosEmb(config.init_pos_emb_height, config.init_pos_emb_width,
                                               config.hidden_size)

    def forward(self, pixel_values: torch.Tensor, grid_hws: torch.Tensor) -> torch.Tensor:
        """pixel_values: (L, 3, p, p) -> (L, D)."""
        # kernel = stride = patch: the convolution is one GEMM over the flattened patches, and the
        # CPU convolution path is several times slower than a plain GEMM for this shape.
        x = linear(pixel_values.flatten(1), self.proj.weight.flatten(1), self.proj.bias)
        return self.pos_emb(x, grid_hws)


class MLP2(nn.Module):
    """fc0 -> GELU (tanh approximation, the reference's ``PytorchGELUTanh``) -> fc1."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc0 = Linear(dim, hidden_dim)
        self.fc1 = Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc1(linear_gelu(self.fc0, x, approximate="tanh"))


class MoonVitEncoderLayer(nn.Module):
    """Pre-norm block: x = x + Attn(norm0(x)); x = x + MLP(norm1(x))."""

    def __init__(self, config: MoonViTConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.norm0 = nn.LayerNorm(dim, eps=VISION_LAYER_NORM_EPS)
        self.norm1 = nn.LayerNorm(dim, eps=VISION_LAYER_NORM_EPS)
        self.wqkv = Linear(dim, 3 * dim)
        self.wo = Linear(dim, dim)
        self.mlp = MLP2(dim, config.intermediate_size)

    def attention(self, x: torch.Tensor, cu_seqlens: torch.Tensor, seqlens: list[int],
                  rope: tuple[torch.Tensor, torch.Tensor], attn_backend: str) -> torch.Tensor:
        """x: (L, D) -> (L, D): per-image multi-head attention with 2-D RoPE on q and k."""
        qkv = self.wqkv(x).view(x.shape[0], 3, self.num_heads, self.head_dim)
        qk = rotate_pairs(qkv[:, :2], *rope)  # q and k in one pass: (L, 2, H, Dh)
        out = varlen_attention(qk[:, 0], qk[:, 1], qkv[:, 2], cu_seqlens, backend=attn_backend, seqlens=seqlens)
        return self.wo(out.flatten(1))

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, seqlens: list[int],
                rope: tuple[torch.Tensor, torch.Tensor], attn_backend: str = "auto") -> torch.Tensor:
        """x: (L, D); cu_seqlens: (N+1,) int32; rope: per-channel rotation (L, Dh) float32 -> (L, D).

        The residual is added into the sublayer's fresh output (a + b == b + a exactly), never into x.
        """
        x = self.attention(self.norm0(x), cu_seqlens, seqlens, rope, attn_backend).add_(x)
        return self.mlp(self.norm1(x)).add_(x)


class MoonVitEncoder(nn.Module):
    """The stack of encoder layers and the final LayerNorm; builds cu_seqlens and RoPE once per call."""

    def __init__(self, config: MoonViTConfig) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.blocks = nn.ModuleList(MoonVitEncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=VISION_LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor, grid_hws: torch.Tensor, attn_backend: str = "auto") -> torch.Tensor:
        """x: (L, D) embedded patches, grid_hws: (N, 2) -> (L, D)."""
        grid = grid_hws.to(device=x.device, dtype=torch.long)
        seqlens = [h * w for h, w in grid.tolist()]
        cu_seqlens = cu_seqlens_from_grid(grid)
        rows, cols = grid_positions(grid, num_patches=x.shape[0])
        rope = rope_2d_rotation(*rope_2d_cos_sin(rows, cols, self.head_dim, VISION_ROPE_THETA))
        for block in self.blocks:
            x = block(x, cu_seqlens, seqlens, rope, attn_backend)
        return self.final_layernorm(x)


class MoonVitPretrainedModel(nn.Module):
    """MoonViT tower: (L, 3, p, p) packed patches + (N, 2) grids -> (L / (kh*kw), kh*kw, D) merged tokens.

    ``attn_backend`` ("auto", "flash", "varlen", "avx512_bf16", "sdpa" or "eager") is a runtime choice and may
    be changed on the instance at any time.
    """

    def __init__(self, config: MoonViTConfig, *, attn_backend: str = "auto") -> None:
        super().__init__()
        if attn_backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {attn_backend!r}; choose one of {BACKENDS}")
        self.config = config
        self.attn_backend = attn_backend
        self.merge_kernel_size = (int(config.merge_kernel_size[0]), int(config.merge_kernel_size[1]))
        self.patch_embed = MoonVisionPatchEmbed(config)
        self.encoder = MoonVitEncoder(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.proj.weight.dtype

    def merge(self, x: torch.Tensor, grid_hws: torch.Tensor) -> torch.Tensor:
        """Patch merger: x (L, D) -> (L / (kh*kw), kh*kw, D), images in order."""
        return patch_merge(x, grid_hws, self.merge_kernel_size)

    def forward(self, pixel_values: torch.Tensor, image_grid_hws: torch.Tensor) -> torch.Tensor:
        """pixel_values: (L, 3, p, p), image_grid_hws: (N, 2) int (h, w) -> (L / 4, 4, D) for a 2x2 merge."""
        validate_vision_inputs(pixel_values, image_grid_hws, self.config)
        weight = self.patch_embed.proj.weight
        # processor outputs live on the CPU; the tower may not (a crash inside the convolution otherwise)
        pixel_values = pixel_values.to(device=weight.device, dtype=weight.dtype)
        grid = image_grid_hws.to(device=weight.device, dtype=torch.long)
        x = self.patch_embed(pixel_values, grid)
        x = self.encoder(x, grid, self.attn_backend)
        return self.merge(x, grid)


def validate_vision_inputs(pixel_values: torch.Tensor, image_grid_hws: torch.Tensor, config: MoonViTConfig) -> None:
    """Raise ``KimiVLInputError`` naming the numbers if the packed patches and grids do not fit the tower."""
    p = config.patch_size
    if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, p, p):
        raise KimiVLInputError(f"pixel_values must have shape (num_patches, 3, {p}, {p}); "
                               f"got {tuple(pixel_values.shape)}")
    if not pixel_values.is_floating_point():  # raw 0-255 patches would be cast and encoded as nonsense
        raise KimiVLInputError(f"pixel_values must be a float tensor (the processor's normalized patches); got dtype "
                               f"{pixel_values.dtype}")
    if image_grid_hws.ndim != 2 or image_grid_hws.shape[1] != 2:
        raise KimiVLInputError(f"image_grid_hws must have shape (num_images, 2); got {tuple(image_grid_hws.shape)}")
    if image_grid_hws.is_floating_point() or image_grid_hws.is_complex():
        raise KimiVLInputError(f"image_grid_hws must hold integers (h, w in patches); got dtype {image_grid_hws.dtype}")
    hws = image_grid_hws.tolist()
    kh, kw = config.merge_kernel_size
    limit = config.rope_max_grid
    for i, (h, w) in enumerate(hws):
        if h <= 0 or w <= 0:
            raise KimiVLInputError(f"image {i} has grid {h}x{w} patches; both sides must be positive")
        if h % kh or w % kw:
            raise KimiVLInputError(f"image {i} has grid {h}x{w} patches; the {kh}x{kw} patch merger needs "
                                   f"the height divisible by {kh} and the width by {kw}")
        if h >= limit or w >= limit:
            raise KimiVLInputError(f"image {i} has grid {h}x{w} patches; the 2-D RoPE allows fewer than {limit} "
                                   f"patches per side (lower in_token_limit)")
    total = sum(h * w for h, w in hws)
    if total != pixel_values.shape[0]:
        raise KimiVLInputError(f"image_grid_hws {hws} cover {total} patches but pixel_values has "
                               f"{pixel_values.shape[0]}")


__all__ = [
    "Learnable2DInterpPosEmb",
    "MLP2",
    "MoonVisionPatchEmbed",
    "MoonVitEncoder",
    "MoonVitEncoderLayer",
    "MoonVitPretrainedModel",
    "POS_EMB_CACHE_ROWS",
    "VISION_LAYER_NORM_EPS",
    "gelu_",
    "validate_vision_inputs",
]
