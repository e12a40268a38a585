"""MLA attention with weight absorption: queries attend to the compressed latent cache directly.

Spec: ``shared/reference/kimivl-spec.md`` §4 "MLA attention" items 3-6; cost model in
``shared/reference/performance-notes.md`` §2.3. With ``kv_b_proj.weight`` viewed as (H, nope + v, r) =
``[W_UK; W_UV]`` per head, a head's key is ``k_nope = W_UK c`` and its value ``v = W_UV c``, so

    q_nope . k_nope = (W_UK^T q_nope) . c        and        sum_t p_t v_t = W_UV (sum_t p_t c_t).

Folding ``W_UK`` into the query and ``W_UV`` into the output lets every head score the same (T, r + rope)
latent rows without expanding them to (H, T, nope + v) per step: the cost per new token is linear in T with
a constant of (r + rope) instead of r * H * (nope + v). The official code (and transformers) expand instead;
:meth:`kimivl.decoder.attention.DeepseekV3Attention.attend` is that expanded form, and the two agree up to
float rounding (tested in ``tests/generation/test_cache.py``).
"""
from __future__ import annotations

import torch

from kimivl.ops import cpu_kernels
from kimivl.ops.cpu_kernels import cpu_has_fast_bf16


def split_kv_b_weight(kv_b_weight: torch.Tensor, num_heads: int, qk_nope_head_dim: int,
                      v_head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``kv_b_proj.weight`` (H * (nope + v), r) -> ``W_UK`` (H, nope, r), ``W_UV`` (H, v, r) (views)."""
    w = kv_b_weight.view(num_heads, qk_nope_head_dim + v_head_dim, kv_b_weight.shape[-1])
    return w[:, :qk_nope_head_dim], w[:, qk_nope_head_dim:]


def absorbed_mla_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, w_uk: torch.Tensor,
                           w_uv: torch.Tensor, softmax_scale: float,
                           attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of H query heads over a shared latent sequence, without expanding it to heads.

    q_nope: (B, H, S, nope); q_pe: (B, H, S, rope), rotated (same channel order as the cached ``k_pe``).
    kv: (B, T, r + rope) = ``[c_kv | k_pe]`` per key (e.g. an :class:`~kimivl.decoder.cache.MLACache` view).
    w_uk: (H, nope, r); w_uv: (H, v, r) from :func:`split_kv_b_weight`.
    attn_mask: bool (B, 1, S, T), True = may attend, or None = every key visible to every query.
    Returns (B, S, H * v), the input of ``o_proj``. Softmax in float32, as the reference does.

    On the CPU a single new token per sequence (a decode step, no autograd) goes through the fused C++
    kernel ``mla_decode`` of :mod:`kimivl.ops.cpu_kernels`: one pass over the cache in L2-sized chunks for
    all heads, bf16 cache rows and W_UK / W_UV widened in registers instead of converted whole every step
    (docs/performance.md); for a bf16 model on a CPU with AMX, or where vdpbf16ps outruns float32 FMAs
    (AVX512-BF16 without AMX: :func:`~kimivl.ops.cpu_kernels.mla_decode_form`), its products are bf16 products
    on the rows in place (AMX tiles or vdpbf16ps), the queries and probabilities rounded to bf16 as the bf16
    prefill rounds them. bf16 weights
    build the extension on first use, as their linear layers do; float32 weights use it only once it is built
    (``python -m kimivl.ops.cpu_kernels``), so a small float32 model never pauses a minute to compile.
    Otherwise the PyTorch products below.
    """
    fused = _fused_cpu_decode(q_nope, q_pe, kv, w_uk, w_uv, softmax_scale, attn_mask)
    if fused is not None:
        return fused
    if kv.device.type == "cpu" and torch.bfloat16 in (kv.dtype, q_nope.dtype) and not cpu_has_fast_bf16():
        # No bf16 matmul path on this CPU (~10x slower than float32): the same products in float32. A bf16
        # cache costs one conversion pass over it per step; generate() gives such a CPU a float32 cache
        # (kimivl.decoder.cache.latent_cache_dtype), for which .float() is free.
        return absorbed_mla_attention(q_nope.float(), q_pe.float(), kv.float(), w_uk.float(), w_uv.float(),
                                      softmax_scale, attn_mask).to(q_nope.dtype)
    kv = kv.to(q_nope.dtype)  # a cache kept in another dtype than the weights: compute in the weights' dtype
    b, h, s, nope = q_nope.shape
    r = w_uk.shape[-1]
    t = kv.shape[1]
    # q_lat = q_nope W_UK, as one (H, B*S, nope) @ (H, nope, r) product so each head's W_UK is read once.
    q_heads = q_nope.transpose(0, 1).reshape(h, b * s, nope)
    q_lat = torch.matmul(q_heads, w_uk).view(h, b, s, r).transpose(0, 1)  # (B, H, S, r)
    # Heads become query rows: (B, H*S, r + rope) against the (B, T, r + rope) latent keys. The scale is
    # applied to the queries (H*S rows) rather than to the (H*S, T) scores.
    q = torch.cat((q_lat, q_pe), dim=-1).reshape(b, h * s, r + q_pe.shape[-1]) * softmax_scale
    scores = torch.matmul(q, kv.transpose(1, 2)).view(b, h, s, t).float()  # (B, H, S, T)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    probs = scores.softmax(dim=-1).to(kv.dtype).view(b, h * s, t)
    out_lat = torch.matmul(probs, kv[..., :r])  # (B, H*S, r): probability-weighted latents
    # out = out_lat W_UV^T per head, again as one batched product over heads.
    out_lat = out_lat.view(b, h, s, r).transpose(0, 1).reshape(h, b * s, r)
    out = torch.matmul(out_lat, w_uv.transpose(1, 2))  # (H, B*S, v)
    return out.view(h, b, s, -1).permute(1, 2, 0, 3).reshape(b, s, -1)


def _fused_cpu_decode(q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, w_uk: torch.Tensor,
                      w_uv: torch.Tensor, softmax_scale: float, attn_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The C++ decode step for (B, H, 1, .) queries on the CPU, or None where it does not apply."""
    b, h, s, _ = q_nope.shape
    t = kv.shape[1]
    if s != 1 or kv.device.type != "cpu" or kv.stride(-1) != 1:
        return None
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q_nope, q_pe, kv, w_uk, w_uv)):
        return None
    dtypes = cpu_kernels.KERNEL_DTYPES
    if kv.dtype not in dtypes or w_uk.dtype not in dtypes or w_uv.dtype != w_uk.dtype:
        return None
    valid = None
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool or tuple(attn_mask.shape) != (b, 1, 1, t):
            return None
        valid = attn_mask.view(b, t)
    ext = cpu_kernels.kernels(build=w_uk.dtype == torch.bfloat16)
    if ext is None:
        return None
    if q_nope.dtype not in dtypes or q_pe.dtype != q_nope.dtype:
        return None
    out = ext.mla_decode(q_nope[:, :, 0], q_pe[:, :, 0], kv, w_uk, w_uv, float(softmax_scale), valid,
                         cpu_kernels.mla_decode_form(ext))  # answered in q's dtype
    return out.view(b, 1, h * w_uv.shape[1])
