"""Ask the demo model questions drawn by another renderer of its task family, as an outside evaluation would.

    python scripts/eval_other_renderer.py                       # the shipped model, 100 samples per task and variant
    python scripts/eval_other_renderer.py --model runs/demo/final --samples 50 --variants aa slow mp4-25

The acceptance of the demo model uses images "drawn by an independent renderer of the same family", so this
script draws them with conventions of its own, not kimivl.demo.tasks': every shape anti-aliased (drawn at 4x,
reduced with a Lanczos filter) or not, the equilateral triangle, the axis-aligned square, the CSS colours or
another palette, single shapes at 20-60 % of the shorter side, a ball of 6-12 % that travels 30-80 % of the frame
(or 15-35 %: ``slow``), videos as frame lists or as H.264 mp4 files at 2, 10 or 25 fps. It prints one JSON line
per variant and task (accuracy, a few failures). Reading (number, PDF) is not covered.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
CSS = {"red": (255, 0, 0), "green": (0, 128, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
       "purple": (128, 0, 128), "orange": (255, 165, 0)}
OTHER = {"red": (230, 25, 75), "green": (60, 180, 75), "blue": (0, 130, 200), "yellow": (255, 225, 25),
         "purple": (145, 30, 180), "orange": (245, 130, 48)}
QUESTIONS = {"color": "What color is the shape?", "shape": "What shape is this?",
             "count": "How many shapes are there?",
             "compare": "Which image has more shapes, the first or the second?",
             "direction": "Which direction is the ball moving?"}
# variant -> (drawing options, the tasks it applies to)
VARIANTS: dict[str, tuple[dict, tuple[str, ...]]] = {
    "aa": ({"aa": True}, tuple(QUESTIONS)),
    "plain": ({"aa": False}, tuple(QUESTIONS)),
    "palette": ({"aa": True, "palette": OTHER}, tuple(QUESTIONS)),
    "small": ({"aa": True, "size": (0.12, 0.3)}, ("color", "shape")),
    "slow": ({"aa": True, "travel": (0.15, 0.35)}, ("direction",)),
    "mp4-2": ({"aa": True, "mp4": 2}, ("direction",)),
    "mp4-10": ({"aa": True, "mp4": 10}, ("direction",)),
    "mp4-25": ({"aa": True, "mp4": 25}, ("direction",)),
    "slow-mp4-25": ({"aa": True, "mp4": 25, "travel": (0.15, 0.35)}, ("direction",)),
}
SUPERSAMPLE = 4


def _jitter(rng: random.Random, rgb: tuple[int, int, int], amount: int = 10) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)  # type: ignore[return-value]


def _canvas(rng: random.Random) -> tuple[int, int, tuple[int, int, int]]:
    return rng.randint(56, 448), rng.randint(56, 448), tuple(rng.randint(200, 255) for _ in range(3))


def render(w: int, h: int, bg: tuple[int, int, int], items: list[tuple], aa: bool) -> Image.Image:
    """Shapes ``(kind, cx, cy, size, colour)`` on a plain canvas, each inside a circle of diameter ``size``
    (the square axis-aligned, the triangle equilateral with its apex up)."""
    k = SUPERSAMPLE if aa else 1
    img = Image.new("RGB", (w * k, h * k), bg)
    draw = ImageDraw.Draw(img)
    for kind, cx, cy, size, colour in items:
        cx, cy, r = cx * k, cy * k, size * k / 2
        if kind == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        elif kind == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
        else:
            draw.polygon([(cx + r * math.cos(a), cy - r * math.sin(a))
                          for a in (math.pi / 2, math.pi * 7 / 6, math.pi * 11 / 6)], fill=colour)
    return img.resize((w, h), Image.LANCZOS) if aa else img


def one_shape(rng: random.Random, opt: dict) -> tuple[Image.Image, str, str]:
    w, h, bg = _canvas(rng)
    name, kind = rng.choice(list(CSS)), rng.choice(SHAPES)
    size = min(w, h) * rng.uniform(*opt.get("size", (0.2, 0.6)))
    x, y = rng.uniform(size / 2, w - size / 2), rng.uniform(size / 2, h - size / 2)
    colour = _jitter(rng, opt.get("palette", CSS)[name])
    return render(w, h, bg, [(kind, x, y, size, colour)], opt["aa"]), name, kind


def shapes(rng: random.Random, n: int, opt: dict) -> Image.Image:
    """``n`` shapes of 12-20 % of the shorter side, not touching (rejection sampling; a new canvas if stuck)."""
    while True:
        w, h, bg = _canvas(rng)
        items: list[tuple] = []
        for _ in range(n):
            size = min(w, h) * rng.uniform(0.12, 0.20)
            for _ in range(500):
                x, y = rng.uniform(size / 2, w - size / 2), rng.uniform(size / 2, h - size / 2)
                if all(math.hypot(x - a, y - b) > (size + s) / 2 + 1 for _, a, b, s, _ in items):
                    items.append((rng.choice(SHAPES), x, y, size,
                                  _jitter(rng, opt.get("palette", CSS)[rng.choice(list(CSS))])))
                    break
            else:
                break
        if len(items) == n:
            return render(w, h, bg, items, opt["aa"])


def ball_video(rng: random.Random, opt: dict, workdir: Path) -> tuple[list[Image.Image] | str, str]:
    direction = rng.choice(("left", "right", "up", "down"))
    n = rng.randint(4, 8)
    w, h, bg = _canvas(rng)
    r = min(w, h) * rng.uniform(0.06, 0.12)
    horizontal = direction in ("left", "right")
    span = (w if horizontal else h) - 2 * r
    travel = span * rng.uniform(*opt.get("travel", (0.3, 0.8)))
    start = rng.uniform(r, r + span - travel)
    sign = 1 if direction in ("right", "down") else -1
    if sign < 0:
        start += travel
    fixed = rng.uniform(r, (h if horizontal else w) - r)
    colour = _jitter(rng, CSS[rng.choice(list(CSS))])
    frames = []
    for i in range(n):
        pos = start + sign * travel * i / (n - 1)
        cx, cy = (pos, fixed) if horizontal else (fixed, pos)
        frames.append(render(w, h, bg, [("circle", cx, cy, 2 * r, colour)], opt["aa"]))
    if not opt.get("mp4"):
        return frames, direction
    import av

    path = tempfile.mktemp(suffix=".mp4", dir=workdir)
    width, height = w - w % 2, h - h % 2  # yuv420p needs even sides
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=opt["mp4"])
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_image(frame.crop((0, 0, width, height)))):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path, direction


def draw(task: str, rng: random.Random, opt: dict, workdir: Path) -> tuple[list[dict], str]:
    """The media items of one question and its answer."""
    if task in ("color", "shape"):
        img, name, kind = one_shape(rng, opt)
        return [{"type": "image", "image": img}], name if task == "color" else kind
    if task == "count":
        n = rng.randint(1, 6)
        return [{"type": "image", "image": shapes(rng, n, opt)}], str(n)
    if task == "compare":
        a, b = rng.sample(range(1, 7), 2)
        return ([{"type": "image", "image": shapes(rng, a, opt)}, {"type": "image", "image": shapes(rng, b, opt)}],
                "first" if a > b else "second")
    video, direction = ball_video(rng, opt, workdir)
    return [{"type": "video", "video": video}], direction


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint directory (default: kimivl.DEMO_MODEL)")
    parser.add_argument("--samples", type=int, default=100, help="samples per variant and task")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seed", default="other-renderer")
    args = parser.parse_args()

    import torch

    from kimivl import DEMO_MODEL, KimiVLForConditionalGeneration, KimiVLProcessor
    from kimivl.demo.evaluate import answer
    from kimivl.demo.tasks import is_correct

    path = args.model or DEMO_MODEL
    model = KimiVLForConditionalGeneration.from_pretrained(path).eval()
    processor = KimiVLProcessor.from_pretrained(path)
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        for name in args.variants:
            opt, tasks = VARIANTS[name]
            for task in tasks:
                rng = random.Random(f"{args.seed}-{name}-{task}")
                correct, failures, start = 0, [], time.perf_counter()
                for _ in range(args.samples):
                    media, expected = draw(task, rng, opt, Path(tmp))
                    messages = [{"role": "user", "content": media + [{"type": "text", "text": QUESTIONS[task]}]}]
                    got = answer(model, processor, messages)
                    if is_correct(got, expected):
                        correct += 1
                    elif len(failures) < 5:
                        failures.append([expected, got])
                print(json.dumps({"variant": name, "task": task, "accuracy": round(correct / args.samples, 4),
                                  "n": args.samples, "seconds": round(time.perf_counter() - start, 1),
                                  "failures": failures}), flush=True)


if __name__ == "__main__":
    main()
