"""Video as a media source: frames sampled by time, each frame an image block after a timestamp.

Spec: ``shared/reference/kimivl-spec.md`` §6.4 (the official processor has no video path; videos are fed as
frames, each with its own image block). Format (docs/processor.md): frame ``k`` is written as
``[{t:.1f}s]`` followed by the image block, ``t = k / fps`` seconds from the start of the stream (or
``duration * k / max_frames`` when ``max_frames`` caps the count; a clip shorter than ``min_frames`` samples
gets ``min_frames`` of its frames, first and last included). Decoding sits behind ``VideoDecoder``;
the default ``PyAVDecoder`` (the ``[video]`` extra) decodes in one pass, seeking only across long gaps, and
picks for each time the frame on screen then (``pts <= t < next pts``, measured from the stream start).
"""
from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from kimivl.errors import KimiVLInputError
from kimivl.fieldtypes import checked_replace
from kimivl.processing.image_processing import KimiVLImageProcessor
from kimivl.processing.media import (ImageBlock, MediaPlan, describe_source, fit_token_budget, image_size,
                                     load_image, local_file, resize_to, source_size)


@dataclass(frozen=True)
class VideoOptions:
    """Sampling and budget of one video. ``fps``: frames per second to sample (for a list of frames: the
    rate they were taken at); ``max_frames``: cap, spread evenly over the video; ``min_frames``: floor for a
    file whose duration gives fewer samples at ``fps`` (a 6-frame clip at 25 fps lasts 0.24 s: one sample at
    2 fps, no motion left), met with the file's own frames spread evenly, as far as it has them (Qwen2-VL's
    sampler has the same floor of 4); ``max_tokens``: total
    ``<|media_pad|>`` budget, met by lowering per-frame resolution down to ``min_frame_tokens`` and only
    then dropping frames evenly."""

    fps: float = 1.0
    max_frames: int = 32
    min_frames: int = 4
    max_tokens: int = 8192
    min_frame_tokens: int = 64

    def updated(self, item: dict[str, Any], label: str) -> VideoOptions:
        """These options with the keys of a content item / video dict that name options."""
        out = checked_replace(self, item, label, "video")
        if not (out.fps > 0 and out.max_frames >= 1 and out.min_frames >= 1 and out.max_tokens >= 1
                and out.min_frame_tokens >= 1):
            raise KimiVLInputError(f"{label}: need fps > 0 and max_frames, min_frames, max_tokens, min_frame_tokens "
                                   f">= 1; got fps={out.fps}, max_frames={out.max_frames}, "
                                   f"min_frames={out.min_frames}, max_tokens={out.max_tokens}, "
                                   f"min_frame_tokens={out.min_frame_tokens}")
        return out


@dataclass(frozen=True)
class VideoInfo:
    """Container metadata: frame size, duration in seconds, average frame rate (0 if unknown)."""

    width: int
    height: int
    duration: float
    fps: float


class VideoDecoder(Protocol):
    """What the processor needs from a video backend."""

    def probe(self, source: Any, label: str) -> VideoInfo:
        """Metadata without decoding pixels; raises ``KimiVLInputError`` for unopenable input."""

    def frames_at(self, source: Any, timestamps: Sequence[float], label: str) -> list[Image.Image]:
        """RGB frames on screen at each time (seconds from the stream start, ascending)."""


def format_timestamp(seconds: float) -> str:
    """The text put before a frame's image block, e.g. ``[12.5s]``."""
    return f"[{seconds:.1f}s]"


class PyAVDecoder:
    """``VideoDecoder`` on PyAV (FFmpeg). Paths, ``file`` objects and bytes are accepted."""

    # Targets further apart than this are reached by seeking instead of decoding every frame between.
    seek_gap_s: float = 8.0

    def __init__(self) -> None:
        try:
            import av
        except ImportError as e:
            raise ImportError("video input needs PyAV: pip install 'kimivl[video]' (or pip install av)") from e
        self._av = av

    def _open(self, source: Any, label: str) -> Any:
        if isinstance(source, (bytes, bytearray, memoryview)):
            source = io.BytesIO(bytes(source))
        elif isinstance(source, (str, os.PathLike)):
            source = str(local_file(source, label, what="video file", instead="its path or bytes"))
        elif not callable(getattr(source, "read", None)):  # PyAV would say "File object has no read() method"
            raise KimiVLInputError(f"{label}: unsupported video type {_describe_type(source)}; {_VIDEO_TYPES}")
        try:
            container = self._av.open(source, mode="r")
        except (self._av.error.FFmpegError, OSError, ValueError) as e:
            raise KimiVLInputError(f"{label}: cannot open the video: {e}") from e
        if not container.streams.video:
            container.close()
            raise KimiVLInputError(f"{label}: the file has no video stream")
        return container

    @staticmethod
    def _start(stream: Any) -> float:
        return float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0

    def probe(self, source: Any, label: str) -> VideoInfo:
        with self._open(source, label) as container:
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            fps = float(stream.average_rate or stream.guessed_rate or 0.0)
            if stream.duration is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / 1_000_000
            else:  # no duration in the headers: demux (no decoding) to find the last packet's end
                end = self._start(stream)
                for packet in container.demux(stream):
                    if packet.pts is not None:
                        end = max(end, float((packet.pts + (packet.duration or 0)) * stream.time_base))
                duration = end - self._start(stream)
        if width <= 0 or height <= 0 or duration <= 0:
            raise KimiVLInputError(f"{label}: the video has no frames (size {width}x{height}, "
                                   f"duration {duration:.3f}s)")
        return VideoInfo(int(width), int(height), duration, fps)

    def frames_at(self, source: Any, timestamps: Sequence[float], label: str) -> list[Image.Image]:
        if isinstance(source, io.IOBase):
            source.seek(0)
        out: list[Image.Image | None] = [None] * len(timestamps)
        eps = 1e-6
        with self._open(source, label) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            start = self._start(stream)
            frames = container.decode(stream)
            i, prev, prev_image, t = 0, None, None, 0.0
            try:
                while i < len(timestamps):
                    try:
                        frame = next(frames)
                    except StopIteration:
                        break
                    t = (frame.time if frame.time is not None else 0.0) - start
                    while i < len(timestamps) and t > timestamps[i] + eps:
                        chosen = prev if prev is not None else frame
                        if prev_image is None or chosen is not prev:
                            prev_image = chosen.to_image()
                        out[i] = prev_image
                        i += 1
                    prev, prev_image = frame, None
                    if i < len(timestamps) and timestamps[i] - t > self.seek_gap_s:
                        container.seek(int((timestamps[i] + start) / stream.time_base), stream=stream,
                                       backward=True, any_frame=False)
                        frames, prev = container.decode(stream), None
            except self._av.error.FFmpegError as e:
                raise KimiVLInputError(f"{label}: the video stream is corrupt at {t:.2f}s: {e}") from e
            if prev is not None and i < len(timestamps):
                last = prev.to_image()
                out[i:] = [last] * (len(timestamps) - i)
        if any(img is None for img in out):
            raise KimiVLInputError(f"{label}: no decodable frames")
        return [img.convert("RGB") for img in out if img is not None]


_VIDEO_TYPES = ("pass a path, bytes, a list of frames or one uint8 array / tensor of frames (T, H, W, C) or "
                "(T, C, H, W) (an image item for a single image)")


def _describe_type(source: Any) -> str:
    """A media value's type, with the shape and dtype of arrays / tensors and the size of PIL images."""
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return f"{type(source).__name__} {str(source.dtype).removeprefix('torch.')} {tuple(source.shape)}"
    if isinstance(source, Image.Image):
        return f"PIL image {source.size[0]}x{source.size[1]}"
    if isinstance(source, dict):
        return f"dict with keys {sorted(map(str, source))}"
    return type(source).__name__


def _sample_times(duration: float, video_fps: float, options: VideoOptions) -> list[float]:
    fps = min(options.fps, video_fps) if video_fps > 0 else options.fps
    count = max(1, math.ceil(duration * fps - 1e-9))
    if count > options.max_frames:
        return [duration * k / options.max_frames for k in range(options.max_frames)]
    floor = min(options.min_frames, options.max_frames)
    frames = max(1, round(duration * video_fps)) if video_fps > 0 else floor  # in the file (unknown: the floor)
    n = min(floor, frames)
    if n <= count:
        return [k / fps for k in range(count)]
    if video_fps <= 0:  # frame times unknown: spread over the duration
        return [duration * k / n for k in range(n)]
    return [round(k * (frames - 1) / (n - 1)) / video_fps for k in range(n)]  # its own frames, first and last


def _frames_plan(label: str, times: list[float], sizes: list[tuple[int, int]], options: VideoOptions,
                 processor: KimiVLImageProcessor) -> tuple[list[int], list[tuple[int, int]], list[ImageBlock]]:
    limit, keep = fit_token_budget(sizes, processor, max_tokens=options.max_tokens,
                                   min_item_tokens=options.min_frame_tokens, drop="uniform", what="frame")
    targets = [source_size(*sizes[i], limit, processor) for i in keep]
    try:
        blocks = [ImageBlock(format_timestamp(times[i]), w, h, processor.num_image_tokens(w, h))
                  for i, (w, h) in zip(keep, targets)]
    except KimiVLInputError as e:
        raise KimiVLInputError(f"{label}: frame: {e}") from e
    return keep, targets, blocks


def plan_video(source: Any, processor: KimiVLImageProcessor, options: VideoOptions, *, label: str,
               decoder: VideoDecoder | None) -> MediaPlan:
    """Plan a video file (path / bytes) or frames: a list (PIL images, paths, bytes, arrays...) or one uint8
    array / tensor of frames, (T, H, W, C) or (T, C, H, W)."""
    if isinstance(source, (np.ndarray, torch.Tensor)):
        if source.ndim != 4 or str(source.dtype).removeprefix("torch.") != "uint8":
            raise KimiVLInputError(f"{label}: a video array / tensor must be uint8 frames (T, H, W, C) or "
                                   f"(T, C, H, W), got {_describe_type(source)}")
        source = list(source)
    elif isinstance(source, (Image.Image, dict)):  # never a video file, whatever the decoder
        raise KimiVLInputError(f"{label}: unsupported video type {_describe_type(source)}; {_VIDEO_TYPES}")
    if isinstance(source, (list, tuple)):
        if not source:
            raise KimiVLInputError(f"{label}: the frame list is empty")
        n = len(source)
        picked = list(range(n))
        if n > options.max_frames:
            picked = [k * n // options.max_frames for k in range(options.max_frames)]
        times = [i / options.fps for i in picked]
        sizes = [image_size(source[i], label=f"{label} frame {i}") for i in picked]
        keep, targets, blocks = _frames_plan(label, times, sizes, options, processor)

        def load_list() -> list[Image.Image]:
            return [resize_to(load_image(source[picked[k]], label=f"{label} frame {picked[k]}"), size)
                    for k, size in zip(keep, targets)]

        return MediaPlan("video", label, blocks, load_list,
                         detail={"frames_given": n, "timestamps": [times[k] for k in keep]})
    if decoder is None:
        decoder = PyAVDecoder()
    info = decoder.probe(source, label)
    times = _sample_times(info.duration, info.fps, options)
    keep, targets, blocks = _frames_plan(label, times, [(info.width, info.height)] * len(times), options, processor)
    kept_times = [times[k] for k in keep]

    def load_file() -> list[Image.Image]:
        frames = decoder.frames_at(source, kept_times, label)
        return [resize_to(frame, size) for frame, size in zip(frames, targets)]

    return MediaPlan("video", label, blocks, load_file,
                     detail={"duration": info.duration, "fps": info.fps, "timestamps": kept_times,
                             "source": describe_source(source)})
