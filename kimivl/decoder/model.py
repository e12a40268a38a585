"""The Moonlight / DeepSeek-V3 MoE decoder: the ``language_model`` of Kimi-VL.

Spec: ``shared/reference/kimivl-spec.md`` §1.3, §2 (keys under ``language_model.``), §4. Official names:
``DeepseekV3ForCausalLM`` (``model``, ``lm_head``) > ``DeepseekV3Model`` (``embed_tokens``, ``layers``,
``norm``) > ``DeepseekV3DecoderLayer`` (``input_layernorm``, ``self_attn``, ``post_attention_layernorm``,
``mlp``). Attribute names are the checkpoint keys, so loading is ``load_state_dict(strict=True)``.

Deliberate deviations: no registered buffers (the model is built on the meta device and filled with
``assign=True``); RoPE tables and the attention mask are computed once per forward and passed to every
layer; the padding mask lets a pad query attend to itself so fully padded rows stay finite; outputs are
small dataclasses instead of transformers' ``ModelOutput``; the KV cache is an explicit argument
(:class:`~kimivl.decoder.cache.MLACache`, latent per token) instead of a ``past_key_values`` object.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from kimivl.configuration import DeepseekV3Config
from kimivl.decoder.attention import DeepseekV3Attention
from kimivl.decoder.cache import MLACache
from kimivl.decoder.cpu_decode import PLAN, layer_step
from kimivl.decoder.mlp import DeepseekV3MLP
from kimivl.decoder.moe import DeepseekV3MoE
from kimivl.decoder.norm import DeepseekV3RMSNorm
from kimivl.errors import KimiVLInputError, check_tensors
from kimivl.ops.linear import Linear
from kimivl.ops.rope import rope_cos_sin

logger = logging.getLogger(__name__)


@dataclass
class DeepseekV3ModelOutput:
    """last_hidden_state: (B, S, hidden) after the final norm. hidden_states: see ``DeepseekV3Model.forward``."""

    last_hidden_state: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class CausalLMOutput:
    """logits: (B, S, vocab) float32. hidden_states: as in :class:`DeepseekV3ModelOutput`."""

    logits: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None


def causal_padding_mask(attention_mask: torch.Tensor, past_length: int = 0) -> torch.Tensor:
    """(B, P + S) padding mask (1 = token, 0 = pad) -> bool (B, 1, S, P + S), True where query i may attend key j.

    The S queries are the last S positions: query i sits at absolute position P + i (``P = past_length``
    cached tokens). Causal and restricted to real keys; every query also sees itself so a pad query (e.g.
    under left padding) never has an empty softmax row. Real tokens never see pads, so their outputs are
    unaffected.
    """
    t = attention_mask.shape[-1]
    keys = torch.arange(t, device=attention_mask.device)
    queries = keys[past_length:]
    causal = keys[None, :] <= queries[:, None]  # (S, P + S): key j <= query i
    mask = causal & attention_mask.bool()[:, None, None, :]
    return mask | (keys[None, :] == queries[:, None])


class DeepseekV3DecoderLayer(nn.Module):
    """h = h + self_attn(input_layernorm(h)); h = h + mlp(post_attention_layernorm(h))."""

    def __init__(self, config: DeepseekV3Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx  # which slice of an MLACache this layer writes
        self.self_attn = DeepseekV3Attention(config)
        self.mlp: nn.Module = (
            DeepseekV3MoE(config) if config.is_moe_layer(layer_idx)
            else DeepseekV3MLP(config.hidden_size, config.intermediate_size)
        )
        self.input_layernorm = DeepseekV3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = DeepseekV3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: torch.Tensor | None, cache: MLACache | None = None, keep: int | None = None) -> torch.Tensor:
        """h: (B, S, hidden); cos, sin: (B, S, rope); attn_mask: bool (B, 1, S, P + S) or None (causal);
        ``P`` = tokens already in ``cache`` (0 without one). ``keep``: only the last ``keep`` positions go on
        past the attention (which still reads and caches all S): the output is (B, keep, hidden)."""
        fused = layer_step(self, h, cos, sin, attn_mask, cache)
        if fused is not None:  # a bf16 decode step on the CPU: two C++ calls (kimivl.decoder.cpu_decode)
            return fused[:, -keep:] if keep else fused
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, attn_mask, cache=cache, layer_idx=self.layer_idx)
        if keep:
            h = h[:, -keep:]
        return h + self.mlp(self.post_attention_layernorm(h))

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 (nn.Module's signature)
        # .to() / .half() swap the parameters' data in place: the fused step's plan holds copies and stacks
        self.__dict__.pop(PLAN, None)
        return super()._apply(fn, recurse)


class Embedding(nn.Embedding):
    """``nn.Embedding`` (same parameter, same key) that skips its random init on the meta device: there
    ``normal_`` runs torch's Python reference, whose first call imports torch._dynamo (~3 s of a
    ``from_pretrained``, whose skeleton's weights are loaded next anyway)."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class DeepseekV3Model(nn.Module):
    """Token embedding, decoder layers and final norm."""

    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__()
        self.config = config
        pad = config.pad_token_id
        self.padding_idx = pad if pad is not None and 0 <= pad < config.vocab_size else None
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, padding_idx=self.padding_idx)
        self.layers = nn.ModuleList(DeepseekV3DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = DeepseekV3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self._warned_past_context = False  # the warning for sequences longer than max_position_embeddings, once

    def forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                output_hidden_states: bool = False, cache: MLACache | None = None,
                last_positions: int | None = None) -> DeepseekV3ModelOutput:
        """Run the decoder on ids or embeddings (exactly one of the two).

        input_ids: (B, S) int in [0, vocab_size) | inputs_embeds: (B, S, hidden). attention_mask: (B, P + S),
        1 = token, 0 = pad (left padding supported), covering the ``P = cache.length`` cached tokens and the
        S new ones (P = 0 without a cache). position_ids: (B, S) or (1, S); default
        ``(attention_mask.cumsum(-1) - 1).clamp(0)[:, P:]`` when a mask is given, else ``P..P+S-1``.
        cache: an :class:`~kimivl.decoder.cache.MLACache` that receives the new tokens' latents (and is
        advanced by S); without it nothing is cached.
        ``hidden_states`` (if asked) follows the official convention: the embeddings, the output of every
        layer but the last, then the final-normed state (``num_hidden_layers + 1`` tensors).
        last_positions: only the last ``last_positions`` positions leave the last layer (its attention still
        caches every token): ``last_hidden_state`` is (B, last_positions, hidden). What a prefill needs for the
        next token's logits; it skips the last layer's MLP (a MoE layer) for the other positions, as llama.cpp's
        prompt processing does.
        """
        if last_positions is not None and (output_hidden_states or not 0 < last_positions):
            raise KimiVLInputError(f"last_positions must be a positive int without output_hidden_states, got "
                                   f"{last_positions!r} (output_hidden_states={output_hidden_states})")
        check_tensors(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                      position_ids=position_ids)
        h = self._embed(input_ids, inputs_embeds)
        b, s, _ = h.shape
        past = 0
        if cache is not None:
            if cache.batch_size != b:
                raise KimiVLInputError(f"the KV cache was allocated for batch size {cache.batch_size}, got {b} rows")
            cache.check_room(s)
            past = cache.length
        padded = self._check_mask_and_positions(attention_mask, position_ids, b, s, past)
        if past + s > self.config.max_position_embeddings and not self._warned_past_context:
            # positions past the trained context still compute (RoPE has no table to overrun), just unreliably;
            # once per model, not once per forward
            self._warned_past_context = True
            logger.warning("a sequence of %d tokens is longer than the model's context (max_position_embeddings=%d):"
                           " positions past it are outside what the model was trained on", past + s,
                           self.config.max_position_embeddings)
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            else:
                position_ids = torch.arange(past, past + s, device=h.device).unsqueeze(0)
        position_ids = position_ids.to(h.device).expand(b, s)
        cfg = self.config
        cos, sin = rope_cos_sin(position_ids, cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling, dtype=h.dtype)
        # Without padding the mask is plain causal: None keeps SDPA on its flash kernel; an explicit (S, S) boolean
        # mask sends it to the math path, which materialises (B, H, S, S) scores (17 GB at 16K tokens, 16 heads).
        attn_mask = causal_padding_mask(attention_mask.to(h.device), past) if padded else None

        hidden_states: list[torch.Tensor] = []
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                hidden_states.append(h)
            h = layer(h, cos, sin, attn_mask, cache, keep=last_positions if i == last else None)
        if cache is not None:
            cache.advance(s)
        h = self.norm(h)
        if output_hidden_states:
            # The official model replaces the last layer's raw output by the normed state.
            hidden_states.append(h)
        return DeepseekV3ModelOutput(h, tuple(hidden_states) if output_hidden_states else None)

    def _embed(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        """Validate the two input forms and return (B, S, hidden) embeddings."""
        cfg = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise KimiVLInputError(
                "pass exactly one of input_ids and inputs_embeds (got "
                f"{'both' if input_ids is not None else 'neither'})"
            )
        if inputs_embeds is not None:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != cfg.hidden_size:
                raise KimiVLInputError(
                    f"inputs_embeds must have shape (batch, seq, {cfg.hidden_size}), got {tuple(inputs_embeds.shape)}"
                )
            if not inputs_embeds.is_floating_point():
                raise KimiVLInputError(f"inputs_embeds must be floating point, got {inputs_embeds.dtype}")
            if inputs_embeds.shape[1] == 0:
                raise KimiVLInputError("inputs_embeds has sequence length 0")
            return inputs_embeds
        assert input_ids is not None
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise KimiVLInputError(
                f"input_ids must have shape (batch, seq) with seq >= 1, got {tuple(input_ids.shape)}"
            )
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise KimiVLInputError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if input_ids.dtype not in (torch.int64, torch.int32):  # what nn.Embedding indexes with
            raise KimiVLInputError(f"input_ids must be int64 or int32 (token ids up to {cfg.vocab_size - 1}), got "
                                   f"{input_ids.dtype}")
        lo, hi = int(input_ids.min()), int(input_ids.max())  # one host sync at the entry point
        if lo < 0 or hi >= cfg.vocab_size:
            bad = lo if lo < 0 else hi
            raise KimiVLInputError(f"input_ids contains {bad}, outside the vocabulary [0, {cfg.vocab_size})")
        return self.embed_tokens(input_ids)

    @staticmethod
    def _check_mask_and_positions(attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
                                  b: int, s: int, past: int = 0) -> bool:
        """Check the mask's shape and values and the positions' shape; returns whether the mask pads (holds a 0).

        A mask must hold only 0 and 1 (bool, integer or float): positions are ``cumsum(mask) - 1``, so a 2 or a
        0.5 would silently shift every later position. The values are read in the one host sync that also tells
        whether the mask pads (which the forward needs anyway), so a decode step pays no extra sync."""
        if attention_mask is not None and tuple(attention_mask.shape) != (b, past + s):
            where = "like the inputs" if past == 0 else f"({past} cached + {s} new tokens)"
            raise KimiVLInputError(
                f"attention_mask must be a 2-D padding mask of shape ({b}, {past + s}) {where}, "
                f"got {tuple(attention_mask.shape)}"
            )
        if position_ids is not None:
            if position_ids.dim() != 2 or position_ids.shape[1] != s or position_ids.shape[0] not in (1, b):
                shapes = f"({b}, {s})" if b == 1 else f"({b}, {s}) or (1, {s})"
                raise KimiVLInputError(f"position_ids must have shape {shapes}, got {tuple(position_ids.shape)}")
            if position_ids.is_floating_point():
                raise KimiVLInputError(f"position_ids must be an integer tensor, got {position_ids.dtype}")
        if attention_mask is None or attention_mask.numel() == 0:
            return False
        if attention_mask.dtype == torch.bool:
            return not bool(attention_mask.all())
        if attention_mask.is_complex():
            raise KimiVLInputError(f"attention_mask must be a bool, integer or float tensor of 0s and 1s, got "
                                   f"{attention_mask.dtype}")
        lo, hi = torch.aminmax(attention_mask)
        stats = [lo, hi]
        if attention_mask.is_floating_point():  # 0.5 lies within [0, 1]: floats must also be whole
            stats.append((attention_mask != attention_mask.round()).any().to(attention_mask.dtype))
        low, high, *fraction = torch.stack(stats).tolist()
        if not (low >= 0 and high <= 1) or any(fraction):
            mask = attention_mask
            bad = mask[(mask != 0) & (mask != 1)][0].item()
            raise KimiVLInputError(f"attention_mask must hold only 0 (pad) and 1 (token), got {bad}")
        return low == 0


class DeepseekV3ForCausalLM(nn.Module):
    """Decoder plus ``lm_head``; logits are returned in float32."""

    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__()
        self.config = config
        self.model = DeepseekV3Model(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        # load_state_dict(assign=True) replaces parameter objects, which would untie them.
        self.register_load_state_dict_post_hook(lambda module, _incompatible: module.tie_weights())

    def tie_weights(self) -> None:
        """Share ``lm_head.weight`` with ``model.embed_tokens.weight`` when ``tie_word_embeddings``."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                output_hidden_states: bool = False, cache: MLACache | None = None) -> CausalLMOutput:
        """Arguments as :meth:`DeepseekV3Model.forward`. Returns logits (B, S, vocab) float32."""
        out = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                         position_ids=position_ids, output_hidden_states=output_hidden_states, cache=cache)
        return CausalLMOutput(self.lm_head(out.last_hidden_state).float(), out.hidden_states)

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 (nn.Module's signature)
        self.__dict__.pop(PLAN, None)  # the whole decode step's plan (kimivl.decoder.cpu_decode.model_step)
        return super()._apply(fn, recurse)
