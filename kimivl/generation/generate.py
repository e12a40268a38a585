"""The decoding loop: prefill once (vision included), then one-token decode steps over an MLA latent cache.

Spec: ``shared/reference/kimivl-spec.md`` §4 (positions ``cumsum(mask) - 1`` with a cache; pixel values only
on the first step) and §7 (decoding defaults, ``<|im_end|>`` / ``[EOS]`` stop ids). gpt-fast style:
:func:`prefill` and :func:`decode_step` are separate functions and the :class:`~kimivl.decoder.cache.MLACache`
is an explicit argument. :func:`generate` returns ids; :func:`stream` yields text deltas from the same loop.

Works on a :class:`~kimivl.modeling.KimiVLForConditionalGeneration` (images through ``embed_inputs``) and on a
bare :class:`~kimivl.decoder.DeepseekV3ForCausalLM` (text only). Batches are left padded; every row keeps its
own positions and stops on its own (finished rows are filled with ``pad_token_id``). On a CUDA device the
decode steps are replayed from captured CUDA graphs (:mod:`kimivl.generation.cuda_graph`; ``KIMIVL_CUDA_GRAPHS=0``
turns that off). Settings given as
arguments override the model's ``generation_config``, which overrides the :class:`GenerationConfig` defaults.
Stop strings keep the tokens that completed them (as transformers does).
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
from collections.abc import Callable, Iterator, Sequence
from itertools import repeat
from typing import Any, Protocol

import torch
from torch import nn

from kimivl.decoder import cpu_decode
from kimivl.decoder.cache import MLACache, latent_cache_dtype
from kimivl.errors import KimiVLInputError, check_tensors
from kimivl.generation import cuda_graph
from kimivl.generation.config import (GenerationConfig, check_setting, check_token_ids, is_int, validate_settings)
from kimivl.generation.detokenize import IncrementalDetokenizer
from kimivl.generation.prompt_cache import ImageSpan, PromptCache, image_spans, images_after
from kimivl.ops.sampling import apply_repetition_penalty, pick_token, warp_logits

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class GenerateOutput:
    """``generate(..., return_dict_in_generate=True)``: transformers' field names. ``scores``: per new token the
    (B, vocab) float32 scores it was chosen from (after the repetition penalty, ``min_new_tokens``, temperature
    and top-k / top-p / min-p), with ``output_scores=True``; ``logits``: the raw next-token logits, with
    ``output_logits=True``."""

    sequences: torch.Tensor
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None


# transformers' LogitsProcessor call: (ids so far (B, S + t), scores (B, vocab) float32) -> scores (B, vocab)
LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Streamer(Protocol):
    """transformers-like streamer: ``put`` gets the prompt ids (B, S) once, then each step's (B,) new ids."""

    def put(self, value: torch.Tensor) -> None: ...

    def end(self) -> None: ...


# ---------------------------------------------------------------------------------------------- model steps

def _language_model(model: nn.Module) -> nn.Module:
    """The DeepseekV3ForCausalLM inside a KimiVL model, or the model itself when it is one."""
    return getattr(model, "language_model", model)


def _next_token_logits(lm: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Only the last position goes through ``lm_head``: (B, S, hidden) -> (B, vocab) float32."""
    return lm.lm_head(hidden[:, -1]).float()


def prefill(model: nn.Module, input_ids: torch.Tensor, cache: MLACache, attention_mask: torch.Tensor | None = None,
            pixel_values: torch.Tensor | None = None, image_grid_hws: torch.Tensor | None = None,
            inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Run the prompt (and its images, the only time they are encoded) into ``cache``.

    input_ids: (B, S) left padded; attention_mask: (B, S) or None (no padding); pixel_values: (L, 3, p, p) and
    image_grid_hws: (N, 2) for the placeholders of all rows, in order; ``inputs_embeds`` (B, S, D), when given,
    is the prompt in place of ``input_ids``' embeddings. Returns the next-token logits (B, vocab) float32;
    ``cache.length`` grows by S. Only the last position goes through the last layer's MLP
    (``last_positions=1``): the others' latents are cached by its attention and nothing else reads them.
    """
    lm = _language_model(model)
    if inputs_embeds is not None:
        out = lm.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache, last_positions=1)
    elif hasattr(model, "embed_inputs"):
        embeds = model.embed_inputs(input_ids, pixel_values, image_grid_hws)
        out = lm.model(inputs_embeds=embeds, attention_mask=attention_mask, cache=cache, last_positions=1)
    else:
        if pixel_values is not None and pixel_values.numel() > 0:
            raise KimiVLInputError(f"{type(model).__name__} is a text-only model and cannot take pixel_values")
        out = lm.model(input_ids=input_ids, attention_mask=attention_mask, cache=cache, last_positions=1)
    return _next_token_logits(lm, out.last_hidden_state)


def decode_step(model: nn.Module, token_ids: torch.Tensor, cache: MLACache,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One step: embed only the new token(s) and attend to the cache.

    token_ids: (B,) or (B, S_new); attention_mask: (B, cache.length + S_new) or None (no padding).
    Returns the next-token logits (B, vocab) float32; ``cache.length`` grows by S_new.
    """
    lm = _language_model(model)
    ids = token_ids.view(token_ids.shape[0], -1)
    logits = cpu_decode.model_step(lm, ids, cache, attention_mask)  # bf16 on the CPU: the whole step in C++
    if logits is not None:
        return logits
    out = lm.model(input_ids=ids, attention_mask=attention_mask, cache=cache)
    return _next_token_logits(lm, out.last_hidden_state)


# ---------------------------------------------------------------------------------------------- settings

# transformers' generation_config keys that a dict of them may carry and kimivl has no use for (no warning)
_QUIET_KEYS = frozenset({"transformers_version", "_from_model_config"})


def _warn_unknown_keys(data: dict[str, Any], known: set[str]) -> None:
    """A user's dict: a misspelt key (``max_new_token``) would otherwise be dropped without a word."""
    for key in data:
        if key in known or key in _QUIET_KEYS:
            continue
        close = difflib.get_close_matches(str(key), sorted(known), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        logger.warning("generation_config key %r is not a kimivl generation setting and is ignored%s", key, hint)


def resolve_generation_config(model: nn.Module, base: Any = None, **overrides: Any) -> GenerationConfig:
    """The model's ``generation_config`` (or the defaults), then the set (non-None) values of ``base`` (a
    :class:`GenerationConfig`, a dict of its keys or an object with ``to_dict()`` such as transformers'
    ``GenerationConfig``), then the non-None ``overrides``; validated.

    Without a stop id anywhere, the text config's ``eos_token_id`` stops; ``pad_token_id`` falls back to the
    text config's, then 0. ``eos_token_id=[]`` turns stopping on ids off.
    """
    text_config = _language_model(model).config
    model_config = getattr(model, "generation_config", None) or GenerationConfig(eos_token_id=text_config.eos_token_id)
    changes: dict[str, Any] = {}
    if base is not None:
        data = base.to_dict() if callable(getattr(base, "to_dict", None)) else base
        if not isinstance(data, dict):
            raise KimiVLInputError(f"generation_config must be a GenerationConfig, a dict or have to_dict(), got "
                                   f"{type(base).__name__}")
        known = {f.name for f in dataclasses.fields(GenerationConfig)} - {"extra"}
        if isinstance(base, dict):  # written by the user (an object's to_dict() has its own other keys)
            _warn_unknown_keys(data, known)
        changes.update({k: v for k, v in data.items() if k in known and v is not None})
    changes.update({k: v for k, v in overrides.items() if v is not None})
    config = dataclasses.replace(model_config, extra=dict(model_config.extra), **changes)
    if config.pad_token_id is None:
        pad = text_config.pad_token_id
        config.pad_token_id = pad if pad is not None and 0 <= pad < text_config.vocab_size else 0
    validate_settings(config)
    # the ids given here; the model's own (from its config files) are checked when it is loaded
    check_token_ids(changes, text_config.vocab_size)
    return config


def _embeds_prompt(model: nn.Module, inputs_embeds: torch.Tensor, input_ids: torch.Tensor | None,
                   pixel_values: torch.Tensor | None) -> torch.Tensor:
    """Check ``inputs_embeds`` (B, S, hidden); returns the ids that give the prompt its shape (``input_ids`` when
    given and of the same (B, S), else zeros that are never read as tokens)."""
    hidden = _language_model(model).config.hidden_size
    if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != hidden \
            or not inputs_embeds.is_floating_point():
        got = tuple(inputs_embeds.shape) if isinstance(inputs_embeds, torch.Tensor) else type(inputs_embeds).__name__
        raise KimiVLInputError(f"inputs_embeds must be a float (batch, seq_len, {hidden}) tensor, got {got}")
    if pixel_values is not None and pixel_values.numel() > 0:
        raise KimiVLInputError("pixel_values cannot come with inputs_embeds: the images' features must already be in "
                               "the embeddings (model.embed_inputs(input_ids, pixel_values, image_grid_hws))")
    b, n = inputs_embeds.shape[:2]
    if input_ids is None:
        return torch.zeros(b, n, dtype=torch.long, device=inputs_embeds.device)
    if tuple(input_ids.shape) != (b, n):
        raise KimiVLInputError(f"input_ids {tuple(input_ids.shape)} and inputs_embeds {tuple(inputs_embeds.shape)} "
                               "must cover the same (batch, seq_len)")
    return input_ids


@torch.inference_mode()
def _repeat_prompts(model: nn.Module, k: int, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    pixel_values: torch.Tensor | None, image_grid_hws: torch.Tensor | None,
                    inputs_embeds: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Each prompt row ``k`` times in a row; a prompt with images becomes its embeddings first (vision runs once)."""
    if inputs_embeds is None and pixel_values is not None and pixel_values.numel() > 0:
        inputs_embeds = model.embed_inputs(input_ids, pixel_values, image_grid_hws)
    again = [None if t is None else t.repeat_interleave(k, dim=0) for t in (input_ids, attention_mask, inputs_embeds)]
    return again[0], again[1], again[2]


def _max_new_tokens(max_new_tokens: int | None, max_length: int | None, input_ids: Any) -> int | None:
    """transformers' ``max_length`` (prompt + new tokens) as a number of new tokens; ``max_new_tokens`` wins."""
    if max_length is None or max_new_tokens is not None:
        return max_new_tokens
    n = input_ids.shape[-1] if isinstance(input_ids, torch.Tensor) else 0
    check_setting(is_int(max_length) and max_length > n, "max_length", max_length,
           f"must be longer than the prompt ({n} tokens): it counts the prompt and the new tokens")
    return max_length - n


def _processor_list(logits_processor: Any) -> list[LogitsProcessor]:
    """transformers' ``logits_processor``: one callable or a sequence of them (a ``LogitsProcessorList``)."""
    if logits_processor is None:
        return []
    fns = [logits_processor] if callable(logits_processor) and not isinstance(logits_processor, Sequence) \
        else list(logits_processor) if isinstance(logits_processor, Sequence) else None
    if fns is None or not all(callable(fn) for fn in fns):
        raise KimiVLInputError("logits_processor must be a callable (input_ids, scores) -> scores or a list of them, "
                               f"got {type(logits_processor).__name__}")
    return fns


def _apply_processors(processors: Sequence[LogitsProcessor], ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    for i, fn in enumerate(processors):
        out = fn(ids, scores)
        if not isinstance(out, torch.Tensor) or out.shape != scores.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise KimiVLInputError(f"logits_processor[{i}] ({getattr(fn, '__name__', type(fn).__name__)}) returned "
                                   f"{got}; it must return scores of the shape it was given, {tuple(scores.shape)}")
        scores = out
    return scores


def _decode_fn(tokenizer: Any, skip_special_tokens: bool) -> Callable[[Sequence[int]], str]:
    """ids -> text with a tokenizer or a processor (anything with ``.decode`` or ``.tokenizer.decode``)."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    if not callable(getattr(tok, "decode", None)):
        raise KimiVLInputError(f"tokenizer must have a decode(ids) method, got {type(tokenizer).__name__}")
    return lambda ids: tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


class _StopStrings:
    """Per-row decoded new text; a row is done once its text contains one of the stop strings."""

    def __init__(self, stop_strings: list[str], decode: Callable[[Sequence[int]], str], batch_size: int) -> None:
        self.stop_strings = stop_strings
        self.decode = decode
        self.detokenizers = [IncrementalDetokenizer(decode) for _ in range(batch_size)]
        self.texts = [""] * batch_size

    def hits(self, tokens: list[int], active: list[bool]) -> list[bool]:
        out = []
        for row, (token, alive) in enumerate(zip(tokens, active)):
            hit = False
            if alive:
                before = len(self.texts[row])
                self.texts[row] += self.detokenizers[row].push(token)
                # only windows that end in the new text can hold a new match
                hit = any(s in self.texts[row][max(0, before - len(s) + 1):] for s in self.stop_strings)
            out.append(hit)
        return out


# ---------------------------------------------------------------------------------------------- the loop

def _check_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, context: int) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise KimiVLInputError(f"input_ids must be a (batch, seq_len) integer tensor, got {shape}")
    b, n = input_ids.shape
    if b == 0 or n == 0:
        raise KimiVLInputError(f"empty prompt: input_ids has shape {(b, n)}; generation needs at least one token")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise KimiVLInputError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    if input_ids.dtype not in (torch.int64, torch.int32):  # what nn.Embedding indexes with
        raise KimiVLInputError(f"input_ids must be int64 or int32 token ids, got {input_ids.dtype}")
    if n >= context:
        raise KimiVLInputError(
            f"the prompt has {n} tokens but the context is max_position_embeddings={context}: "
            f"it must be at most {context - 1} tokens to leave room for a new one"
        )
    if attention_mask is None:
        return
    if not isinstance(attention_mask, torch.Tensor):
        raise KimiVLInputError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
    if tuple(attention_mask.shape) != (b, n):
        raise KimiVLInputError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has {(b, n)}")
    # positions are cumsum(mask) - 1: a 2 or a 0.5 would shift them silently (checked once here, not per step)
    if attention_mask.is_complex():
        raise KimiVLInputError(f"attention_mask must be a bool, integer or float tensor of 0s and 1s, got "
                               f"{attention_mask.dtype}")
    bad = (attention_mask != 0) & (attention_mask != 1)
    if bool(bad.any()):
        raise KimiVLInputError(f"attention_mask must hold only 0 (pad) and 1 (token), got "
                               f"{attention_mask[bad][0].item()}")
    mask = attention_mask.bool()
    empty = (~mask.any(dim=-1)).nonzero().flatten().tolist()
    if empty:
        raise KimiVLInputError(f"empty prompt: row(s) {empty} of attention_mask have no tokens")
    right = (mask[:, :-1] & ~mask[:, 1:]).any(dim=-1).nonzero().flatten().tolist()
    if right:
        raise KimiVLInputError(
            f"row(s) {right} of attention_mask have a pad after a token: generation needs left padding "
            "(pads first, then the prompt)"
        )


@torch.inference_mode()
def _token_steps(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 pixel_values: torch.Tensor | None, image_grid_hws: torch.Tensor | None, config: GenerationConfig,
                 generator: torch.Generator | None, stops: _StopStrings | None,
                 record: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                 processors: Sequence[LogitsProcessor] = (), inputs_embeds: torch.Tensor | None = None,
                 ids_known: bool = True, prompt_cache: PromptCache | None = None) -> Iterator[torch.Tensor]:
    """Yield each step's new ids (B,) int64 until every row stopped or ``max_new_tokens`` were made; with
    ``record``, append each step's (scores, raw logits) to it; ``processors`` rewrite the logits of each step.
    ``inputs_embeds`` is the prompt when given; without ``ids_known``, ``input_ids`` only gives its shape (the
    repetition penalty and the processors then see the new ids alone, as in transformers). With
    ``prompt_cache``, the prefix it holds is read from it instead of prefilled, and it keeps this call's latents.

    (The decorator keeps inference mode on only while this generator runs, not while its consumer does.)
    """
    lm = _language_model(model)
    b, n = input_ids.shape
    max_new = config.max_new_tokens
    # The last token is returned, never fed back, so the cache needs one slot less than the output.
    max_len, device = n + max_new - 1, input_ids.device
    cache_dtype = latent_cache_dtype(lm.lm_head.weight.dtype, device)
    reuse, spans, kept = 0, [], None
    if prompt_cache is not None:
        spans = _image_spans(model, input_ids, pixel_values, image_grid_hws)
        reuse = prompt_cache.usable_prefix(input_ids[0].tolist(), spans, cache_dtype, device)
        kept = prompt_cache.cache if reuse else None  # the latents of the reused prefix
    graphs = None
    if cuda_graph.applies(lm, b, device):  # decode steps replayed from CUDA graphs; it owns the cache
        graphs = cuda_graph.graph_decoder_for(lm, b, max_len, cache_dtype, device)
        cache = graphs.cache
    elif kept is not None and kept.max_len >= max_len:  # written on in place: no copy
        cache = kept
    else:
        cache = MLACache.from_config(lm.config, b, max_len, device=device, dtype=cache_dtype)
    if kept is not None and cache is not kept:
        cache.data[:, :, :reuse].copy_(kept.data[:, :, :reuse])
    cache.length = reuse
    fed: list[int] = []  # new tokens fed back (their latents are in the cache)
    try:
        # An all-ones mask is dropped: attention then runs plain causal (SDPA's causal kernel, no mask tensors).
        full_mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            full_mask = torch.cat((attention_mask.long(), attention_mask.new_ones(b, max_new).long()), dim=1)
        if reuse:
            pixel_values, image_grid_hws = images_after(spans, reuse, pixel_values, image_grid_hws)
        logits = prefill(model, input_ids[:, reuse:], cache, None if full_mask is None else full_mask[:, :n],
                         pixel_values, image_grid_hws, inputs_embeds)
        if graphs is not None:
            graphs.start(None if full_mask is None else full_mask[:, :n])

        seen = None
        if config.repetition_penalty != 1.0:
            # counts, not a bool scatter: a pad id may also be a real prompt token of another position
            real = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
            seen = torch.zeros(b, logits.shape[-1], dtype=torch.long, device=logits.device)
            seen = seen.scatter_add_(1, input_ids, real * ids_known) > 0
        eos = frozenset(config.eos_ids())
        min_new = config.min_new_tokens or 0
        eos_index = torch.tensor(sorted(eos), dtype=torch.long, device=device) if eos and min_new else None
        rows = torch.arange(b, device=input_ids.device)
        # the ids so far, for logits processors (transformers passes them the (B, S + t) sequences)
        history = torch.cat((input_ids, input_ids.new_zeros(b, max_new)), dim=1) if processors else None
        first = 0 if ids_known else n  # where the ids the processors see start
        # Which rows stopped, as Python bools: the step's ids are read once (``tolist``) and checked here; the
        # tensor form (masked_fill, isin, or, all) was ~5 tensor ops per step around a bandwidth-bound decode step.
        finished = [False] * b
        for step in range(max_new):
            raw = logits.clone() if record is not None else logits  # a CUDA graph rewrites its output buffer
            if seen is not None:
                logits = apply_repetition_penalty(logits, seen, config.repetition_penalty)
            if eos_index is not None and step < min_new:  # no stop id before min_new_tokens
                logits = logits.index_fill(1, eos_index, float("-inf"))
            if history is not None:
                logits = _apply_processors(processors, history[:, first:n + step], logits)
            scores = warp_logits(logits, do_sample=config.do_sample, temperature=config.temperature,
                                 top_k=config.top_k, top_p=config.top_p, min_p=config.min_p)
            token = pick_token(scores, do_sample=config.do_sample, generator=generator)
            if record is not None:
                record.append((scores.clone() if scores.data_ptr() == logits.data_ptr() else scores, raw))
            if any(finished):  # stopped rows get the pad id
                token = token.masked_fill(torch.tensor(finished, device=token.device), config.pad_token_id)
            if history is not None:
                history[:, n + step] = token
            if seen is not None:
                seen[rows, token] = True
            ids = token.tolist()
            hits = stops.hits(ids, [not f for f in finished]) if stops is not None else repeat(False)
            finished = [f or i in eos or hit for f, i, hit in zip(finished, ids, hits)]
            yield token
            if step == max_new - 1 or all(finished):
                return
            if prompt_cache is not None:
                fed.append(ids[0])
            if graphs is not None:
                logits = graphs.step(token)
            else:
                mask = None if full_mask is None else full_mask[:, :cache.length + 1]
                logits = decode_step(model, token, cache, mask)
    finally:
        if prompt_cache is not None:
            _keep(prompt_cache, cache, graphs is not None, input_ids[0].tolist() + fed, spans, reuse)
        if graphs is not None:
            cuda_graph.release(graphs)


def _image_spans(model: nn.Module, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                 image_grid_hws: torch.Tensor | None) -> list[ImageSpan]:
    config = getattr(model, "config", None)
    if not hasattr(config, "media_placeholder_token_id"):
        return []  # a text-only model
    merge = config.vision_config.merge_kernel_size
    return image_spans(input_ids, pixel_values, image_grid_hws, config.media_placeholder_token_id,
                       (merge[0], merge[1]))


def _keep(prompt_cache: PromptCache, cache: MLACache, copy: bool, ids: list[int], spans: list[ImageSpan],
          reused: int) -> None:
    """After a generation (finished or stopped early): the cache now holds the latents of ``ids[:length]``."""
    length = cache.length
    if length > len(ids):  # a forward failed half-way; nothing trustworthy to keep
        prompt_cache.reset()
        return
    if copy:  # the CUDA graph runner's cache serves the next generation: keep a copy of what it holds
        kept = MLACache(cache.num_layers, 1, max(length, 1), cache.kv_lora_rank, cache.qk_rope_head_dim,
                        dtype=cache.dtype, device=cache.data.device)
        kept.data.copy_(cache.data[:, :, :max(length, 1)])
        kept.length, cache = length, kept
    prompt_cache.cache, prompt_cache.ids, prompt_cache.reused = cache, ids[:length], reused
    prompt_cache.spans = [span for span in spans if span.end <= length]


def _check_prompt_cache(prompt_cache: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                        inputs_embeds: torch.Tensor | None) -> None:
    if prompt_cache is None:
        return
    if not isinstance(prompt_cache, PromptCache):
        raise KimiVLInputError("prompt_cache must be a kimivl.generation.PromptCache, got "
                               f"{type(prompt_cache).__name__}")
    if input_ids.shape[0] != 1 or inputs_embeds is not None or (attention_mask is not None
                                                                 and not bool(attention_mask.all())):
        raise KimiVLInputError(f"prompt_cache serves one unpadded row of ids (a chat); got {input_ids.shape[0]} rows"
                               + (", inputs_embeds" if inputs_embeds is not None else "")
                               + (", a padded attention_mask" if attention_mask is not None
                                  and not bool(attention_mask.all()) else ""))


def _prepare(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
             overrides: dict[str, Any], seed: int | None, tokenizer: Any, base: Any = None
             ) -> tuple[torch.Tensor, torch.Tensor | None, GenerationConfig, torch.Generator | None,
                        _StopStrings | None]:
    """Validate everything before the first forward (so errors are raised by the call, not by iteration)."""
    lm = _language_model(model)
    config = resolve_generation_config(model, base, **overrides)
    _check_inputs(input_ids, attention_mask, lm.config.max_position_embeddings)
    n = input_ids.shape[1]
    room = lm.config.max_position_embeddings - n
    if config.max_new_tokens > room:
        logger.warning("max_new_tokens=%d would pass the context of %d tokens; generating at most %d",
                       config.max_new_tokens, lm.config.max_position_embeddings, room)
        config.max_new_tokens = room
    device = lm.lm_head.weight.device
    input_ids = input_ids.to(device=device, dtype=torch.long)  # int32 ids too: the output and scatters are int64
    attention_mask = attention_mask.to(device) if attention_mask is not None else None

    generator = None
    if config.do_sample:
        check_setting(seed is None or is_int(seed), "seed", seed, "must be an int or None")
        generator = torch.Generator(device=device)
        if seed is not None:
            generator.manual_seed(seed)
        else:  # a fresh nondeterministic seed, still without touching the global RNG
            generator.seed()
    stops = None
    if config.stop_strings:
        if tokenizer is None:
            raise KimiVLInputError(f"stop_strings={config.stop_strings!r} need a tokenizer to decode the new tokens "
                                   "(pass tokenizer=...)")
        strings = [config.stop_strings] if isinstance(config.stop_strings, str) else list(config.stop_strings)
        stops = _StopStrings(strings, _decode_fn(tokenizer, skip_special_tokens=False), input_ids.shape[0])
    return input_ids, attention_mask, config, generator, stops


def generate(model: nn.Module, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
             pixel_values: torch.Tensor | None = None, image_grid_hws: torch.Tensor | None = None,
             max_new_tokens: int | None = None, do_sample: bool | None = None, temperature: float | None = None,
             top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
             repetition_penalty: float | None = None, eos_token_id: int | list[int] | None = None,
             stop_strings: str | list[str] | None = None, seed: int | None = None, streamer: Streamer | None = None,
             tokenizer: Any = None, pad_token_id: int | None = None, *, min_new_tokens: int | None = None,
             max_length: int | None = None, generation_config: Any = None, num_beams: int | None = None,
             use_cache: bool | None = None, return_dict_in_generate: bool = False, output_scores: bool = False,
             output_logits: bool = False, logits_processor: Any = None, inputs_embeds: torch.Tensor | None = None,
             num_return_sequences: int | None = None,
             prompt_cache: PromptCache | None = None) -> torch.Tensor | GenerateOutput:
    """Generate new tokens after each (left-padded) prompt row; returns (B, S + new) int64 ids.

    input_ids: (B, S); attention_mask: (B, S), 1 = token, 0 = left pad; pixel_values / image_grid_hws as from
    the processor (encoded once, at prefill). ``None`` settings come from ``model.generation_config`` (then the
    :class:`GenerationConfig` defaults). A row stops after emitting one of ``eos_token_id`` or once its new text
    contains a stop string (needs ``tokenizer``); later positions of a stopped row hold ``pad_token_id``; the
    output ends when every row stopped or ``max_new_tokens`` were made. ``seed`` seeds a private
    ``torch.Generator`` for sampling. ``streamer.put`` gets the prompt (B, S) and then each step's (B,) ids.
    Raises :class:`~kimivl.errors.KimiVLInputError` for empty or over-long prompts and invalid settings.

    transformers' spellings: ``min_new_tokens`` (no stop id before that many new tokens), ``max_length`` (prompt +
    new tokens; ``max_new_tokens`` wins when both are given), ``generation_config`` (its set values override
    ``model.generation_config``, the arguments override both), ``return_dict_in_generate`` with
    ``output_scores`` / ``output_logits`` (a :class:`GenerateOutput`), ``logits_processor`` (callables
    ``(ids so far, scores) -> scores``, run on each step's logits after the repetition penalty and
    ``min_new_tokens``, before temperature and the filters);
    ``num_beams`` may only be 1 (no beam search) and ``use_cache`` changes nothing (the latent cache is always
    used; the output is the same without it). ``inputs_embeds`` (B, S, hidden) is the prompt's embeddings in place
    of ``input_ids``' (images already in them); without ``input_ids`` the output holds the new ids only.
    ``num_return_sequences`` (sampling only) answers each prompt that many times, rows ``b * k ... b * k + k - 1``
    of the output for prompt ``b``; the images are encoded once.

    ``prompt_cache`` (a :class:`~kimivl.generation.prompt_cache.PromptCache`, one unpadded row): the prefix this
    prompt shares with the cache's last generation is read from it, not prefilled again (images included), and
    the cache keeps this generation's latents for the next turn.
    """
    processors = _processor_list(logits_processor)
    ids_known = input_ids is not None
    if inputs_embeds is not None:
        input_ids = _embeds_prompt(model, inputs_embeds, input_ids, pixel_values)
    elif input_ids is None:
        raise KimiVLInputError("pass input_ids (or inputs_embeds) to generate from")
    check_setting(num_beams is None or num_beams == 1, "num_beams", num_beams,
           "must be 1: beam search is not implemented (greedy with do_sample=False, or sampling)")
    check_setting(use_cache is None or isinstance(use_cache, bool), "use_cache", use_cache, "must be True or False")
    if streamer is not None and not (callable(getattr(streamer, "put", None))
                                     and callable(getattr(streamer, "end", None))):
        raise KimiVLInputError("streamer must have put(ids) and end() methods (as transformers' TextStreamer), got "
                               f"{type(streamer).__name__}")
    check_tensors(pixel_values=pixel_values, image_grid_hws=image_grid_hws)
    max_new_tokens = _max_new_tokens(max_new_tokens, max_length, input_ids)
    overrides = dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=do_sample,
                     temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                     repetition_penalty=repetition_penalty, eos_token_id=eos_token_id, stop_strings=stop_strings,
                     pad_token_id=pad_token_id)
    k = 1 if num_return_sequences is None else num_return_sequences
    check_setting(is_int(k) and k >= 1, "num_return_sequences", k, "must be a positive integer")
    input_ids, attention_mask, config, generator, stops = _prepare(model, input_ids, attention_mask, overrides,
                                                                   seed, tokenizer, generation_config)
    if k > 1:
        check_setting(config.do_sample, "num_return_sequences", k,
               "needs do_sample=True: greedy answers to one prompt are all the same")
        input_ids, attention_mask, inputs_embeds = _repeat_prompts(model, k, input_ids, attention_mask, pixel_values,
                                                                   image_grid_hws, inputs_embeds)
        pixel_values = image_grid_hws = None
        if stops is not None:
            stops = _StopStrings(stops.stop_strings, stops.decode, input_ids.shape[0])
    _check_prompt_cache(prompt_cache, input_ids, attention_mask, inputs_embeds)
    record: list[tuple[torch.Tensor, torch.Tensor]] | None = [] if output_scores or output_logits else None
    if inputs_embeds is not None:
        inputs_embeds = inputs_embeds.to(device=input_ids.device, dtype=_language_model(model).lm_head.weight.dtype)
    prompt = input_ids if ids_known else input_ids[:, :0]  # what the output and the streamer get of the prompt
    if streamer is not None:
        streamer.put(prompt.cpu())
    tokens = []
    for token in _token_steps(model, input_ids, attention_mask, pixel_values, image_grid_hws, config, generator,
                              stops, record, processors, inputs_embeds, ids_known, prompt_cache):
        tokens.append(token)
        if streamer is not None:
            streamer.put(token.cpu())
    if streamer is not None:
        streamer.end()
    sequences = torch.cat((prompt, torch.stack(tokens, dim=1)), dim=1)
    if not return_dict_in_generate:
        return sequences
    steps = record or []
    return GenerateOutput(sequences, scores=tuple(s for s, _ in steps) if output_scores else None,
                          logits=tuple(raw for _, raw in steps) if output_logits else None)


def stream(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
           pixel_values: torch.Tensor | None = None, image_grid_hws: torch.Tensor | None = None, *,
           tokenizer: Any, max_new_tokens: int | None = None, do_sample: bool | None = None,
           temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
           min_p: float | None = None, repetition_penalty: float | None = None,
           eos_token_id: int | list[int] | None = None, stop_strings: str | list[str] | None = None,
           seed: int | None = None, pad_token_id: int | None = None, min_new_tokens: int | None = None,
           skip_special_tokens: bool = True, max_length: int | None = None, generation_config: Any = None,
           logits_processor: Any = None, prompt_cache: PromptCache | None = None) -> Iterator[str]:
    """Generate for one prompt row and yield the new text as it grows (UTF-8 safe deltas).

    Same settings as :func:`generate` (``max_length``, ``generation_config``, ``logits_processor`` and
    ``prompt_cache`` too);
    ``tokenizer`` (or a processor) decodes. A delta is held back while the text ends inside a multi-byte
    character, so ``"".join(stream(...))`` equals ``tokenizer.decode(new_ids,
    skip_special_tokens=skip_special_tokens)``. Arguments are checked by this call; the model runs as the
    iterator is consumed.
    """
    processors = _processor_list(logits_processor)
    check_tensors(pixel_values=pixel_values, image_grid_hws=image_grid_hws)
    max_new_tokens = _max_new_tokens(max_new_tokens, max_length, input_ids)
    overrides = dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=do_sample,
                     temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                     repetition_penalty=repetition_penalty, eos_token_id=eos_token_id, stop_strings=stop_strings,
                     pad_token_id=pad_token_id)
    decode = _decode_fn(tokenizer, skip_special_tokens)
    input_ids, attention_mask, config, generator, stops = _prepare(model, input_ids, attention_mask, overrides,
                                                                   seed, tokenizer, generation_config)
    if input_ids.shape[0] != 1:
        raise KimiVLInputError(f"stream() takes one prompt row, got a batch of {input_ids.shape[0]}; "
                               "use generate() for batches")
    _check_prompt_cache(prompt_cache, input_ids, attention_mask, None)
    steps = _token_steps(model, input_ids, attention_mask, pixel_values, image_grid_hws, config, generator, stops,
                         processors=processors, prompt_cache=prompt_cache)
    return _text_deltas(steps, IncrementalDetokenizer(decode))


def _text_deltas(steps: Iterator[torch.Tensor], detokenizer: IncrementalDetokenizer) -> Iterator[str]:
    for token in steps:
        delta = detokenizer.push(int(token[0]))
        if delta:
            yield delta
    tail = detokenizer.flush()
    if tail:
        yield tail
