"""1-D rotary position embedding for MLA (the decoder's ``q_pe`` / ``k_pe`` channels), with YaRN.

Spec: ``shared/reference/kimivl-spec.md`` §4 items 4 and 6, §9 item 4. Official names:
``DeepseekV3RotaryEmbedding`` / ``DeepseekV3YarnRotaryEmbedding`` and ``apply_rotary_pos_emb`` of the
DeepSeek-V3 remote code used by Kimi-VL.

The checkpoint stores rope channels as interleaved pairs: pair ``(2i, 2i+1)`` rotates as a complex number
by ``pos * theta^(-2i/dim)``. Like the official code, :func:`apply_rope` first de-interleaves (even
channels, then odd ones) and then applies rotate-half, so its output is in the de-interleaved order. Scores
do not depend on that order (q and k get the same permutation), but a KV cache of rotated ``k_pe`` does.

Deliberate deviations: no cached cos/sin tables and no module state (only the few inverse frequencies
are cached per configuration); tables are computed from ``position_ids`` (once per forward, by the
caller) instead of being indexed from a precomputed ``max_position_embeddings`` table, which gives the
same fp32 values (``pos * inv_freq`` is one fp32 product either way). A decode step's few rows on the CPU
are rotated by the C++ kernel ``rope_rotate`` (same maths and roundings, one call).
"""
from __future__ import annotations

import functools
import math
from typing import Any

import torch

from kimivl.ops import cpu_kernels
from kimivl.ops.linear import SMALL_M


def _yarn_get_mscale(scale: float, mscale: float) -> float:
    """YaRN attention temperature ``0.1 * mscale * ln(scale) + 1`` (1 when not extending)."""
    if scale <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _yarn_correction_dim(num_rotations: float, dim: int, theta: float, max_position: int) -> float:
    """Rope channel-pair index at which the wavelength makes ``num_rotations`` turns over ``max_position``."""
    return (dim * math.log(max_position / (num_rotations * 2 * math.pi))) / (2 * math.log(theta))


def _is_yarn(rope_scaling: dict[str, Any] | None) -> bool:
    if not rope_scaling:
        return False
    return rope_scaling.get("type", rope_scaling.get("rope_type")) == "yarn"


def rope_inv_freq(dim: int, theta: float, rope_scaling: dict[str, Any] | None = None,
                  device: torch.device | str | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies of the ``dim // 2`` channel pairs and the cos/sin magnitude.

    Returns ``(inv_freq (dim/2,) float32, cos_sin_scale)``. Without YaRN the scale is 1.0.
    With ``rope_scaling = {"type": "yarn", ...}`` (DeepSeek-V3 keys ``factor``,
    ``original_max_position_embeddings`` (default 4096), ``beta_fast`` (32), ``beta_slow`` (1),
    ``mscale`` (1), ``mscale_all_dim`` (0)) the high-frequency pairs keep their frequency, the
    low-frequency pairs are divided by ``factor``, with a linear ramp between the correction
    dimensions, and cos/sin are scaled by ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)``.
    """
    if dim % 2 != 0:
        raise ValueError(f"rope dim must be even, got {dim}")
    exponent = torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim
    inv_freq = 1.0 / (theta ** exponent)
    if not _is_yarn(rope_scaling):
        return inv_freq, 1.0
    assert rope_scaling is not None
    factor = float(rope_scaling["factor"])
    original_max = int(rope_scaling.get("original_max_position_embeddings", 4096))
    beta_fast = float(rope_scaling.get("beta_fast", 32))
    beta_slow = float(rope_scaling.get("beta_slow", 1))
    mscale = float(rope_scaling.get("mscale", 1))
    mscale_all_dim = float(rope_scaling.get("mscale_all_dim", 0))

    low = max(math.floor(_yarn_correction_dim(beta_fast, dim, theta, original_max)), 0)
    high = min(math.ceil(_yarn_correction_dim(beta_slow, dim, theta, original_max)), dim - 1)
    if low == high:
        high += 0.001  # the official guard against a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    keep = 1.0 - ramp  # 1 = keep the original (extrapolated) frequency, 0 = interpolate by `factor`
    inv_freq = (inv_freq / factor) * (1.0 - keep) + inv_freq * keep
    cos_sin_scale = _yarn_get_mscale(factor, mscale) / _yarn_get_mscale(factor, mscale_all_dim)
    return inv_freq, cos_sin_scale


def yarn_softmax_scale_factor(rope_scaling: dict[str, Any] | None) -> float:
    """Multiplier of the MLA softmax scale ``qk_head_dim ** -0.5`` (spec §4 item 6).

    ``mscale(factor, mscale_all_dim) ** 2`` when ``rope_scaling`` has a ``factor`` and a non-zero
    ``mscale_all_dim``; 1.0 otherwise (Kimi-VL: ``rope_scaling = null``).
    """
    if not rope_scaling or "factor" not in rope_scaling:
        return 1.0
    mscale_all_dim = float(rope_scaling.get("mscale_all_dim", 0) or 0)
    if not mscale_all_dim:
        return 1.0
    m = _yarn_get_mscale(float(rope_scaling["factor"]), mscale_all_dim)
    return m * m


def rope_cos_sin(position_ids: torch.Tensor, dim: int, theta: float,
                 rope_scaling: dict[str, Any] | None = None,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for the given positions, in rotate-half layout.

    position_ids: (B, S) integer. Returns ``cos, sin``: (B, S, dim) in ``dtype``, where channel ``j`` and
    ``j + dim/2`` both carry pair ``j``'s angle ``pos * inv_freq[j]``. Computed in float32, then cast.
    """
    inv_freq, scale = cached_inv_freq(dim, theta, rope_scaling, position_ids.device)
    freqs = position_ids.to(torch.float32).unsqueeze(-1) * inv_freq  # (B, S, dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos.to(dtype), sin.to(dtype)


def cached_inv_freq(dim: int, theta: float, rope_scaling: dict[str, Any] | None,
                    device: torch.device | str) -> tuple[torch.Tensor, float]:
    """:func:`rope_inv_freq`, computed once per (dim, theta, scaling, device): every forward of the decoder
    asks for it, and a decode step would otherwise spend ~6 tensor ops rebuilding the same few numbers."""
    try:
        key = tuple(sorted(rope_scaling.items())) if rope_scaling else None
        hash(key)
    except TypeError:  # unhashable values in an unusual rope_scaling: compute it every time
        return rope_inv_freq(dim, theta, rope_scaling, device=device)
    return _cached_inv_freq(dim, float(theta), key, str(device))


@functools.lru_cache(maxsize=32)
def _cached_inv_freq(dim: int, theta: float, key: tuple | None, device: str) -> tuple[torch.Tensor, float]:
    with torch.inference_mode(False):  # a normal tensor, usable in and out of inference mode
        return rope_inv_freq(dim, theta, dict(key) if key else None, device=device)


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """(..., D) interleaved pairs -> (..., D) with channels 0, 2, 4, ... then 1, 3, 5, ..."""
    *lead, d = x.shape
    return x.reshape(*lead, d // 2, 2).transpose(-1, -2).reshape(*lead, d)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved-pair rope channels; output is in the de-interleaved (rotate-half) order.

    x: (B, H, S, D) with the checkpoint's interleaved channel order. cos, sin: (B, S, D) from
    :func:`rope_cos_sin`. Returns (B, H, S, D): ``[x_even, x_odd] * cos + [-x_odd, x_even] * sin``.
    """
    if _kernel_applies(x, cos, sin):
        ext = cpu_kernels.kernels(build=x.dtype == torch.bfloat16)
        if ext is not None:
            return ext.rope_rotate(x, cos, sin)
    x = deinterleave(x)
    cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)  # broadcast over heads
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _kernel_applies(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether :func:`apply_rope` may take the C++ ``rope_rotate`` of :mod:`kimivl.ops.cpu_kernels` (same maths
    and roundings in one call instead of ~12 tensor ops): a decode step's few rows on the CPU, no autograd."""
    return (x.dim() == 4 and cos.dtype == sin.dtype == x.dtype
            and cos.shape == sin.shape == (x.shape[0], *x.shape[2:])
            and cpu_kernels.inference_rows(x, x.shape[0] * x.shape[2], SMALL_M, cos, sin))
