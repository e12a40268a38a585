"""A long uncached prefill never materialises (B, H, S, S) attention scores.

MLA's query/key head dim (nope + rope) differs from the value head dim; SDPA's flash kernels need one head
dim, so the decoder appends zero channels to v. Without that a 16K-token prefill of the real width built
17 GB of scores and was OOM-killed (docs/performance.md).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kimivl.configuration import DeepseekV3Config
from kimivl.decoder.attention import DeepseekV3Attention
from kimivl.ops.rope import rope_cos_sin
from tensor_recorder import TensorRecorder


def _attention() -> tuple[DeepseekV3Attention, DeepseekV3Config]:
    cfg = DeepseekV3Config(hidden_size=64, num_attention_heads=2, kv_lora_rank=32, q_lora_rank=None,
                           qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12)
    torch.manual_seed(0)
    attn = DeepseekV3Attention(cfg).eval()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return attn, cfg


def test_uncached_prefill_builds_no_seq_by_seq_tensor_and_matches_the_unpadded_maths():
    attn, cfg = _attention()
    s = 300
    x = torch.randn(1, s, cfg.hidden_size)
    cos, sin = rope_cos_sin(torch.arange(s)[None], cfg.qk_rope_head_dim, cfg.rope_theta, None, dtype=x.dtype)
    with torch.no_grad():
        rec = TensorRecorder()
        with rec:
            out = attn(x, cos, sin)
        assert not [sh for sh in rec.shapes if len(sh) >= 2 and sh[-1] == s and sh[-2] == s], \
            "a (S, S) attention tensor was materialised"
        # reference: the same queries / keys / values, unpadded v, explicit float64 softmax
        c_kv, k_pe = attn.latent(x, cos, sin)
        q = attn.queries(x, cos, sin)
        kv = attn.kv_b_proj(c_kv).view(1, s, 2, 16 + 12).transpose(1, 2)
        k_nope, v = kv.split([16, 12], dim=-1)
        k = torch.cat((k_nope, k_pe.unsqueeze(1).expand(1, 2, s, 8)), dim=-1)
        scores = (q.double() @ k.double().transpose(-1, -2)) * attn.softmax_scale
        scores = scores.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
        ref = (scores.softmax(-1) @ v.double()).transpose(1, 2).reshape(1, s, 24)
        ref = F.linear(ref, attn.o_proj.weight.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
