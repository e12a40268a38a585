"""The synthetic multimodal task family the shipped demo model is trained and evaluated on.

Each generator draws one sample from a seeded ``random.Random``: the media (PIL images, a list
of video frames, or PDF bytes), the question (asked exactly as in docs/demo-model.md) and the
lower-case answer. Samples become chat messages in the processor's format with ``to_messages``.
"""
from __future__ import annotations

import io
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageDraw, ImageFont

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 25),
    "purple": (140, 55, 180),
    "orange": (245, 135, 25),
}
# Other renderers of the family name their colours differently (PIL / CSS named colours are the likely
# ones), so every sample draws one of these variants of its colour, then jitters it.
COLOR_VARIANTS: dict[str, tuple[tuple[int, int, int], ...]] = {
    "red": (COLORS["red"], (255, 0, 0)),
    "green": (COLORS["green"], (0, 128, 0)),
    "blue": (COLORS["blue"], (0, 0, 255)),
    "yellow": (COLORS["yellow"], (255, 255, 0)),
    "purple": (COLORS["purple"], (128, 0, 128)),
    "orange": (COLORS["orange"], (255, 165, 0)),
}
# A third palette (a widely used set of "distinct colours") for the variety stage: renderers differ most in blue
# (0, 130, 200 here) and purple.
OTHER_VARIANTS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 75), "green": (60, 180, 75), "blue": (0, 130, 200),
    "yellow": (255, 225, 25), "purple": (145, 30, 180), "orange": (245, 130, 48),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")

QUESTIONS = {
    "color": "What color is the shape?",
    "shape": "What shape is this?",
    "count": "How many shapes are there?",
    "number": "What number is written in the image?",
    "compare": "Which image has more shapes, the first or the second?",
    "direction": "Which direction is the ball moving?",
    "pdf": "What number is on page {page}?",
}
TASKS = tuple(QUESTIONS)
MIN_SIDE, MAX_SIDE = 56, 448


@dataclass
class Sample:
    task: str
    question: str
    answer: str
    images: list[Image.Image] = field(default_factory=list)  # one or two images
    video: list[Image.Image] | None = None  # frames
    document: bytes | None = None  # a PDF
    video_fps: float | None = None  # the rate the frames were taken at, when not the processor's default

    def to_messages(self, *, with_answer: bool = True, text_first: bool = False) -> list[dict[str, Any]]:
        """Chat messages: the media items, then the question (or the question first)."""
        media: list[dict[str, Any]] = [{"type": "image", "image": im} for im in self.images]
        if self.video is not None:
            item: dict[str, Any] = {"type": "video", "video": self.video}
            if self.video_fps is not None:
                item["fps"] = self.video_fps
            media.append(item)
        if self.document is not None:
            media.append({"type": "document", "document": self.document})
        text = [{"type": "text", "text": self.question}]
        messages: list[dict[str, Any]] = [{"role": "user", "content": text + media if text_first else media + text}]
        if with_answer:
            messages.append({"role": "assistant", "content": self.answer})
        return messages


# ---------------------------------------------------------------------------- drawing helpers
def _jitter(rng: random.Random, rgb: tuple[int, int, int], amount: int = 18) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)  # type: ignore[return-value]


def _paint(rng: random.Random, name: str, vary: bool = False) -> tuple[int, int, int]:
    """A jittered variant of the named colour (``vary``: also from OTHER_VARIANTS)."""
    variants = COLOR_VARIANTS[name] + ((OTHER_VARIANTS[name],) if vary else ())
    return _jitter(rng, rng.choice(variants))


@dataclass(frozen=True)
class Style:
    """How another renderer of the family might draw: anti-aliased edges (drawn at ``SUPERSAMPLE`` times the size,
    then reduced with a Lanczos filter), an equilateral triangle instead of this module's (a bounding square's
    width, 0.9 of its height), the third palette. ``Style()`` is this module's own drawing."""

    antialias: bool = False
    equilateral: bool = False
    vary_colors: bool = False

    @staticmethod
    def draw(rng: random.Random, vary: bool) -> Style:
        """``Style()`` without ``vary`` (no random draw, so the plain streams stay as they were), else a random one."""
        if not vary:
            return Style()
        return Style(antialias=rng.random() < 0.5, equilateral=rng.random() < 0.5, vary_colors=True)


SUPERSAMPLE = 4


class _Painter:
    """An ImageDraw-like canvas that draws at ``scale`` times the size when the style anti-aliases."""

    def __init__(self, img: Image.Image, style: Style) -> None:
        self.img, self.style = img, style
        self.scale = SUPERSAMPLE if style.antialias else 1
        self.big = img.resize((img.width * self.scale, img.height * self.scale)) if self.scale > 1 else img
        self.draw = ImageDraw.Draw(self.big)

    def shape(self, kind: str, cx: float, cy: float, size: float, color: tuple[int, int, int], angle: float = 0.0) -> None:
        k = self.scale
        draw_shape(self.draw, kind, cx * k, cy * k, size * k, color, angle, equilateral=self.style.equilateral)

    def image(self) -> Image.Image:
        return self.big.resize(self.img.size, Image.LANCZOS) if self.scale > 1 else self.img


def _canvas(rng: random.Random, width: int | None = None, height: int | None = None) -> Image.Image:
    w = width or rng.randint(MIN_SIDE, MAX_SIDE)
    h = height or rng.randint(MIN_SIDE, MAX_SIDE)
    return Image.new("RGB", (w, h), tuple(rng.randint(200, 255) for _ in range(3)))


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, size: float,
               color: tuple[int, int, int], angle: float = 0.0, *, equilateral: bool = False) -> None:
    """A filled shape of bounding size ``size`` centred at (cx, cy) (``equilateral``: the triangle inscribed in
    the circle of diameter ``size`` instead)."""
    r = size / 2
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        return
    if kind == "square":
        corners = [(-r, -r), (r, -r), (r, r), (-r, r)]
    elif equilateral:
        corners = [(0.0, -r), (r * math.sqrt(3) / 2, r / 2), (-r * math.sqrt(3) / 2, r / 2)]
    else:  # triangle, apex up before rotation
        corners = [(0.0, -r), (r, r * 0.8), (-r, r * 0.8)]
    c, s = math.cos(angle), math.sin(angle)
    draw.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in corners], fill=color)


def _place(rng: random.Random, w: int, h: int, sizes: list[float], tries: int = 400) -> list[tuple[float, float]] | None:
    """Centres for non-overlapping discs of the given sizes inside a w x h canvas (None if no fit)."""
    centres: list[tuple[float, float]] = []
    for size in sizes:
        r = size / 2 + 1
        for _ in range(tries):
            x, y = rng.uniform(r, w - r), rng.uniform(r, h - r)
            if all(math.hypot(x - px, y - py) > r + ps / 2 + 2 for (px, py), ps in zip(centres, sizes)):
                centres.append((x, y))
                break
        else:
            return None
    return centres


def shapes_image(rng: random.Random, n: int, *, size_range: tuple[float, float] = (0.12, 0.20),
                 style: Style = Style()) -> Image.Image:
    """An image with ``n`` non-overlapping shapes of any kind and colour."""
    while True:
        img = _canvas(rng)
        short = min(img.size)
        sizes = [short * rng.uniform(*size_range) for _ in range(n)]
        centres = _place(rng, *img.size, sizes)
        if centres is None:
            continue
        painter = _Painter(img, style)
        for (x, y), size in zip(centres, sizes):
            painter.shape(rng.choice(SHAPES), x, y, size, _paint(rng, rng.choice(list(COLORS)), style.vary_colors),
                          rng.uniform(-0.3, 0.3))
        return painter.image()


def number_image(rng: random.Random, text: str, *, width: int | None = None, height: int | None = None,
                 font_size: int | None = None) -> Image.Image:
    """``text`` in dark ink in Pillow's built-in font at a random place that fits."""
    size = font_size or rng.randint(18, 40)
    font = ImageFont.load_default(size)
    left, top, right, bottom = font.getbbox(text)
    tw, th = right - left, bottom - top
    w = width or rng.randint(max(MIN_SIDE, tw + 8), MAX_SIDE)
    h = height or rng.randint(max(MIN_SIDE, th + 8), MAX_SIDE)
    img = _canvas(rng, w, h)
    x = rng.randint(2, max(2, w - tw - 2)) - left
    y = rng.randint(2, max(2, h - th - 2)) - top
    ink = tuple(rng.randint(0, 70) for _ in range(3))
    ImageDraw.Draw(img).text((x, y), text, fill=ink, font=font)
    return img


def _digits(rng: random.Random) -> str:
    return str(rng.randint(1, 9)) + "".join(str(rng.randint(0, 9)) for _ in range(rng.randint(2, 4)))


# ---------------------------------------------------------------------------- the tasks
def one_shape_image(rng: random.Random, *, small_share: float = 0.0,
                    style: Style = Style()) -> tuple[Image.Image, str, str]:
    """One shape (12-70 % of the shorter side: from the counting size up) on a light canvas: the image, its
    colour name and kind. With probability ``small_share`` the shape is 12-25 % instead (a training emphasis:
    after the processor's resize such shapes are 8-20 pixels, where circle / square / triangle are hardest)."""
    img = _canvas(rng)
    name, kind = rng.choice(list(COLORS)), rng.choice(SHAPES)
    small = small_share > 0 and rng.random() < small_share  # no extra draw without the emphasis
    size = min(img.size) * (rng.uniform(0.12, 0.25) if small else rng.uniform(0.12, 0.7))
    x, y = rng.uniform(size / 2, img.width - size / 2), rng.uniform(size / 2, img.height - size / 2)
    painter = _Painter(img, style)
    painter.shape(kind, x, y, size, _paint(rng, name, style.vary_colors), rng.uniform(-0.3, 0.3))
    return painter.image(), name, kind


# ``vary``: draw the sample in a random Style, and the video task with the ball's travel and size and the frame
# rate drawn wider (the variety stage of scripts/train_demo_model.py). Without it no extra random number is
# drawn, so the streams of the other stages stay as they were.
def color_task(rng: random.Random, *, vary: bool = False) -> Sample:
    img, name, _ = one_shape_image(rng, style=Style.draw(rng, vary))
    return Sample("color", QUESTIONS["color"], name, images=[img])


def shape_task(rng: random.Random, *, small_share: float = 0.0, vary: bool = False) -> Sample:
    img, _, kind = one_shape_image(rng, small_share=small_share, style=Style.draw(rng, vary))
    return Sample("shape", QUESTIONS["shape"], kind, images=[img])


def count_task(rng: random.Random, *, vary: bool = False) -> Sample:
    n = rng.randint(1, 6)
    return Sample("count", QUESTIONS["count"], str(n), images=[shapes_image(rng, n, style=Style.draw(rng, vary))])


def number_task(rng: random.Random) -> Sample:
    text = _digits(rng)
    return Sample("number", QUESTIONS["number"], text, images=[number_image(rng, text)])


def compare_task(rng: random.Random, *, vary: bool = False) -> Sample:
    a, b = rng.sample(range(1, 7), 2)
    style = Style.draw(rng, vary)
    return Sample("compare", QUESTIONS["compare"], "first" if a > b else "second",
                  images=[shapes_image(rng, a, style=style), shapes_image(rng, b, style=style)])


# Frame rates a video of the variety stage claims (the timestamps the processor writes before its frames).
VARY_FPS = (1.0, 2.0, 2.0, 5.0, 10.0, 25.0)


def direction_task(rng: random.Random, *, vary: bool = False) -> Sample:
    """A ball moving in a straight line over 4-8 frames: 50-95 % of the free span, radius 5-15 % of the shorter
    side (``vary``: 15-95 % and 4-15 %, a random frame rate and Style)."""
    direction = rng.choice(DIRECTIONS)
    n = rng.randint(4, 8)
    w, h = rng.randint(MIN_SIDE, MAX_SIDE), rng.randint(MIN_SIDE, MAX_SIDE)
    bg = tuple(rng.randint(200, 255) for _ in range(3))
    style = Style.draw(rng, vary)
    color = _paint(rng, rng.choice(list(COLORS)), style.vary_colors)
    r = min(w, h) * rng.uniform(0.04 if vary else 0.05, 0.15)
    horizontal = direction in ("left", "right")
    span = (w if horizontal else h) - 2 * r
    travel = span * rng.uniform(0.15 if vary else 0.5, 0.95)
    start = rng.uniform(r, r + span - travel)
    sign = 1 if direction in ("right", "down") else -1
    if sign < 0:
        start += travel
    fixed = rng.uniform(r, (h if horizontal else w) - r)
    frames = []
    for i in range(n):
        pos = start + sign * travel * i / (n - 1)
        cx, cy = (pos, fixed) if horizontal else (fixed, pos)
        painter = _Painter(Image.new("RGB", (w, h), bg), style)
        painter.shape("circle", cx, cy, 2 * r, color)
        frames.append(painter.image())
    fps = rng.choice(VARY_FPS) if vary else None
    return Sample("direction", QUESTIONS["direction"], direction, video=frames, video_fps=fps)


def pdf_bytes(pages: list[Image.Image]) -> bytes:
    """A PDF whose pages are the given images (Pillow's PDF writer)."""
    buf = io.BytesIO()
    pages[0].save(buf, format="PDF", save_all=True, append_images=pages[1:], resolution=72.0)
    return buf.getvalue()


def text_pdf_bytes(rng: random.Random, numbers: list[str], width: float, height: float) -> bytes:
    """A PDF with one number per page as real text (Helvetica), at a random place."""
    from fpdf import FPDF

    pdf = FPDF(unit="pt", format=(width, height))
    pdf.set_auto_page_break(False)
    for text in numbers:
        pdf.add_page()
        size = rng.uniform(0.07, 0.14) * width
        pdf.set_font("Helvetica", size=size)
        tw = pdf.get_string_width(text)
        pdf.set_text_color(*(rng.randint(0, 70) for _ in range(3)))
        pdf.text(rng.uniform(4, max(4.0, width - tw - 4)), rng.uniform(size, height - 4), text)
    return bytes(pdf.output())


def pdf_task(rng: random.Random) -> Sample:
    n = rng.randint(1, 3)
    numbers = [_digits(rng) for _ in range(n)]
    page = rng.randint(1, n)
    w = rng.randint(200, 600)
    h = int(w * rng.uniform(1.2, 1.45))  # portrait pages (A4 is 595 x 842 pt)
    if rng.random() < 0.4:
        try:
            return Sample("pdf", QUESTIONS["pdf"].format(page=page), numbers[page - 1],
                          document=text_pdf_bytes(rng, numbers, w, h))
        except ImportError:  # fpdf2 is a test/dev extra; fall back to image pages
            pass
    lo, hi = max(18, int(w * 0.06)), max(24, int(w * 0.12))
    images = [number_image(rng, t, width=w, height=h, font_size=rng.randint(lo, hi)) for t in numbers]
    return Sample("pdf", QUESTIONS["pdf"].format(page=page), numbers[page - 1], document=pdf_bytes(images))


# ---------------------------------------------------------------------------- the vision stage
# Image-level labels for `stage: vision` (kimivl/training/vision_stage.py): what a tower must see to answer
# the colour, shape, count and comparison questions.
VISION_LABELS: dict[str, list[str]] = {
    "color": list(COLORS), "shape": list(SHAPES), "count": [str(n) for n in range(1, 7)],
    "ball_x": ["left", "center", "right"], "ball_y": ["top", "middle", "bottom"],  # the third it is in
}
# The count head sums per-token logits (a pooled head cannot count: kimivl/training/vision_stage.py).
VISION_POOLING: dict[str, str] = {"count": "sum"}


def ball_image(rng: random.Random) -> tuple[Image.Image, float, float]:
    """One ball (a frame of the direction task: radius 5-15 % of the shorter side) at a random place; the
    image and the ball's centre as fractions of the width and height."""
    img = _canvas(rng)
    w, h = img.size
    r = min(w, h) * rng.uniform(0.05, 0.15)
    cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    ImageDraw.Draw(img).ellipse([cx - r, cy - r, cx + r, cy + r], fill=_paint(rng, rng.choice(list(COLORS))))
    return img, cx / w, cy / h


def vision_record(rng: random.Random, *, count_share: float = 0.5, ball_share: float = 0.0) -> dict[str, Any]:
    """One labelled image for the vision stage: with probability ``count_share`` 1-6 shapes (count), with
    ``ball_share`` a ball (which third across and down), otherwise a single shape (colour + kind)."""
    draw = rng.random()
    if draw < count_share:
        n = rng.randint(1, 6)
        return {"image": shapes_image(rng, n), "labels": {"count": str(n)}}
    if draw < count_share + ball_share:
        img, x, y = ball_image(rng)
        return {"image": img, "labels": {"ball_x": VISION_LABELS["ball_x"][min(2, int(x * 3))],
                                         "ball_y": VISION_LABELS["ball_y"][min(2, int(y * 3))]}}
    img, name, kind = one_shape_image(rng)
    return {"image": img, "labels": {"color": name, "shape": kind}}


GENERATORS: dict[str, Callable[[random.Random], Sample]] = {
    "color": color_task, "shape": shape_task, "count": count_task, "number": number_task,
    "compare": compare_task, "direction": direction_task, "pdf": pdf_task,
}


VARIED = ("color", "shape", "count", "compare", "direction")  # the tasks that take ``vary``


def sample(task: str, rng: random.Random, *, vary: bool = False) -> Sample:
    """A sample of ``task`` (``vary``: in a random Style, for the tasks in VARIED)."""
    if task not in GENERATORS:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    return GENERATORS[task](rng, vary=True) if vary and task in VARIED else GENERATORS[task](rng)


def is_correct(prediction: str, answer: str) -> bool:
    """Exact match after trimming whitespace and a final period, case-insensitive."""
    return prediction.strip().rstrip(".").strip().lower() == answer
