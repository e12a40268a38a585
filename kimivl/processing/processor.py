"""``KimiVLProcessor``: chat template + media sources + image processor + tokenizer -> model inputs.

Spec: ``shared/reference/kimivl-spec.md`` §6.1 (splicing: each ``<|media_pad|>`` becomes ``h*w/4`` copies,
images consumed left to right across the batch) and §6.3. Beyond the official processor: video and
document blocks (``VIDEO_BLOCK`` / ``DOCUMENT_BLOCK`` in the text) expand into timestamped frames / marked
pages, batches are padded (left by default), labels for training come from the same renderer, and
``preflight`` counts tokens from metadata before any pixel is decoded. This module never changes pixels.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from kimivl.errors import KimiVLInputError
from kimivl.processing.chat_template import (DOCUMENT_BLOCK, IMAGE_BLOCK, MEDIA_PAD, VIDEO_BLOCK, ChatRenderer,
                                             MediaItem, prepare_messages)
from kimivl.processing.document import DocumentOptions, plan_document
from kimivl.processing.image_processing import PREPROCESSOR_CONFIG_FILE, KimiVLImageProcessor
from kimivl.processing.media import MediaPlan, describe_source, plan_image
from kimivl.processing.tokenizer import KimiVLTokenizer
from kimivl.processing.video import VideoDecoder, VideoOptions, plan_video

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
_PLACEHOLDER = re.compile(r"<\|media_start\|>(video|document)<\|media_content\|><\|media_pad\|><\|media_end\|>"
                          r"|<\|media_pad\|>")
_KINDS = ("image", "video", "document")
# Tokenizer options transformers' processors take that change nothing here. No truncation: cutting a prompt
# could cut an image's placeholders (a prompt over the context is refused by generate, by name).
_IGNORED_OPTIONS = frozenset({"truncation", "return_attention_mask", "add_special_tokens", "return_token_type_ids",
                              "verbose"})


class KimiVLBatch(dict):
    """Model inputs: a dict that also allows attribute access (``batch.input_ids``) and ``.to(device)``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"KimiVLBatch has no field {name!r} (fields: {sorted(self)})") from None

    def to(self, device: str | torch.device | torch.dtype | None = None, *,
           dtype: torch.dtype | None = None) -> KimiVLBatch:
        """Tensors moved to ``device``; ``dtype`` (or a dtype as first argument) casts float tensors only."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        out = KimiVLBatch()
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                cast = dtype if dtype is not None and value.is_floating_point() else None
                value = value.to(device=device, dtype=cast)
            out[key] = value
        return out


@dataclass(frozen=True)
class MediaCount:
    """Token cost of one media item; ``source`` is its label (kind, index, where it came from), ``blocks`` the
    number of image blocks (1, or its frames / pages), ``sizes`` the size of each as the image processor sees it."""

    kind: str
    index: int
    source: str
    tokens: int
    blocks: int
    sizes: list[tuple[int, int]]
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PreflightReport:
    """Token counts of a conversation computed from metadata only."""

    media: list[MediaCount]
    text_tokens: int
    total_tokens: int
    context_length: int | None

    def summary(self) -> str:
        parts = [f"text {self.text_tokens}"]
        parts += [f"{m.source}: {m.tokens}" + (f" in {m.blocks} blocks" if m.blocks > 1 else "") for m in self.media]
        return f"{self.total_tokens} tokens = " + ", ".join(parts)


class KimiVLProcessor:
    """Turns conversations (or rendered text plus media) into ``input_ids``, ``attention_mask``,
    ``pixel_values`` and ``image_grid_hws``."""

    image_token = MEDIA_PAD

    def __init__(self, image_processor: KimiVLImageProcessor, tokenizer: KimiVLTokenizer,
                 chat_template: str | None = None, *, context_length: int | None = None,
                 video_options: VideoOptions | dict[str, Any] | None = None,
                 document_options: DocumentOptions | dict[str, Any] | None = None,
                 video_decoder: VideoDecoder | None = None, padding_side: str | None = None) -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = chat_template if chat_template is not None else tokenizer.chat_template
        self.renderer = ChatRenderer(self.chat_template, tokenizer.special_tokens)
        # variables HF passes to every chat template (some templates write {{ bos_token }})
        self._template_vars = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token,
                               "pad_token": tokenizer.pad_token, "unk_token": tokenizer.unk_token}
        # the setters below check each value now, not at the first call that uses it
        self.context_length = context_length
        self.video_options = video_options
        self.document_options = document_options
        self.video_decoder = video_decoder
        if padding_side is not None:
            self.padding_side = padding_side
        self.image_token_id = tokenizer.special_token_id(MEDIA_PAD)

    @property
    def padding_side(self) -> str:
        return self.tokenizer.padding_side

    @padding_side.setter
    def padding_side(self, value: str) -> None:
        if value not in ("left", "right"):
            raise KimiVLInputError(f"padding_side must be 'left' or 'right', got {value!r}")
        self.tokenizer.padding_side = value

    @property
    def context_length(self) -> int | None:
        """Longest prompt (plus new tokens, in preflight) accepted; None turns the checks off."""
        return self._context_length

    @context_length.setter
    def context_length(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise KimiVLInputError(f"context_length must be a positive integer or None (no check), got {value!r}")
        self._context_length = value

    @property
    def video_options(self) -> VideoOptions:
        """Default sampling and budget of videos (a ``VideoOptions``; a dict of its fields is accepted)."""
        return self._video_options

    @video_options.setter
    def video_options(self, value: VideoOptions | dict[str, Any] | None) -> None:
        self._video_options = _options(value, VideoOptions(), "video_options")

    @property
    def document_options(self) -> DocumentOptions:
        """Default rendering and budget of PDFs (a ``DocumentOptions``; a dict of its fields is accepted)."""
        return self._document_options

    @document_options.setter
    def document_options(self, value: DocumentOptions | dict[str, Any] | None) -> None:
        self._document_options = _options(value, DocumentOptions(), "document_options")

    @property
    def video_decoder(self) -> VideoDecoder | None:
        """The video backend; None: ``PyAVDecoder``, created when a video file is first planned."""
        return self._video_decoder

    @video_decoder.setter
    def video_decoder(self, value: VideoDecoder | None) -> None:
        missing = [m for m in ("probe", "frames_at") if not callable(getattr(value, m, None))]
        if value is not None and missing:
            raise KimiVLInputError(f"video_decoder must have the VideoDecoder methods probe(source, label) and "
                                   f"frames_at(source, timestamps, label); {type(value).__name__} lacks "
                                   f"{' and '.join(missing)}")
        self._video_decoder = value

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike[str], *, revision: str | None = None,
                        cache_dir: str | None = None, trust_remote_code: bool | None = None,
                        **kwargs: Any) -> KimiVLProcessor:
        """Read ``preprocessor_config.json``, ``tiktoken.model`` + ``tokenizer_config.json``, the chat template
        (``chat_template.jinja``, else the ``chat_template`` key) and, if present, ``config.json`` (context
        length, placeholder id) from a checkpoint directory or hub id. Other keyword arguments are the
        constructor's; ``trust_remote_code`` is accepted for Hugging Face examples and changes nothing."""
        from kimivl.checkpoint import resolve_checkpoint_dir
        from kimivl.configuration import KimiVLConfig

        del trust_remote_code  # no checkpoint code is ever run
        directory = resolve_checkpoint_dir(path_or_id, revision=revision, cache_dir=cache_dir)
        if (directory / PREPROCESSOR_CONFIG_FILE).is_file():
            image_processor = KimiVLImageProcessor.from_pretrained(directory / PREPROCESSOR_CONFIG_FILE)
        else:
            logger.warning("no %s in %s: using the released Kimi-VL-A3B image settings", PREPROCESSOR_CONFIG_FILE,
                           directory)
            image_processor = KimiVLImageProcessor()
        # Optional per-checkpoint media budgets: "video_options" / "document_options" dicts in
        # preprocessor_config.json (keys as VideoOptions / DocumentOptions fields).
        for key, default in (("video_options", VideoOptions()), ("document_options", DocumentOptions())):
            value = image_processor.extra.get(key)
            if key in kwargs or value is None:
                continue
            if not isinstance(value, dict):
                raise KimiVLInputError(f"{PREPROCESSOR_CONFIG_FILE} {key} must be a mapping of "
                                       f"{type(default).__name__} fields, got {type(value).__name__} {value!r:.60}")
            kwargs[key] = default.updated(value, f"{PREPROCESSOR_CONFIG_FILE} {key}")
        tokenizer = KimiVLTokenizer.from_pretrained(directory)
        template = None
        if (directory / "chat_template.jinja").is_file():
            template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
        elif tokenizer.chat_template is None:
            for name in ("chat_template.json", "processor_config.json"):
                if (directory / name).is_file():
                    value = json.loads((directory / name).read_text(encoding="utf-8")).get("chat_template")
                    if isinstance(value, str):
                        template = value
                        break
        if (directory / "config.json").is_file() and "context_length" not in kwargs:
            config = KimiVLConfig.from_json_file(directory / "config.json")
            kwargs["context_length"] = config.text_config.max_position_embeddings
            pad_id = tokenizer.special_token_id(MEDIA_PAD)
            if config.media_placeholder_token_id != pad_id:
                raise KimiVLInputError(f"config.json media_placeholder_token_id={config.media_placeholder_token_id} "
                                       f"but the tokenizer's {MEDIA_PAD} is id {pad_id}")
        return cls(image_processor, tokenizer, template, **kwargs)

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        """Write what :meth:`from_pretrained` reads: ``preprocessor_config.json`` (with ``video_options`` /
        ``document_options`` where they differ from the defaults or were in the file read), ``tiktoken.model``,
        ``tokenizer_config.json`` and ``chat_template.jinja``, so ``save_pretrained(d)`` of the model and the
        processor gives a directory both load from."""
        directory = Path(directory)
        image_processor = KimiVLImageProcessor.from_dict(self.image_processor.to_dict())
        for key, value, default in (("video_options", self.video_options, VideoOptions()),
                                    ("document_options", self.document_options, DocumentOptions())):
            if value != default or key in image_processor.extra:
                read = image_processor.extra.get(key) or {}  # its keys, and those that differ from the defaults
                image_processor.extra[key] = {k: v for k, v in dataclasses.asdict(value).items()
                                              if k in read or v != getattr(default, k)}
        image_processor.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        if self.chat_template is not None:
            (directory / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")

    # ------------------------------------------------------------------ media planning
    def _plan(self, item: MediaItem) -> MediaPlan:
        if item.kind == "image":
            return plan_image(item.source, self.image_processor, label=item.label)
        if item.kind == "video":
            options = self.video_options.updated(item.options, item.label)
            return plan_video(item.source, self.image_processor, options, label=item.label, decoder=self.video_decoder)
        options = self.document_options.updated(item.options, item.label)
        return plan_document(item.source, self.image_processor, options, label=item.label)

    def _expand(self, text: str, plans: dict[str, list[MediaPlan]], used: dict[str, int],
                mask: bytearray | None) -> tuple[str, list[MediaPlan], bytearray | None]:
        """Replace video/document blocks by their frames/pages; the text keeps one pad per image block."""
        pieces: list[str] = []
        out_mask = bytearray() if mask is not None else None
        order: list[MediaPlan] = []
        pos = 0
        for match in _PLACEHOLDER.finditer(text):
            kind = match.group(1) or "image"
            plan = plans[kind][used[kind]]
            used[kind] += 1
            order.append(plan)
            chunk = text[pos:match.start()]
            if kind == "image":
                chunk, replacement = text[pos:match.end()], ""
            else:
                replacement = "".join(b.prefix + IMAGE_BLOCK for b in plan.blocks) + plan.suffix
            pieces += [chunk, replacement]
            if out_mask is not None and mask is not None:
                out_mask += mask[pos:pos + len(chunk)] + bytes([mask[match.start()]]) * len(replacement)
            pos = match.end()
        pieces.append(text[pos:])
        if out_mask is not None and mask is not None:
            out_mask += mask[pos:]
        return "".join(pieces), order, out_mask

    @staticmethod
    def _count(texts: Sequence[str]) -> dict[str, int]:
        counts = dict.fromkeys(_KINDS, 0)
        for text in texts:
            for match in _PLACEHOLDER.finditer(text):
                counts[match.group(1) or "image"] += 1
        return counts

    @staticmethod
    def _as_media_list(value: Any, kind: str) -> list[Any]:
        if value is None:
            return []
        if isinstance(value, (np.ndarray, torch.Tensor)):
            # one image (2-D / 3-D) or one video (4-D frames); one more axis is a batch of them
            return list(value) if value.ndim == (4 if kind == "image" else 5) else [value]
        if isinstance(value, (str, os.PathLike, bytes, bytearray, Image.Image, dict)):
            return [value]
        items = list(value)
        if kind == "video" and items and all(isinstance(v, Image.Image) for v in items):
            return [items]  # one video given as a list of frames
        if kind == "image" and any(isinstance(v, (list, tuple)) for v in items):
            return [img for sub in items for img in (sub if isinstance(sub, (list, tuple)) else [sub])]
        return items

    # ------------------------------------------------------------------ __call__
    def __call__(self, text: str | Sequence[str] | None = None, images: Any = None, videos: Any = None,
                 documents: Any = None, *, return_tensors: str | None = "pt", padding: bool | str = True,
                 padding_side: str | None = None, max_length: int | None = None, **options: Any) -> KimiVLBatch:
        """Tokenise ``text`` (one or a batch) with media consumed in the order their blocks appear:
        ``images`` for ``<|media_pad|>``, ``videos`` for ``VIDEO_BLOCK``, ``documents`` for
        ``DOCUMENT_BLOCK`` (each a source, or a dict ``{"video": src, "fps": ...}`` with options).
        transformers' ``truncation``, ``return_attention_mask``, ``add_special_tokens``, ``return_token_type_ids``
        and ``verbose`` are accepted and change nothing; any other keyword is a ``TypeError``."""
        unknown = sorted(set(options) - _IGNORED_OPTIONS)
        if unknown:
            named = [n for n in inspect.signature(KimiVLProcessor.__call__).parameters if n not in ('self', 'options')]
            known = [*named, *sorted(_IGNORED_OPTIONS)]
            hint = difflib.get_close_matches(unknown[0], known, n=1)
            raise TypeError(f"KimiVLProcessor() got an unexpected keyword argument {unknown[0]!r}"
                            + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        if text is None:
            raise KimiVLInputError("text is required (render a conversation with apply_chat_template first)")
        texts = [text] if isinstance(text, str) else list(text) if isinstance(text, (list, tuple)) else [text]
        if not texts or not all(isinstance(t, str) for t in texts):
            bad = next((type(t).__name__ for t in texts if not isinstance(t, str)), "an empty list")
            raise KimiVLInputError(f"text must be a string or a non-empty list of strings, got {bad} (pass media "
                                   "by keyword: processor(text=..., images=...))")
        given = {"image": self._as_media_list(images, "image"), "video": self._as_media_list(videos, "video"),
                 "document": self._as_media_list(documents, "document")}
        items = {k: [self._media_item(k, i, src) for i, src in enumerate(v)] for k, v in given.items()}
        return self._encode(texts, items, None, return_tensors=return_tensors, padding=padding,
                            padding_side=padding_side, max_length=max_length)

    @staticmethod
    def _media_item(kind: str, index: int, source: Any) -> MediaItem:
        if kind != "image" and isinstance(source, dict) and kind in source:
            options = {k: v for k, v in source.items() if k != kind}
            return MediaItem(kind, source[kind], options, f"{kind} {index} ({describe_source(source[kind])})")
        return MediaItem(kind, source, {}, f"{kind} {index} ({describe_source(source)})")

    def _check_counts(self, texts: Sequence[str], items: dict[str, list[MediaItem]]) -> None:
        counts = self._count(texts)
        marker = {"image": f"{MEDIA_PAD} image placeholders", "video": "video blocks", "document": "document blocks"}
        problems = [f"{counts[k]} {marker[k]} in the text but {len(items[k])} {k}s given"
                    for k in _KINDS if counts[k] != len(items[k])]
        if problems:
            raise KimiVLInputError("; ".join(problems) + " (each image needs one <|media_pad|>, e.g. "
                                   f"{IMAGE_BLOCK}; videos need {VIDEO_BLOCK}; documents {DOCUMENT_BLOCK})")

    def _encode(self, texts: list[str], items: dict[str, list[MediaItem]], masks: list[bytearray] | None, *,
                return_tensors: str | None, padding: bool | str, padding_side: str | None,
                max_length: int | None) -> KimiVLBatch:
        self._check_counts(texts, items)
        plans = {k: [self._plan(it) for it in v] for k, v in items.items()}
        used = dict.fromkeys(_KINDS, 0)
        rows, label_rows, images, block_tokens = [], [], [], []
        for b, raw in enumerate(texts):
            final, order, mask = self._expand(raw, plans, used, masks[b] if masks else None)
            ids = self.tokenizer.encode(final)
            counts = [blk.tokens for plan in order for blk in plan.blocks]
            pad_positions = [i for i, t in enumerate(ids) if t == self.image_token_id]
            if len(pad_positions) != len(counts):
                raise KimiVLInputError(f"text {b}: {len(pad_positions)} {MEDIA_PAD} tokens after tokenising but "
                                       f"{len(counts)} image blocks planned")
            labels = self._labels(final, ids, mask) if mask is not None else None
            rows.append(_repeat_at(ids, pad_positions, counts))
            if labels is not None:
                for pos in pad_positions:
                    labels[pos] = IGNORE_INDEX
                label_rows.append(_repeat_at(labels, pad_positions, counts))
            for plan in order:
                images += plan.load()
            block_tokens += counts
        if self.context_length is not None:
            longest = max(range(len(rows)), key=lambda i: len(rows[i]))
            if len(rows[longest]) > self.context_length:
                raise KimiVLInputError(f"text {longest} is {len(rows[longest])} tokens, over the model context of "
                                       f"{self.context_length}; use preflight() to see the cost per media item")
        out = KimiVLBatch()
        if images:
            pixels = self.image_processor.preprocess(images)
            grids = pixels["image_grid_hws"]
            merge = self.image_processor.merge_kernel_size[0] * self.image_processor.merge_kernel_size[1]
            produced = (grids[:, 0] * grids[:, 1] // merge).tolist()
            if produced != block_tokens:  # the plan and the pixels must agree
                raise KimiVLInputError(f"image token counts {produced} differ from the planned {block_tokens}")
            out["pixel_values"], out["image_grid_hws"] = pixels["pixel_values"], grids
        out.update(self._pad(rows, label_rows or None, return_tensors=return_tensors, padding=padding,
                             padding_side=padding_side or self.padding_side, max_length=max_length))
        return KimiVLBatch({k: out[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values",
                                                "image_grid_hws") if k in out})

    def _labels(self, text: str, ids: list[int], mask: bytearray) -> list[int]:
        decoded, offsets = self.tokenizer.decode_with_offsets(ids)
        if decoded != text:
            raise KimiVLInputError("cannot align tokens with characters for the loss mask (text does not round-trip)")
        return [t if mask[o] else IGNORE_INDEX for t, o in zip(ids, offsets)]

    def _pad(self, rows: list[list[int]], label_rows: list[list[int]] | None, *, return_tensors: str | None,
             padding: bool | str, padding_side: str, max_length: int | None) -> dict[str, Any]:
        if padding_side not in ("left", "right"):
            raise KimiVLInputError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        longest = max(len(r) for r in rows)
        if padding in (True, "longest"):
            target = longest
        elif padding == "max_length":
            if max_length is None or max_length < longest:
                raise KimiVLInputError(f"padding='max_length' needs max_length >= the longest text ({longest} "
                                       f"tokens), got {max_length}")
            target = max_length
        elif padding in (False, "do_not_pad"):
            target = None
        else:
            raise KimiVLInputError(f"padding must be True/'longest', 'max_length' or False, got {padding!r}")
        masks = [[1] * len(r) for r in rows]
        if target is not None:
            def pad(row: list[int], value: int) -> list[int]:
                fill = [value] * (target - len(row))
                return fill + row if padding_side == "left" else row + fill

            masks = [pad(m, 0) for m in masks]
            rows = [pad(r, self.tokenizer.pad_token_id) for r in rows]
            label_rows = [pad(r, IGNORE_INDEX) for r in label_rows] if label_rows else None
        out: dict[str, Any] = {"input_ids": rows, "attention_mask": masks}
        if label_rows:
            out["labels"] = label_rows
        if return_tensors is None:
            return out
        if len({len(r) for r in rows}) > 1:
            raise KimiVLInputError(f"texts have different lengths {sorted({len(r) for r in rows})}; pass padding=True "
                                   "to stack them into one tensor")
        if return_tensors == "pt":
            return {k: torch.tensor(v, dtype=torch.int64) for k, v in out.items()}
        if return_tensors == "np":
            return {k: np.asarray(v, dtype=np.int64) for k, v in out.items()}
        raise KimiVLInputError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")

    # ------------------------------------------------------------------ chat
    def _conversations(self, conversation: Any) -> tuple[list[Any], bool]:
        if isinstance(conversation, (list, tuple)) and conversation and isinstance(conversation[0], (list, tuple)):
            return list(conversation), True
        return [conversation], False

    def apply_chat_template(self, conversation: Any, *, add_generation_prompt: bool = False, tokenize: bool = False,
                            return_dict: bool = False, return_tensors: str | None = None,
                            padding: bool | str = True, padding_side: str | None = None,
                            max_length: int | None = None, return_labels: bool = False,
                            chat_template: str | None = None, continue_final_message: bool = False,
                            return_assistant_tokens_mask: bool = False, **template_kwargs: Any) -> Any:
        """Render one conversation (or a list of them). ``tokenize=False``: the text (str, or list of str);
        ``tokenize=True``: the processor output with the media taken from the messages (``return_dict``) or
        just ``input_ids``. ``return_labels=True`` adds ``labels`` (-100 except assistant content and its
        end token) from the same rendering; it needs ``tokenize=True`` and no generation prompt.
        ``chat_template`` renders this call with another template instead of the processor's.
        ``continue_final_message`` ends the text right after the last message's content (no end-of-turn), so
        generation continues that message, e.g. an assistant answer begun by the caller (transformers' rule).
        ``return_assistant_tokens_mask`` (with ``tokenize`` and ``return_dict``) adds ``assistant_masks``: 1 where
        ``labels`` would train (assistant content and its end token), as transformers / TRL read it."""
        wants_labels = return_labels
        if return_assistant_tokens_mask:
            if not (tokenize and return_dict):
                raise KimiVLInputError("return_assistant_tokens_mask needs tokenize=True and return_dict=True")
            return_labels = True
        if continue_final_message and (add_generation_prompt or return_labels):
            raise KimiVLInputError("continue_final_message continues the last message: it cannot come with "
                                   "add_generation_prompt or return_labels")
        convs, batched = self._conversations(conversation)
        template_kwargs = {**self._template_vars, **template_kwargs}
        renderer = self.renderer if chat_template is None else ChatRenderer(chat_template,
                                                                             self.tokenizer.special_tokens)
        if return_labels and (not tokenize or add_generation_prompt):
            what = "return_labels" if wants_labels else "return_assistant_tokens_mask"
            raise KimiVLInputError(f"{what} needs tokenize=True and add_generation_prompt=False")
        prepared = [prepare_messages(c, need_sources=tokenize, roles=renderer.roles) for c in convs]
        masks: list[bytearray] | None = None
        if return_labels:  # (only with tokenize)
            rendered = [renderer.render_with_mask(m, **template_kwargs) for m, _ in prepared]
            texts = [r.text for r in rendered]
            masks = [_span_mask(len(r.text), r.trainable_spans) for r in rendered]
        else:
            texts = [renderer.render(m, add_generation_prompt=add_generation_prompt, **template_kwargs)
                     for m, _ in prepared]
            if continue_final_message:
                texts = [_cut_after_final_message(t, c) for t, c in zip(texts, convs)]
        if not tokenize:
            return texts if batched else texts[0]
        items = {k: [it for _, media in prepared for it in media if it.kind == k] for k in _KINDS}
        out = self._encode(texts, items, masks, return_tensors=return_tensors, padding=padding,
                           padding_side=padding_side, max_length=max_length)
        if return_assistant_tokens_mask:
            labels = out["labels"] if wants_labels else out.pop("labels")
            if isinstance(labels, torch.Tensor):
                out["assistant_masks"] = (labels != IGNORE_INDEX).long()
            elif isinstance(labels, np.ndarray):
                out["assistant_masks"] = (labels != IGNORE_INDEX).astype(np.int64)
            else:
                out["assistant_masks"] = [[int(v != IGNORE_INDEX) for v in row] for row in labels]
        return out if return_dict else out["input_ids"]

    # ------------------------------------------------------------------ preflight
    def preflight(self, conversation: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True,
                  max_new_tokens: int = 0, check: bool = True, **template_kwargs: Any) -> PreflightReport:
        """Token count per media item and in total, from metadata only (image headers, video container,
        PDF page sizes; no pixels decoded). With ``check``, a conversation that does not fit the context
        (``total + max_new_tokens > context_length``) raises ``KimiVLInputError``."""
        messages, media = prepare_messages(conversation, need_sources=True, roles=self.renderer.roles)
        template_kwargs = {**self._template_vars, **template_kwargs}
        text = self.renderer.render(messages, add_generation_prompt=add_generation_prompt, **template_kwargs)
        items = {k: [it for it in media if it.kind == k] for k in _KINDS}
        self._check_counts([text], items)
        plans = {k: [self._plan(it) for it in v] for k, v in items.items()}
        final, order, _ = self._expand(text, plans, dict.fromkeys(_KINDS, 0), None)
        n_ids = len(self.tokenizer.encode(final))
        n_blocks = sum(len(p.blocks) for p in order)
        media_tokens = sum(p.tokens for p in order)
        total = n_ids - n_blocks + media_tokens
        counts = [MediaCount(p.kind, next(i for i, x in enumerate(plans[p.kind]) if x is p), p.label, p.tokens,
                             len(p.blocks), [(b.width, b.height) for b in p.blocks], dict(p.detail))
                  for p in order]
        report = PreflightReport(counts, total - media_tokens, total, self.context_length)
        if check and self.context_length is not None and total + max_new_tokens > self.context_length:
            raise KimiVLInputError(
                f"the conversation needs {total} tokens" + (f" + {max_new_tokens} new tokens" if max_new_tokens else "")
                + f" but the model context is {self.context_length} ({report.summary()}); lower the image "
                "in_token_limit, the video max_tokens/max_frames or the document max_pages/max_tokens, or "
                "send fewer media")
        return report

    # ------------------------------------------------------------------ decoding
    def decode(self, ids: Any, *, skip_special_tokens: bool = False, **_: Any) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Any, *, skip_special_tokens: bool = False, **_: Any) -> list[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens)


def _options(value: Any, default: Any, name: str) -> Any:
    """``video_options`` / ``document_options`` as the options dataclass: None is the default, a dict (as in
    preprocessor_config.json) replaces its keys (unknown keys and wrong types refused by name)."""
    if value is None:
        return default
    if isinstance(value, dict):
        return default.updated(value, name)
    if isinstance(value, type(default)):
        return value.updated({}, name)  # range checks (fps > 0, ...) now rather than at the first video
    raise KimiVLInputError(f"{name} must be a {type(default).__name__} or a dict of its fields, got "
                           f"{type(value).__name__} {value!r:.60}")


def _repeat_at(ids: list[int], positions: list[int], counts: list[int]) -> list[int]:
    """``ids`` with the token at each position repeated ``count`` times."""
    out: list[int] = []
    prev = 0
    for pos, n in zip(positions, counts):
        out += ids[prev:pos]
        out += [ids[pos]] * n
        prev = pos + 1
    out += ids[prev:]
    return out


def _span_mask(length: int, spans: Sequence[tuple[int, int]]) -> bytearray:
    mask = bytearray(length + 1)  # one spare so an offset at the very end is readable
    for start, end in spans:
        mask[start:end] = b"\x01" * (end - start)
    return mask


def _cut_after_final_message(text: str, conversation: Sequence[dict[str, Any]]) -> str:
    """``text`` up to the end of the last message's content (its last text part), where the template put it."""
    content = conversation[-1].get("content") if conversation and isinstance(conversation[-1], dict) else None
    if isinstance(content, (list, tuple)):
        parts = [c.get("text") for c in content if isinstance(c, dict) and c.get("type", "text") == "text"]
        content = parts[-1] if parts else None
    if not isinstance(content, str) or not content.strip():
        raise KimiVLInputError("continue_final_message needs a last message whose content ends in text")
    final = content.strip()
    at = text.rfind(final)
    if at < 0:
        raise KimiVLInputError(f"continue_final_message: the last message's text {final[:40]!r} is not in the "
                               "rendered conversation (the template changed it)")
    return text[:at + len(final)]
