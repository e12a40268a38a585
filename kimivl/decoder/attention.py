"""Multi-head latent attention (MLA) of the DeepSeek-V3 decoder.

Spec: ``shared/reference/kimivl-spec.md`` §4 "MLA attention" items 1-6, §2 keys ``self_attn.*``, §9 items 3-4.
Official name: ``DeepseekV3Attention`` with ``q_proj`` (or ``q_a_proj`` / ``q_a_layernorm`` / ``q_b_proj`` when
``q_lora_rank`` is set), ``kv_a_proj_with_mqa``, ``kv_a_layernorm``, ``kv_b_proj``, ``o_proj``.

The forward is split along the lines of a compressed KV cache: :meth:`DeepseekV3Attention.latent` gives the
per-token quantities worth caching (normed latent ``c_kv`` and rotated single-head ``k_pe``),
:meth:`~DeepseekV3Attention.queries` the roped queries, and :meth:`~DeepseekV3Attention.attend` the
attention from (queries, latent, k_pe) by expanding the latent through ``kv_b_proj``.
With an :class:`~kimivl.decoder.cache.MLACache`, the new latents are written to the cache first; a
prefill (more than ``ABSORBED_MAX_QUERY_LEN`` new tokens) then uses the expanded ``attend`` over the cached
latents, and a decode step uses weight absorption (:func:`kimivl.ops.mla.absorbed_mla_attention`), which
never expands the cache to heads.
Deliberate deviations: torch SDPA with a boolean mask instead of the official eager/flash classes (the
softmax runs in fp32 for fp32 inputs either way); no rotary module or cached tables (cos/sin are passed in);
a latent cache instead of the official per-head one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kimivl.configuration import DeepseekV3Config
from kimivl.decoder.cache import MLACache
from kimivl.decoder.norm import DeepseekV3RMSNorm
from kimivl.ops.linear import Linear
from kimivl.ops.mla import absorbed_mla_attention, split_kv_b_weight
from kimivl.ops.rope import apply_rope, yarn_softmax_scale_factor

# The official code builds kv_a_layernorm / q_a_layernorm with the RMSNorm constructor default, not
# config.rms_norm_eps (spec §9 item 3).
LATENT_NORM_EPS = 1e-6

# Up to this many new tokens per forward, a cached forward scores the latent cache with absorbed weights
# (its cost is linear in the cache length with a small constant); longer prefills expand the latents once
# through kv_b_proj and use SDPA, which is cheaper when many queries share the expanded keys.
ABSORBED_MAX_QUERY_LEN = 16


class DeepseekV3Attention(nn.Module):
    """MLA: queries from x (optionally low-rank), keys/values from a shared ``kv_lora_rank`` latent."""

    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.qk_head_dim = config.qk_head_dim
        self.attention_dropout = config.attention_dropout
        self.softmax_scale = self.qk_head_dim ** -0.5 * yarn_softmax_scale_factor(config.rope_scaling)
        hidden, bias = config.hidden_size, config.attention_bias

        if self.q_lora_rank is None:
            self.q_proj = Linear(hidden, self.num_heads * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = Linear(hidden, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = DeepseekV3RMSNorm(self.q_lora_rank, eps=LATENT_NORM_EPS)
            self.q_b_proj = Linear(self.q_lora_rank, self.num_heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(hidden, self.kv_lora_rank + self.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = DeepseekV3RMSNorm(self.kv_lora_rank, eps=LATENT_NORM_EPS)
        self.kv_b_proj = Linear(
            self.kv_lora_rank, self.num_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False
        )
        self.o_proj = Linear(self.num_heads * self.v_head_dim, hidden, bias=bias)

    def latent(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token compressed KV: what a latent cache stores.

        x: (B, S, hidden); cos, sin: (B, S, rope). Returns ``c_kv`` (B, S, kv_lora_rank) after
        ``kv_a_layernorm`` and ``k_pe`` (B, S, rope) rotated, in de-interleaved channel order.
        """
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        k_pe = apply_rope(k_pe.unsqueeze(1), cos, sin).squeeze(1)  # one rope key head shared by all heads
        return self.kv_a_layernorm(c_kv), k_pe

    def queries(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: (B, S, hidden) -> q (B, H, S, qk_nope + rope) = [q_nope, rotated q_pe]."""
        return torch.cat(self.query_parts(x, cos, sin), dim=-1)

    def query_parts(self, x: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`queries` before the concatenation: ``q_nope`` (B, H, S, nope), rotated ``q_pe`` (B, H, S, rope)
        (the absorbed decode path uses them apart)."""
        b, s, _ = x.shape
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, s, self.num_heads, self.qk_head_dim).transpose(1, 2)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        return q_nope, apply_rope(q_pe, cos, sin)

    def attend(self, q: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
               attn_mask: torch.Tensor | None) -> torch.Tensor:
        """Attention of queries over a latent sequence, expanded through ``kv_b_proj``.

        q: (B, H, Sq, qk_head_dim); c_kv: (B, Sk, kv_lora_rank); k_pe: (B, Sk, rope);
        attn_mask: bool (B, 1, Sq, Sk), True = may attend, or None for plain causal (Sq == Sk).
        Returns (B, Sq, H * v_head_dim), before ``o_proj``.
        """
        b, sk, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv).view(b, sk, self.num_heads, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.transpose(1, 2).split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k_pe = k_pe.unsqueeze(1).expand(b, self.num_heads, sk, self.qk_rope_head_dim)
        k = torch.cat((k_nope, k_pe), dim=-1)
        if self.v_head_dim != q.shape[-1]:
            # SDPA's flash kernels need one head dim for q, k and v (192 / 192 / 128 here), else it takes the math
            # path and materialises (B, H, Sq, Sk) scores (17 GB at 16K tokens). Zero channels appended to v leave
            # the first v_head_dim output channels exactly as they were.
            v = F.pad(v, (0, q.shape[-1] - self.v_head_dim))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None, scale=self.softmax_scale,
            dropout_p=self.attention_dropout if self.training else 0.0,
        )[..., :self.v_head_dim]  # (B, H, Sq, v_head_dim)
        return out.transpose(1, 2).reshape(b, q.shape[2], self.num_heads * self.v_head_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: torch.Tensor | None = None, cache: MLACache | None = None,
                layer_idx: int = 0) -> torch.Tensor:
        """x: (B, S, hidden); cos, sin: (B, S, rope). Returns (B, S, hidden).

        Without ``cache``: ``attn_mask`` as in :meth:`attend`. With ``cache`` (holding ``P`` earlier tokens):
        the new latents are written to layer ``layer_idx`` of the cache; ``attn_mask`` is bool
        (B, 1, S, P + S) with query i at absolute position P + i, or None for plain causal attention.
        """
        c_kv, k_pe = self.latent(x, cos, sin)
        q_nope, q_pe = self.query_parts(x, cos, sin)
        if cache is None:
            return self.o_proj(self.attend(torch.cat((q_nope, q_pe), dim=-1), c_kv, k_pe, attn_mask))
        s = x.shape[1]
        kv = cache.update(layer_idx, c_kv, k_pe)  # (B, P + S, r + rope), includes the new tokens
        t = kv.shape[1]
        absorbed = s <= ABSORBED_MAX_QUERY_LEN
        if attn_mask is None and s > 1 and (absorbed or t > s):
            # None means plain causal, but SDPA's is_causal aligns the diagonal top-left and the absorbed
            # form reads None as "every key", so spell it out: query i sees keys 0 .. (t - s) + i.
            attn_mask = torch.ones(s, t, dtype=torch.bool, device=x.device).tril(t - s)[None, None]
        if absorbed:
            w_uk, w_uv = split_kv_b_weight(self.kv_b_proj.weight, self.num_heads, self.qk_nope_head_dim,
                                           self.v_head_dim)
            out = absorbed_mla_attention(q_nope, q_pe, kv, w_uk, w_uv, self.softmax_scale, attn_mask)
        else:
            kv = kv.to(q_nope.dtype)  # a float32 cache under bf16 weights (latent_cache_dtype): once per prefill
            c_all, pe_all = kv.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
            out = self.attend(torch.cat((q_nope, q_pe), dim=-1), c_all, pe_all, attn_mask)
        return self.o_proj(out)
