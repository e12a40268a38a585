"""2-D rotary position embedding of the MoonViT vision tower, as real cos/sin arithmetic.

Spec: ``shared/reference/kimivl-spec.md`` §3.6. Official names: ``Rope2DPosEmb`` and ``apply_rope``.
Channels (2j, 2j+1) of a head form complex pair j. With f_i = theta^(-4i/Dh), i = 0..Dh/4-1,
pair 2i rotates by col * f_i and pair 2i+1 by row * f_i (width on even pairs: the official code
and the golden data do this; the upstream docstring says the opposite).
Deliberate deviations: no complex dtypes and no cached 512x512 table; cos/sin are computed from the
patch positions (the caller computes them once per forward and shares them across layers). The
rotation is ``x * C + swap_pairs(x) * S`` with per-channel factors C = (c, c), S = (-s, s) per pair:
one multiply, one pair swap and one fused multiply-add over q and k together, instead of splitting
real/imaginary parts and stacking them back.
"""
from __future__ import annotations

import torch

from kimivl.ops import cpu_kernels

VISION_ROPE_THETA: float = 10000.0


def rope_2d_frequencies(head_dim: int, theta: float = VISION_ROPE_THETA,
                        device: torch.device | None = None) -> torch.Tensor:
    """f_i = theta^(-4i/Dh) for i = 0..Dh/4-1: (Dh/4,) float32."""
    if head_dim % 4 != 0:
        raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got {head_dim}")
    # Same expression order as the reference (1 / theta**(4i/Dh) in float32) for bitwise-close angles.
    exponent = torch.arange(0, head_dim, 4, device=device, dtype=torch.float32) / head_dim
    return 1.0 / (theta ** exponent)


def rope_2d_cos_sin(rows: torch.Tensor, cols: torch.Tensor, head_dim: int,
                    theta: float = VISION_ROPE_THETA) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotation of every complex pair for patches at (rows, cols).

    rows, cols: (L,) integer positions inside each image -> cos, sin: (L, Dh/2) float32, where
    column 2i holds angle cols * f_i and column 2i+1 holds rows * f_i.
    """
    freqs = rope_2d_frequencies(head_dim, theta, device=rows.device)  # (Dh/4,)
    col_angle = cols.to(torch.float32)[:, None] * freqs
    row_angle = rows.to(torch.float32)[:, None] * freqs
    angle = torch.stack([col_angle, row_angle], dim=-1).flatten(1)  # (L, Dh/2): pairs w0, h0, w1, h1, ...
    return torch.cos(angle), torch.sin(angle)


def rope_2d_rotation(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel rotation factors from per-pair cos/sin.

    cos, sin: (L, Dh/2) -> C, S: (L, Dh) float32 with C = (c_j, c_j) and S = (-s_j, s_j) on channels
    (2j, 2j+1), so that ``rotate_pairs(x, C, S)`` is the complex multiply (re + i im)(c + i s).
    """
    c = cos.to(torch.float32)
    s = sin.to(torch.float32)
    return (torch.stack([c, c], dim=-1).flatten(-2), torch.stack([-s, s], dim=-1).flatten(-2))


def rotate_pairs(x: torch.Tensor, rot_cos: torch.Tensor, rot_sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs: x (L, ..., Dh), rot_cos/rot_sin (L, Dh) from ``rope_2d_rotation``.

    Returns a contiguous (L, ..., Dh) tensor in x's dtype, computed in float32 (as the reference's
    complex multiply is; float64 input stays float64) and cast back. x may be a strided view (e.g.
    the q and k parts of a fused qkv projection); it is read, never written.
    """
    fused = _rotate_pairs_kernel(x, rot_cos, rot_sin)
    if fused is not None:
        return fused
    shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],)  # broadcast over heads etc.
    c, s = rot_cos.view(shape), rot_sin.view(shape)
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (re, im) -> (im, re)
    out = xf * c
    out.addcmul_(swapped, s)
    return out.to(x.dtype)


def _rotate_pairs_kernel(x: torch.Tensor, rot_cos: torch.Tensor, rot_sin: torch.Tensor) -> torch.Tensor | None:
    """:func:`rotate_pairs` in one pass of the C++ extension (same roundings, bit-identical), or None where it
    does not apply: off the CPU, other dtypes, autograd through any input, or the extension not built yet (it
    is built by the decoder's bf16 paths or ``python -m kimivl.ops.cpu_kernels``, not here). The
    PyTorch form makes six passes over q and k (14 % of a bf16 MoonViT forward on a 2-core CPU)."""
    if (x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or x.ndim < 3
            or rot_cos.dtype != torch.float32 or rot_sin.dtype != torch.float32 or x.shape[-1] % 2
            or (torch.is_grad_enabled() and any(t.requires_grad for t in (x, rot_cos, rot_sin)))):
        return None
    ext = cpu_kernels.kernels(build=False)  # never pause a vision forward (a float32 model's too) to compile
    if ext is None:
        return None
    rows = x.flatten(1, -2) if x.ndim > 3 else x  # (L, G, Dh): a view for qkv[:, :2], else a copy
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    return ext.rope_pairs(rows, rot_cos, rot_sin).view(x.shape)


def apply_rope_2d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs: x (L, H, Dh), cos/sin (L, Dh/2) -> (L, H, Dh) in x's dtype.

    Computed in float32 (as the reference's complex multiply is; float64 stays float64) and cast back.
    """
    return rotate_pairs(x, *rope_2d_rotation(cos, sin))
