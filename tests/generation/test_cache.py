"""MLA latent cache: storage protocol, absorbed == expanded attention, cached decode == full recompute."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kimivl.configuration import KimiVLConfig
from kimivl.decoder import DeepseekV3Attention, DeepseekV3ForCausalLM, MLACache
from kimivl.decoder.model import causal_padding_mask
from kimivl.errors import KimiVLInputError
from kimivl.modeling import KimiVLForConditionalGeneration
from kimivl.ops.mla import absorbed_mla_attention, split_kv_b_weight
from kimivl.ops.rope import rope_cos_sin

ABSORB_ATOL = 1e-5  # fp32, same latents: absorbed vs expanded differ only by summation order
CACHE_ATOL = CACHE_RTOL = 2e-5  # fp32 logits, cached vs uncached (the official code moves by 2e-6)


@pytest.fixture(scope="module")
def lm(model: KimiVLForConditionalGeneration) -> DeepseekV3ForCausalLM:
    return model.language_model


# --- the cache object ------------------------------------------------------------------------------------

def test_update_writes_at_length_and_returns_history() -> None:
    cache = MLACache(num_layers=2, batch_size=3, max_len=10, kv_lora_rank=4, qk_rope_head_dim=2)
    c1, p1 = torch.randn(3, 6, 4), torch.randn(3, 6, 2)
    for layer in range(2):
        view = cache.update(layer, c1 + layer, p1)
        assert view.shape == (3, 6, 6)
    cache.advance(6)
    c2, p2 = torch.randn(3, 1, 4), torch.randn(3, 1, 2)
    view = cache.update(1, c2, p2)
    torch.testing.assert_close(view, torch.cat((torch.cat((c1 + 1, p1), -1), torch.cat((c2, p2), -1)), 1),
                               rtol=0, atol=0)
    assert view.data_ptr() == cache.data[1].data_ptr()  # a view of the preallocated storage, no copy
    assert cache.length == 6  # only advance() moves it
    cache.advance(1)
    assert cache.length == 7


def test_bytes_per_token_is_the_latent_size() -> None:
    cache = MLACache(27, 1, 4, kv_lora_rank=512, qk_rope_head_dim=64, dtype=torch.bfloat16)
    assert cache.bytes_per_token() == 31104  # spec: (512 + 64) * 27 layers * 2 bytes
    assert cache.data.dtype == torch.bfloat16 and cache.data.shape == (27, 1, 4, 576)


def test_overflow_and_batch_errors_name_the_numbers() -> None:
    cache = MLACache(1, 2, 5, kv_lora_rank=4, qk_rope_head_dim=2)
    cache.update(0, torch.zeros(2, 4, 4), torch.zeros(2, 4, 2))
    cache.advance(4)
    with pytest.raises(KimiVLInputError, match=r"holds 4 of max_len=5 tokens and cannot take 2 more \(6 > 5\)"):
        cache.update(0, torch.zeros(2, 2, 4), torch.zeros(2, 2, 2))
    with pytest.raises(KimiVLInputError, match="batch size 2, got 3 rows"):
        cache.update(0, torch.zeros(3, 1, 4), torch.zeros(3, 1, 2))
    with pytest.raises(KimiVLInputError, match="max_len must be positive, got 0"):
        MLACache(1, 1, 0, kv_lora_rank=4, qk_rope_head_dim=2)


def test_model_rejects_a_full_cache_before_writing(lm: DeepseekV3ForCausalLM) -> None:
    cache = MLACache.from_config(lm.config, 1, 4)
    with pytest.raises(KimiVLInputError, match=r"cannot take 5 more \(5 > 4\)"):
        lm(input_ids=torch.arange(5)[None], cache=cache)
    assert cache.length == 0 and not cache.data.any()


def test_generalised_mask_reduces_to_the_square_one() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    full = causal_padding_mask(mask)
    torch.testing.assert_close(causal_padding_mask(mask, past_length=3), full[:, :, 3:], rtol=0, atol=0)


# --- absorbed == expanded --------------------------------------------------------------------------------

def _random_attention(golden_dir: Path, seed: int) -> DeepseekV3Attention:
    torch.manual_seed(seed)
    attn = DeepseekV3Attention(KimiVLConfig.from_json_file(golden_dir / "config.json").text_config).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0.0, p.shape[-1] ** -0.5 if p.dim() == 2 else 0.1)
    return attn


@pytest.mark.parametrize("s", [1, 3])
def test_absorbed_equals_expanded_on_random_latents(golden_dir: Path, s: int) -> None:
    attn = _random_attention(golden_dir, seed=5)
    g = torch.Generator().manual_seed(11)
    b, t, h = 2, 9, attn.num_heads
    q = torch.randn(b, h, s, attn.qk_head_dim, generator=g)
    c_kv = torch.randn(b, t, attn.kv_lora_rank, generator=g)
    k_pe = torch.randn(b, t, attn.qk_rope_head_dim, generator=g)
    padding = torch.ones(b, t, dtype=torch.long)
    padding[1, :4] = 0  # row 1 left padded
    mask = causal_padding_mask(padding, past_length=t - s)

    expanded = attn.attend(q, c_kv, k_pe, mask)
    w_uk, w_uv = split_kv_b_weight(attn.kv_b_proj.weight, h, attn.qk_nope_head_dim, attn.v_head_dim)
    q_nope, q_pe = q.split([attn.qk_nope_head_dim, attn.qk_rope_head_dim], dim=-1)
    absorbed = absorbed_mla_attention(q_nope, q_pe, torch.cat((c_kv, k_pe), -1), w_uk, w_uv,
                                      attn.softmax_scale, mask)
    assert absorbed.shape == expanded.shape == (b, s, h * attn.v_head_dim)
    torch.testing.assert_close(absorbed, expanded, rtol=0, atol=ABSORB_ATOL)


def test_absorbed_without_mask_sees_every_key(golden_dir: Path) -> None:
    attn = _random_attention(golden_dir, seed=6)
    g = torch.Generator().manual_seed(12)
    q = torch.randn(1, attn.num_heads, 1, attn.qk_head_dim, generator=g)
    c_kv = torch.randn(1, 7, attn.kv_lora_rank, generator=g)
    k_pe = torch.randn(1, 7, attn.qk_rope_head_dim, generator=g)
    w_uk, w_uv = split_kv_b_weight(attn.kv_b_proj.weight, attn.num_heads, attn.qk_nope_head_dim, attn.v_head_dim)
    q_nope, q_pe = q.split([attn.qk_nope_head_dim, attn.qk_rope_head_dim], dim=-1)
    absorbed = absorbed_mla_attention(q_nope, q_pe, torch.cat((c_kv, k_pe), -1), w_uk, w_uv, attn.softmax_scale)
    all_keys = torch.ones(1, 1, 1, 7, dtype=torch.bool)
    torch.testing.assert_close(absorbed, attn.attend(q, c_kv, k_pe, all_keys), rtol=0, atol=ABSORB_ATOL)


def test_cache_stores_the_latent_of_the_uncached_path(golden_dir: Path) -> None:
    attn = _random_attention(golden_dir, seed=7)
    x = torch.randn(2, 5, 64)
    cos, sin = rope_cos_sin(torch.arange(5)[None].expand(2, 5), attn.qk_rope_head_dim, 800000.0)
    cache = MLACache(1, 2, 5, attn.kv_lora_rank, attn.qk_rope_head_dim)
    with torch.no_grad():
        out = attn(x, cos, sin, cache=cache)
        c_kv, k_pe = attn.latent(x, cos, sin)
        torch.testing.assert_close(out, attn(x, cos, sin), rtol=0, atol=ABSORB_ATOL)
    torch.testing.assert_close(cache.data[0], torch.cat((c_kv, k_pe), -1), rtol=0, atol=0)


# --- cached decode == uncached recompute (golden model) --------------------------------------------------

@torch.no_grad()
def test_cached_decode_logits_equal_full_recompute(model: KimiVLForConditionalGeneration,
                                                    golden: dict[str, torch.Tensor]) -> None:
    lm = model.language_model
    embeds = model.embed_inputs(golden["prompt.input_ids"], golden["prompt.pixel_values"],
                                golden["prompt.image_grid_hws"])
    cache = MLACache.from_config(lm.config, 1, 70)
    logits = lm(inputs_embeds=embeds, cache=cache).logits
    torch.testing.assert_close(logits, golden["prompt.logits"], rtol=1e-4, atol=1e-4)
    for _ in range(8):
        token = logits[:, -1].argmax(-1, keepdim=True)
        embeds = torch.cat((embeds, lm.model.embed_tokens(token)), dim=1)
        logits = lm(input_ids=token, cache=cache).logits
        full = lm(inputs_embeds=embeds).logits[:, -1:]
        torch.testing.assert_close(logits, full, rtol=CACHE_RTOL, atol=CACHE_ATOL)
    assert cache.length == embeds.shape[1]


@torch.no_grad()
@pytest.mark.parametrize("chunks", [(35,), (20, 15), (30, 5), (3, 30, 2)])
def test_chunked_prefill_with_left_padding_equals_one_forward(lm: DeepseekV3ForCausalLM,
                                                              golden: dict[str, torch.Tensor],
                                                              chunks: tuple[int, ...]) -> None:
    """Chunks longer than the absorption threshold use the expanded path, short ones the absorbed one."""
    ids = golden["text_only.input_ids"]
    batch = torch.stack((ids[0], torch.cat((torch.full((7,), 997), ids[0, 7:]))))
    mask = torch.ones_like(batch)
    mask[1, :7] = 0
    full = lm(input_ids=batch, attention_mask=mask).logits
    cache = MLACache.from_config(lm.config, 2, 35)
    start, outs = 0, []
    for n in chunks:
        outs.append(lm(input_ids=batch[:, start:start + n], attention_mask=mask[:, :start + n], cache=cache).logits)
        start += n
    cached = torch.cat(outs, dim=1)
    torch.testing.assert_close(cached[0], full[0], rtol=CACHE_RTOL, atol=CACHE_ATOL)
    torch.testing.assert_close(cached[1, 7:], full[1, 7:], rtol=CACHE_RTOL, atol=CACHE_ATOL)
    torch.testing.assert_close(cached[0], golden["text_only.logits"][0], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_chunks_without_a_mask_are_causal(lm: DeepseekV3ForCausalLM, golden: dict[str, torch.Tensor]) -> None:
    ids = golden["text_only.input_ids"]
    cache = MLACache.from_config(lm.config, 1, 35)
    parts = [lm(input_ids=ids[:, a:b], cache=cache).logits for a, b in ((0, 4), (4, 30), (30, 35))]
    torch.testing.assert_close(torch.cat(parts, 1), golden["text_only.logits"], rtol=1e-4, atol=1e-4)


def test_cached_mask_shape_error(lm: DeepseekV3ForCausalLM) -> None:
    cache = MLACache.from_config(lm.config, 1, 10)
    with torch.no_grad():
        lm(input_ids=torch.tensor([[1, 2, 3]]), cache=cache)
    with pytest.raises(KimiVLInputError, match=r"shape \(1, 4\) \(3 cached \+ 1 new tokens\), got \(1, 1\)"):
        lm(input_ids=torch.tensor([[4]]), attention_mask=torch.ones(1, 1), cache=cache)


# --- the cache dtype for bf16 weights ------------------------------------------------------------------

def test_latent_cache_dtype_is_float32_only_for_bf16_on_a_cpu_without_bf16_matmul(monkeypatch) -> None:
    from kimivl.decoder import cache as cache_mod
    from kimivl.ops import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "cpu_has_fast_bf16", lambda: False)
    assert cache_mod.latent_cache_dtype(torch.bfloat16, "cpu") == torch.float32
    assert cache_mod.latent_cache_dtype(torch.bfloat16, None) == torch.float32
    assert cache_mod.latent_cache_dtype(torch.float32, "cpu") == torch.float32
    assert cache_mod.latent_cache_dtype(torch.bfloat16, "cuda") == torch.bfloat16
    assert cache_mod.latent_cache_dtype(torch.float16, "cpu") == torch.float16
    monkeypatch.setattr(cpu_kernels, "cpu_has_fast_bf16", lambda: True)
    assert cache_mod.latent_cache_dtype(torch.bfloat16, "cpu") == torch.bfloat16


@torch.no_grad()
@pytest.mark.parametrize("prefill", [30, 3])  # expanded prefill over the cache / absorbed only
def test_bf16_weights_with_a_float32_cache_match_the_uncached_bf16_forward(model: KimiVLForConditionalGeneration,
                                                                          golden: dict[str, torch.Tensor],
                                                                          prefill: int) -> None:
    """The float32 cache generate() gives bf16 weights on such CPUs: both attention paths accept it, and the
    cached logits equal the uncached bf16 forward's up to bf16 rounding (the cache itself rounds less)."""
    import copy

    lm = copy.deepcopy(model.language_model).to(torch.bfloat16)
    ids = golden["text_only.input_ids"][:, :prefill + 4]
    cache = MLACache.from_config(lm.config, 1, ids.shape[1], dtype=torch.float32)
    logits = [lm(input_ids=ids[:, :prefill], cache=cache).logits[:, -1]]
    for i in range(prefill, ids.shape[1] - 1):
        logits.append(lm(input_ids=ids[:, i:i + 1], cache=cache).logits[:, -1])
    full = lm(input_ids=ids[:, :-1]).logits[0, prefill - 1:]
    assert cache.data.dtype == torch.float32 and cache.length == ids.shape[1] - 1
    scale = full.float().abs().max()
    assert (torch.cat(logits).float() - full.float()).abs().max() <= 0.05 * scale


@torch.no_grad()
def test_prefill_of_the_last_position_caches_every_token_and_gives_its_logits(
        model: KimiVLForConditionalGeneration, golden: dict[str, torch.Tensor]) -> None:
    """``last_positions=1`` (generate's prefill): the last layer's attention still caches all tokens, only the last
    position goes through its MLP; the next-token logits and the cache are those of the whole forward."""
    from kimivl.generation.generate import prefill

    ids, lm = golden["text_only.input_ids"], model.language_model
    batch = torch.stack((ids[0], torch.cat((torch.full((7,), 997), ids[0, 7:]))))
    mask = torch.ones_like(batch)
    mask[1, :7] = 0
    whole, last = MLACache.from_config(lm.config, 2, 40), MLACache.from_config(lm.config, 2, 40)
    full = lm(input_ids=batch, attention_mask=mask, cache=whole).logits
    out = lm.model(input_ids=batch, attention_mask=mask, cache=last, last_positions=1)
    assert out.last_hidden_state.shape == (2, 1, lm.config.hidden_size)
    assert last.length == whole.length == 35
    torch.testing.assert_close(last.data, whole.data, rtol=0, atol=0)  # the same latents, every layer
    torch.testing.assert_close(lm.lm_head(out.last_hidden_state[:, 0]), full[:, -1], rtol=CACHE_RTOL, atol=CACHE_ATOL)
    seen = []  # rows the last layer's MLP gets in generate's prefill
    hook = lm.model.layers[-1].mlp.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    try:
        logits = prefill(model, golden["prompt.input_ids"], MLACache.from_config(lm.config, 1, 80),
                         pixel_values=golden["prompt.pixel_values"], image_grid_hws=golden["prompt.image_grid_hws"])
    finally:
        hook.remove()
    assert seen == [(1, 1, lm.config.hidden_size)]
    torch.testing.assert_close(logits, golden["prompt.logits"][:, -1], rtol=1e-4, atol=1e-4)  # official, fp32
    with pytest.raises(KimiVLInputError, match=r"last_positions must be a positive int without output_hidden_states"):
        lm.model(input_ids=batch, last_positions=1, output_hidden_states=True)
