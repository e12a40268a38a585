"""Chat processing for Kimi-VL: image processor, tokenizer, chat template, media sources, processor.

Spec: ``shared/reference/kimivl-spec.md`` §5 (image processor), §6 (splicing, special tokens, chat
format), §8 (tokenizer). Usage and the exact text formats: ``docs/processor.md``.
"""
from __future__ import annotations

from kimivl.processing.chat_template import (DEFAULT_CHAT_TEMPLATE, DOCUMENT_BLOCK, IMAGE_BLOCK, MEDIA_PAD,
                                             THINK_CLOSE, THINK_OPEN, VIDEO_BLOCK, ChatRenderer, MediaItem,
                                             RenderedChat, ThinkingSplit, ThinkingStream, prepare_messages,
                                             split_thinking, strip_thinking)
from kimivl.processing.document import DocumentOptions, omitted_marker, page_marker
from kimivl.processing.image_processing import (KimiVLImageProcessor, image_grid_hw, num_image_tokens,
                                                resized_size)
from kimivl.processing.media import ImageBlock, MediaPlan, image_size, load_image
from kimivl.processing.processor import (IGNORE_INDEX, KimiVLBatch, KimiVLProcessor, MediaCount,
                                         PreflightReport)
from kimivl.processing.tokenizer import KIMI_PAT_STR, KimiVLTokenizer, read_tiktoken_ranks
from kimivl.processing.video import PyAVDecoder, VideoDecoder, VideoInfo, VideoOptions, format_timestamp

__all__ = [
    "DEFAULT_CHAT_TEMPLATE", "DOCUMENT_BLOCK", "IGNORE_INDEX", "IMAGE_BLOCK", "KIMI_PAT_STR", "MEDIA_PAD",
    "THINK_CLOSE", "THINK_OPEN", "VIDEO_BLOCK", "ChatRenderer", "DocumentOptions", "ImageBlock", "KimiVLBatch",
    "KimiVLImageProcessor", "KimiVLProcessor", "KimiVLTokenizer", "MediaCount", "MediaItem", "MediaPlan",
    "PreflightReport", "PyAVDecoder", "RenderedChat", "ThinkingSplit", "ThinkingStream", "VideoDecoder", "VideoInfo",
    "VideoOptions", "format_timestamp", "image_grid_hw", "image_size", "load_image", "num_image_tokens",
    "omitted_marker", "page_marker", "prepare_messages", "read_tiktoken_ranks", "resized_size",
    "split_thinking", "strip_thinking",
]
