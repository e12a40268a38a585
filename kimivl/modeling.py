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
from kimivl.errors import KimiVLInputError, check_tensors
from kimivl.generation.config import GenerationConfig
from kimivl.generation.generate import GenerateOutput, Streamer
from kimivl.generation.generate import generate as generate_ids
from kimivl.generation.prompt_cache import PromptCache
from kimivl.ops.attention import BACKENDS as ATTENTION_BACKENDS
from kimivl.ops.attention import flash_varlen_fn
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


def _quantize_on_load(model: KimiVLForConditionalGeneration, config: KimiVLConfig,
                      quantization: str | None) -> set[str]:
    """Swap the (meta) model's layers for int8 ones where asked or where the checkpoint is quantized; returns the
    weight keys to quantize as they are read (an int8 checkpoint's weights pass as they are)."""
    from kimivl.quantization import int8

    stored, ignore = int8.method_of(config.extra.get("quantization_config"))
    if quantization is not None:
        int8.check_method(quantization)
    method = stored or quantization
    if method is None:
        return set()
    ignore = ignore or int8.IGNORE
    names = int8.replace_linears(model, ignore)
    config.extra["quantization_config"] = int8.quantization_config(ignore)
    return {name + ".weight" for name in names}


def _as_dtype(dtype: torch.dtype | str | None, config: KimiVLConfig) -> torch.dtype | None:
    if dtype is None:
        return dtype
    if isinstance(dtype, torch.dtype):
        return _floating(dtype, dtype)
    name = config.torch_dtype if dtype == "auto" else dtype
    if name is None:
        return None
    resolved = getattr(torch, str(name).replace("torch.", ""), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"dtype {dtype!r} is not a torch dtype (try 'bfloat16', 'float16', 'float32' or 'auto')")
    return _floating(resolved, dtype)


def _floating(resolved: torch.dtype, asked: Any) -> torch.dtype:
    """The weights are cast to ``dtype``: an integer or bool one would make parameters that cannot require grad
    (a RuntimeError deep in load_state_dict) or silently truncate them."""
    if not resolved.is_floating_point:
        hint = "; for int8 weights pass quantization='int8'" if resolved == torch.int8 else ""
        raise ValueError(f"dtype {asked!r} is not a floating-point dtype: the weights are cast to it (try "
                         f"'bfloat16', 'float16', 'float32' or 'auto'){hint}")
    return resolved


def _merge_alias(name: str, value: Any, alias: str, alias_value: Any) -> Any:
    """One argument given under its own name or under Hugging Face's; both only if they agree."""
    if alias_value is None:
        return value
    if value is not None and str(value).removeprefix("torch.") != str(alias_value).removeprefix("torch."):
        raise ValueError(f"{name}={value!r} and {alias}={alias_value!r} disagree; pass one of them")
    return alias_value


def _device_of_map(device_map: Any) -> torch.device | str | None:
    """The one device a Hugging Face ``device_map`` names. ``"auto"`` is CUDA when available, else the CPU;
    a dict must send every module to the same device (kimivl does not split a model across devices)."""
    if device_map is None or isinstance(device_map, torch.device):
        return device_map
    if isinstance(device_map, int) and not isinstance(device_map, bool):
        return torch.device("cuda", device_map)
    if device_map == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(device_map, str):
        return device_map
    if isinstance(device_map, dict):
        devices = {str(_device_of_map(d)) for d in device_map.values()}
        if len(devices) == 1:
            return devices.pop()
        raise ValueError(f"device_map sends modules to {len(devices)} devices ({sorted(devices)}); kimivl keeps the "
                         "whole model on one device (device=...; tensor-parallel serving is not implemented)")
    raise ValueError(f"device_map must be 'auto', a device, a device index or a dict, got {device_map!r}")


def _target_device(device: torch.device | str | None) -> torch.device:
    """The device to load onto (the CPU by default), refused by name when this machine has no such device."""
    try:
        target = torch.device(device) if device is not None else torch.device("cpu")
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a device name (e.g. 'cpu', 'cuda', 'cuda:1')") from e
    if target.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            why = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise ValueError(f"device={device!r}, but {why} (torch {torch.__version__}); use device='cpu'")
        if target.index is not None and target.index >= count:
            raise ValueError(f"device={device!r}, but only {count} CUDA device(s) are visible (0..{count - 1})")
    elif target.type not in ("cpu", "meta"):
        # mps, xpu, ...: refused here by name, not as a RuntimeError from the first tensor copied there
        name = target.type.upper()
        if target.type == "mps":
            count = int(torch.backends.mps.is_available())
        else:
            backend = getattr(torch, target.type, None)
            available = getattr(backend, "is_available", None)
            count = 0 if not callable(available) or not available() else getattr(backend, "device_count", lambda: 1)()
        if count == 0:
            raise ValueError(f"device={device!r}, but no {name} device is available (torch {torch.__version__}); "
                             "use device='cpu'")
        if target.index is not None and target.index >= count:
            raise ValueError(f"device={device!r}, but only {count} {name} device(s) are visible (0..{count - 1})")
    return target


# Hugging Face's attn_implementation names -> the vision tower's attention backends.
_HF_ATTENTION = {"flash_attention_2": "flash", "sdpa": "sdpa", "eager": "eager"}


def _vision_backend(attn_implementation: str | None) -> str | None:
    if attn_implementation is None:
        return None
    backend = _HF_ATTENTION.get(attn_implementation, attn_implementation)
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attn_implementation={attn_implementation!r} is not known; use one of "
                         f"{sorted(_HF_ATTENTION)} or a kimivl backend {ATTENTION_BACKENDS}")
    if backend == "flash":
        flash_varlen_fn()  # raises ImportError with the install line when flash-attn is missing
    return backend


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

    # ------------------------------------------------------------------ transformers' model surface
    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.model.embed_tokens

    def set_input_embeddings(self, embeddings: nn.Embedding) -> None:
        self.language_model.model.embed_tokens = embeddings

    def get_output_embeddings(self) -> nn.Linear:
        return self.language_model.lm_head

    def set_output_embeddings(self, head: nn.Linear) -> None:
        self.language_model.lm_head = head

    @property
    def is_gradient_checkpointing(self) -> bool:
        return getattr(self, "_checkpointed_blocks", 0) > 0

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> None:
        """Recompute every decoder layer and MoonViT block in backward (non-reentrant; the parameter names stay).
        Idempotent. ``gradient_checkpointing_kwargs`` is accepted for transformers' callers and not used."""
        if not self.is_gradient_checkpointing:
            from kimivl.training.trainer import enable_gradient_checkpointing

            self._checkpointed_blocks = enable_gradient_checkpointing(self)

    def enable_input_require_grads(self) -> None:
        """Make the token embeddings' output require grad (what peft asks of a frozen base under checkpointing)."""
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            output.requires_grad_(True)

        if getattr(self, "_input_grads_hook", None) is None:
            self._input_grads_hook = self.get_input_embeddings().register_forward_hook(hook)

    # ------------------------------------------------------------------ multimodal embedding
    def get_image_features(self, pixel_values: torch.Tensor, image_grid_hws: torch.Tensor) -> torch.Tensor:
        """Vision tower + projector: (L, 3, p, p) patches and (N, 2) grids -> (sum h*w/4, D_text)."""
        merged = self.vision_tower(pixel_values, image_grid_hws)
        return self.multi_modal_projector(merged)

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                     image_grid_hws: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with the image features written over the placeholder rows (B, S, D)."""
        check_tensors(input_ids=input_ids, pixel_values=pixel_values, image_grid_hws=image_grid_hws)
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
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise KimiVLInputError(f"input_ids must be an integer tensor (token ids), got {input_ids.dtype}")
        if input_ids.dtype not in (torch.int64, torch.int32):  # what nn.Embedding indexes with
            raise KimiVLInputError(f"input_ids must be int64 or int32 (token ids up to {vocab - 1}), got "
                                   f"{input_ids.dtype}")
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
        check_tensors(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                       image_grid_hws=image_grid_hws, labels=labels, position_ids=position_ids,
                       inputs_embeds=inputs_embeds)
        if inputs_embeds is None:
            assert input_ids is not None
            inputs_embeds = self.embed_inputs(input_ids, pixel_values, image_grid_hws)
        elif pixel_values is not None:
            raise KimiVLInputError("pixel_values need input_ids (the placeholders say where the images go)")
        if attention_mask is not None and attention_mask.shape != inputs_embeds.shape[:2]:
            raise KimiVLInputError(f"attention_mask has shape {tuple(attention_mask.shape)} but the inputs are "
                                   f"{tuple(inputs_embeds.shape[:2])} (batch, seq_len)")
        # labels are checked before the model runs, not after a whole forward
        targets = None if labels is None else self._targets(labels, attention_mask, tuple(inputs_embeds.shape[:2]))
        out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  position_ids=position_ids, output_hidden_states=output_hidden_states)
        loss = None if targets is None else self._shifted_cross_entropy(out.logits, targets)
        return KimiVLOutput(logits=out.logits, loss=loss, hidden_states=getattr(out, "hidden_states", None))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Shifted next-token cross-entropy; ``ignore_index`` labels and padded positions do not count."""
        return self._shifted_cross_entropy(logits, self._targets(labels, attention_mask, tuple(logits.shape[:2])))

    def _targets(self, labels: torch.Tensor, attention_mask: torch.Tensor | None,
                 shape: tuple[int, ...]) -> torch.Tensor:
        """The (B, S - 1) int64 next-token targets of ``labels`` (padded positions set to ``ignore_index``),
        refused by name when they are not token ids: cross_entropy's own failures name no label (an IndexError, a
        dtype RuntimeError, a device-side assert on CUDA), and uint8 labels cannot hold -100."""
        if tuple(labels.shape) != shape:
            raise KimiVLInputError(f"labels have shape {tuple(labels.shape)} but the inputs are {shape} "
                                   "(batch, seq_len)")
        ignore = self.config.ignore_index
        if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8):
            why = f" (it cannot hold ignore_index={ignore})" if not labels.dtype.is_signed and ignore < 0 else ""
            raise KimiVLInputError(f"labels must be token ids in a signed integer dtype (int64, int32, ...), got "
                                   f"{labels.dtype}{why}")
        targets = labels[:, 1:].long()
        if attention_mask is not None:
            targets = targets.masked_fill(attention_mask[:, 1:] == 0, ignore)
        vocab = self.config.text_config.vocab_size
        bad = (targets != ignore) & ((targets < 0) | (targets >= vocab))
        if bool(bad.any()):  # one host sync per forward with labels (training), none in generation
            raise KimiVLInputError(f"labels contain {int(targets[bad][0])}, outside the vocabulary [0, {vocab}) and "
                                   f"not ignore_index={ignore}")
        return targets

    def _shifted_cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                               ignore_index=self.config.ignore_index)

    # ------------------------------------------------------------------ generation
    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 pixel_values: torch.Tensor | None = None, image_grid_hws: torch.Tensor | None = None,
                 max_new_tokens: int | None = None, do_sample: bool | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                 repetition_penalty: float | None = None, eos_token_id: int | list[int] | None = None,
                 stop_strings: str | list[str] | None = None, seed: int | None = None,
                 streamer: Streamer | None = None, tokenizer: Any = None,
                 pad_token_id: int | None = None, *, min_new_tokens: int | None = None, max_length: int | None = None,
                 generation_config: Any = None, num_beams: int | None = None, use_cache: bool | None = None,
                 return_dict_in_generate: bool = False, output_scores: bool = False,
                 output_logits: bool = False, logits_processor: Any = None,
                 inputs_embeds: torch.Tensor | None = None,
                 num_return_sequences: int | None = None,
                 prompt_cache: PromptCache | None = None) -> torch.Tensor | GenerateOutput:
        """Prompt + new ids (B, S + new), or a :class:`~kimivl.generation.GenerateOutput` with
        ``return_dict_in_generate=True``; see :func:`kimivl.generation.generate` (which this calls)."""
        return generate_ids(self, input_ids, attention_mask, pixel_values, image_grid_hws,
                            max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                            top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                            eos_token_id=eos_token_id, stop_strings=stop_strings, seed=seed, streamer=streamer,
                            tokenizer=tokenizer, pad_token_id=pad_token_id, min_new_tokens=min_new_tokens,
                            max_length=max_length, generation_config=generation_config, num_beams=num_beams,
                            use_cache=use_cache, return_dict_in_generate=return_dict_in_generate,
                            output_scores=output_scores, output_logits=output_logits,
                            logits_processor=logits_processor, inputs_embeds=inputs_embeds,
                            num_return_sequences=num_return_sequences, prompt_cache=prompt_cache)

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike[str], dtype: torch.dtype | str | None = None,
                        device: torch.device | str | None = None, progress: bool = False, *,
                        revision: str | None = None, cache_dir: str | None = None,
                        torch_dtype: torch.dtype | str | None = None, device_map: Any = None,
                        attn_implementation: str | None = None, trust_remote_code: bool | None = None,
                        low_cpu_mem_usage: bool | None = None,
                        quantization: str | None = None) -> KimiVLForConditionalGeneration:
        """Load a checkpoint in the official layout (local directory or hub id).

        The model is built on the meta device and the safetensors tensors are assigned to it, so the
        weights exist once, on ``device``. ``dtype=None`` keeps the stored dtypes; ``"auto"`` uses
        ``config.torch_dtype``; ``e_score_correction_bias`` stays float32 either way. ``progress``
        shows a progress bar over the tensors read.

        Hugging Face's spellings are accepted so that the model card's example runs unchanged:
        ``torch_dtype`` (= ``dtype``), ``device_map`` (``"auto"``: CUDA when available, else the CPU; or one
        device; the model is never split across devices), ``attn_implementation`` (the vision tower's attention:
        ``"flash_attention_2"``, ``"sdpa"``, ``"eager"`` or a backend of :mod:`kimivl.ops.attention`);
        ``trust_remote_code`` and ``low_cpu_mem_usage`` change nothing (no checkpoint code is ever run, and
        loading always holds one copy of the weights).

        ``quantization="int8"`` stores the decoder's linear layers as int8 with one scale per output channel
        (:mod:`kimivl.quantization.int8`), each weight quantized as it is read, so the float weights never exist
        together: the released model in 16.4 GiB instead of 30.6. A checkpoint saved from such a model (its
        ``config.json`` has a ``quantization_config``) loads quantized without the argument.
        """
        del trust_remote_code, low_cpu_mem_usage  # accepted for Hugging Face examples; nothing to do
        dtype = _merge_alias("dtype", dtype, "torch_dtype", torch_dtype)
        device = _merge_alias("device", device, "device_map", _device_of_map(device_map))
        backend = _vision_backend(attn_implementation)
        directory = resolve_checkpoint_dir(path_or_id, revision=revision, cache_dir=cache_dir)
        config = KimiVLConfig.from_pretrained(directory)
        device = _target_device(device)
        dtype = _as_dtype(dtype, config)
        # read (and checked) before the weights: a bad generation_config.json fails the load in no time
        generation_config = GenerationConfig.from_checkpoint(directory, config.text_config.eos_token_id,
                                                             vocab_size=config.text_config.vocab_size)
        with torch.device("meta"):
            model = cls(config)
        if backend is not None:
            model.vision_tower.attn_backend = backend
        quantize = _quantize_on_load(model, config, quantization)
        load_weights(model, directory, dtype=dtype, device=device, progress=progress, quantize=quantize)
        model.generation_config = generation_config
        model.eval()
        return model

    def save_pretrained(self, directory: str | os.PathLike[str], max_shard_size: int | str = "5GB") -> None:
        """Write ``config.json``, (sharded) safetensors with the official keys and, when the model has decoding
        defaults (``generation_config``, set by ``from_pretrained``), ``generation_config.json``."""
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise FileExistsError(f"save_pretrained needs a directory, but {directory} is a file")
        config = KimiVLConfig.from_dict(self.config.to_dict())  # the model's own config stays untouched
        dtype_name = str(self.dtype).replace("torch.", "")
        config.torch_dtype = config.vision_config.torch_dtype = config.text_config.torch_dtype = dtype_name
        config.save_pretrained(directory)
        save_weights(self.state_dict(), directory, max_shard_size=max_shard_size)
        if self.generation_config is not None:
            self.generation_config.save_pretrained(directory)
