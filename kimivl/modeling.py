"""KimiVLForConditionalGeneration: MoonViT -> projector -> Moonlight MoE decoder.

Spec: ``shared/reference/kimivl-spec.md`` §2 (module tree, keys) and §4 (multimodal wrapper).
Attribute names equal the official state-dict prefixes (``vision_tower``,
``multi_modal_projector``, ``language_model``), so loading is one strict ``load_state_dict``.
This is the only module that imports all three towers.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kimivl.checkpoint import load_weights, resolve_checkpoint_dir, save_weights
from kimivl.configuration import KimiVLConfig
from kimivl.decoder import DeepseekV3ForCausalLM
from kimivl.errors import KimiVLInputError
from kimivl.generation.config import GenerationConfig
from kimivl.generation.generate import Streamer
from kimivl.generation.generate import generate as generate_ids
from kimivl.ops.splice import merge_multimodal_embeddings
from kimivl.projector import KimiVLMultiModalProjector
from kimivl.vision import MoonVitPretrainedModel

logger = logging.getLogger(__name__)


@dataclass
class KimiVLOutput:
    """What ``forward`` returns: ``logits`` (B, S, V) float32; ``loss`` when labels were given."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


def _as_dtype(dtype: torch.dtype | str | None, config: KimiVLConfig) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = config.torch_dtype if dtype == "auto" else dtype
    if name is None:
        return None
    resolved = getattr(torch, str(name).replace("torch.", ""), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"dtype {dtype!r} is not a torch dtype (try 'bfloat16', 'float16', 'float32' or 'auto')")
    return resolved


class KimiVLForConditionalGeneration(nn.Module):
    """The full Kimi-VL model. ``forward`` mirrors the official / Hugging Face call."""

    def __init__(self, config: KimiVLConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_tower = MoonVitPretrainedModel(config.vision_config)
        self.multi_modal_projector = KimiVLMultiModalProjector(config.vision_config, config.text_config)
        self.language_model = DeepseekV3ForCausalLM(config.text_config)
        # Decoding defaults of the checkpoint (set by from_pretrained); None = GenerationConfig defaults.
        self.generation_config: GenerationConfig | None = None

    # ------------------------------------------------------------------ properties
    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.language_model.lm_head.weight.device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ multimodal embedding
    def get_image_features(self, pixel_values: torch.Tensor, image_grid_hws: torch.Tensor) -> torch.Tensor:
        """Vision tower + projector: (L, 3, p, p) patches and (N, 2) grids -> (sum h*w/4, D_text)."""
        merged = self.vision_tower(pixel_values, image_grid_hws)
        return self.multi_modal_projector(merged)

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                     image_grid_hws: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with the image features written over the placeholder rows (B, S, D)."""
        if input_ids.ndim != 2:
            raise KimiVLInputError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        embeds = self.language_model.model.embed_tokens(self._check_ids(input_ids))
        has_pixels = pixel_values is not None and pixel_values.numel() > 0
        if has_pixels:
            if image_grid_hws is None:
                raise KimiVLInputError("pixel_values were given without image_grid_hws (one (h, w) row per image)")
            features = self.get_image_features(pixel_values, image_grid_hws)
        else:
            features = embeds.new_zeros(0, embeds.shape[-1])
        return merge_multimodal_embeddings(embeds, input_ids, features, self.config.media_placeholder_token_id)

    def _check_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        vocab = self.config.text_config.vocab_size
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
            raise KimiVLInputError(
                f"input_ids hold ids in [{int(input_ids.min())}, {int(input_ids.max())}] but the vocabulary has "
                f"{vocab} rows (valid ids 0..{vocab - 1})"
            )
        return input_ids

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, image_grid_hws: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, output_hidden_states: bool = False) -> KimiVLOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise KimiVLInputError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            assert input_ids is not None
            inputs_embeds = self.embed_inputs(input_ids, pixel_values, image_grid_hws)
        elif pixel_values is not None:
            raise KimiVLInputError("pixel_values need input_ids (the placeholders say where the images go)")
        if attention_mask is not None and attention_mask.shape != inputs_embeds.shape[:2]:
            raise KimiVLInputError(f"attention_mask has shape {tuple(attention_mask.shape)} but the inputs are "
                                   f"{tuple(inputs_embeds.shape[:2])} (batch, seq_len)")
        out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  position_ids=position_ids, output_hidden_states=output_hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss(out.logits, labels, attention_mask)
        return KimiVLOutput(logits=out.logits, loss=loss, hidden_states=getattr(out, "hidden_states", None))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Shifted next-token cross-entropy; ``ignore_index`` labels and padded positions do not count."""
        if labels.shape != logits.shape[:2]:
            raise KimiVLInputError(f"labels have shape {tuple(labels.shape)} but the inputs are "
                                   f"{tuple(logits.shape[:2])} (batch, seq_len)")
        ignore = self.config.ignore_index
        targets = labels[:, 1:]
        if attention_mask is not None:
            targets = targets.masked_fill(attention_mask[:, 1:] == 0, ignore)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=ignore)

    # ------------------------------------------------------------------ generation
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 pixel_values: torch.Tensor | None = None, image_grid_hws: torch.Tensor | None = None,
                 max_new_tokens: int | None = None, do_sample: bool | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                 repetition_penalty: float | None = None, eos_token_id: int | list[int] | None = None,
                 stop_strings: str | list[str] | None = None, seed: int | None = None,
                 streamer: Streamer | None = None, tokenizer: Any = None,
                 pad_token_id: int | None = None) -> torch.Tensor:
        """Prompt + new ids (B, S + new); see :func:`kimivl.generation.generate` (which this calls)."""
        return generate_ids(self, input_ids, attention_mask, pixel_values, image_grid_hws,
                            max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                            top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                            eos_token_id=eos_token_id, stop_strings=stop_strings, seed=seed, streamer=streamer,
                            tokenizer=tokenizer, pad_token_id=pad_token_id)

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike[str], dtype: torch.dtype | str | None = None,
                        device: torch.device | str | None = None, progress: bool = False,
                        **hub_kwargs: Any) -> KimiVLForConditionalGeneration:
        """Load a checkpoint in the official layout (local directory or hub id).

        The model is built on the meta device and the safetensors tensors are assigned to it, so the
        weights exist once, on ``device``. ``dtype=None`` keeps the stored dtypes; ``"auto"`` uses
        ``config.torch_dtype``; ``e_score_correction_bias`` stays float32 either way. ``progress``
        shows a progress bar over the tensors read.
        """
        directory = resolve_checkpoint_dir(path_or_id, **hub_kwargs)
        config = KimiVLConfig.from_pretrained(directory)
        device = torch.device(device) if device is not None else torch.device("cpu")
        with torch.device("meta"):
            model = cls(config)
        load_weights(model, directory, dtype=_as_dtype(dtype, config), device=device, progress=progress)
        model.generation_config = GenerationConfig.from_checkpoint(directory, config.text_config.eos_token_id)
        model.eval()
        return model

    def save_pretrained(self, directory: str | os.PathLike[str], max_shard_size: int | str = "5GB") -> None:
        """Write ``config.json`` and (sharded) safetensors with the official keys."""
        directory = Path(directory)
        config = KimiVLConfig.from_dict(self.config.to_dict())  # the model's own config stays untouched
        dtype_name = str(self.dtype).replace("torch.", "")
        config.torch_dtype = config.vision_config.torch_dtype = config.text_config.torch_dtype = dtype_name
        config.save_pretrained(directory)
        save_weights(self.state_dict(), directory, max_shard_size=max_shard_size)
