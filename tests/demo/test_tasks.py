"""The demo model's synthetic task family and its tokenizer files (kimivl.demo)."""
from __future__ import annotations

import random

import pytest

from kimivl.demo.tasks import COLOR_VARIANTS, COLORS, DIRECTIONS, MAX_SIDE, MIN_SIDE, QUESTIONS, SHAPES, TASKS, is_correct, sample

ANSWERS = {"color": set(COLORS), "shape": set(SHAPES), "count": {str(i) for i in range(1, 7)},
           "compare": {"first", "second"}, "direction": set(DIRECTIONS)}


@pytest.mark.parametrize("task", TASKS)
def test_samples_follow_the_task_definition(task):
    rng = random.Random(f"test-{task}")
    for _ in range(6):
        s = sample(task, rng)
        if task in ANSWERS:
            assert s.answer in ANSWERS[task]
        else:
            assert s.answer.isdigit() and 3 <= len(s.answer) <= 5 and s.answer[0] != "0"
        if task == "pdf":
            assert s.question in {QUESTIONS["pdf"].format(page=k) for k in (1, 2, 3)}
            assert s.document.startswith(b"%PDF")
        else:
            assert s.question == QUESTIONS[task]
        for im in [*s.images, *(s.video or [])]:
            assert im.mode == "RGB" and all(MIN_SIDE <= side <= MAX_SIDE for side in im.size)
        if task == "direction":
            assert 4 <= len(s.video) <= 8
        if task == "compare":
            assert len(s.images) == 2


def test_single_shape_colour_is_the_answer():
    s = sample("color", random.Random(11))
    im = s.images[0]
    bg = im.getpixel((0, 0))
    colours = {c for _, c in im.getcolors(im.width * im.height)} - {bg}
    # the shape's pixels are a variant of the named colour up to the jitter (antialiased edges aside)
    assert min(sum(abs(a - b) for a, b in zip(c, v)) for c in colours for v in COLOR_VARIANTS[s.answer]) <= 3 * 18


def test_direction_video_moves_the_ball_that_way():
    for seed in range(8):
        s = sample("direction", random.Random(seed))
        first, last = s.video[0], s.video[-1]
        bg = first.getpixel((0, 0))

        def centre(im):
            pts = [(x, y) for x in range(0, im.width, 2) for y in range(0, im.height, 2) if im.getpixel((x, y)) != bg]
            return sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)

        (x0, y0), (x1, y1) = centre(first), centre(last)
        moved = {"left": x0 - x1, "right": x1 - x0, "up": y0 - y1, "down": y1 - y0}
        assert max(moved, key=moved.get) == s.answer


def test_exact_match_scoring():
    assert is_correct(" Red.", "red") and is_correct("4821", "4821")
    assert not is_correct("4821 ", "482") and not is_correct("red circle", "red")


def test_demo_checkpoint_dir_loads_with_the_official_special_layout(tmp_path):
    pytest.importorskip("tiktoken")
    from kimivl import KimiVLConfig
    from kimivl.demo.build import build_demo_base
    from kimivl.processing import KimiVLProcessor

    directory = build_demo_base(tmp_path / "demo")
    processor = KimiVLProcessor.from_pretrained(directory)
    config = KimiVLConfig.from_pretrained(directory)
    tok = processor.tokenizer
    first = config.text_config.vocab_size - 258
    assert tok.special_token_id("<|media_pad|>") == config.media_placeholder_token_id == first + 21
    assert tok.special_token_id("<|im_end|>") == first + 2 and tok.special_token_id("[EOS]") == first + 1
    # digits stay single tokens; words of the task family are single tokens
    assert [tok.decode([i]) for i in tok.encode("4821")] == ["4", "8", "2", "1"]
    assert len(tok.encode("purple")) == 1 and len(tok.encode("triangle")) == 1
    messages = sample("compare", random.Random(0)).to_messages()
    out = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_labels=True)
    assert processor.decode([t for t in out["labels"][0] if t != -100]) == messages[1]["content"] + "<|im_end|>"
    # the processor's settings are the ones the demo declares, and its patches are the tower's
    from kimivl.demo.build import PREPROCESSOR

    assert processor.video_options.max_tokens == PREPROCESSOR["video_options"]["max_tokens"]
    assert processor.document_options.dpi == PREPROCESSOR["document_options"]["dpi"]
    assert processor.image_processor.patch_size == config.vision_config.patch_size == PREPROCESSOR["patch_size"]
    assert processor.image_processor.in_token_limit == PREPROCESSOR["in_token_limit"]


def test_vision_records_carry_valid_labels_of_their_image():
    from kimivl.demo.tasks import VISION_LABELS, vision_record

    rng = random.Random(5)
    kinds = set()
    for _ in range(12):
        r = vision_record(rng)
        labels = r["labels"]
        kinds.add(tuple(sorted(labels)))
        assert all(labels[k] in VISION_LABELS[k] for k in labels)
        im = r["image"]
        assert im.mode == "RGB" and all(MIN_SIDE <= side <= MAX_SIDE for side in im.size)
        if "color" in labels:  # one shape of the named colour (up to the jitter)
            bg = im.getpixel((0, 0))
            colours = {c for _, c in im.getcolors(im.width * im.height)} - {bg}
            assert min(sum(abs(a - b) for a, b in zip(c, v)) for c in colours
                       for v in COLOR_VARIANTS[labels["color"]]) <= 3 * 18
    assert kinds == {("color", "shape"), ("count",)}
    assert all("count" not in vision_record(rng, count_share=0.0)["labels"] for _ in range(5))


def test_ball_records_name_the_third_the_ball_is_in():
    from kimivl.demo.tasks import vision_record

    rng = random.Random(9)
    for _ in range(8):
        r = vision_record(rng, count_share=0.0, ball_share=1.0)
        im, labels = r["image"], r["labels"]
        bg = im.getpixel((0, 0))
        pts = [(x, y) for x in range(0, im.width, 2) for y in range(0, im.height, 2) if im.getpixel((x, y)) != bg]
        cx, cy = sum(p[0] for p in pts) / len(pts) / im.width, sum(p[1] for p in pts) / len(pts) / im.height
        thirds = {"left": (0, 1 / 3), "center": (1 / 3, 2 / 3), "right": (2 / 3, 1),
                  "top": (0, 1 / 3), "middle": (1 / 3, 2 / 3), "bottom": (2 / 3, 1)}
        for value, coord in ((labels["ball_x"], cx), (labels["ball_y"], cy)):
            lo, hi = thirds[value]
            assert lo - 0.02 <= coord <= hi + 0.02, (labels, cx, cy)


def test_the_small_shape_emphasis_draws_small_shapes_and_leaves_the_default_stream_alone():
    import numpy as np

    from kimivl.demo.tasks import one_shape_image

    def extent(img) -> float:  # the shape's largest side over the canvas's shorter side
        a = np.asarray(img).astype(int)
        ink = np.abs(a - a[0, 0]).sum(-1) > 60  # the background is one (light) colour
        ys, xs = np.nonzero(ink)
        return max(np.ptp(xs), np.ptp(ys)) / min(img.size)

    small = [extent(one_shape_image(random.Random(i), small_share=1.0)[0]) for i in range(30)]
    plain = [extent(one_shape_image(random.Random(i))[0]) for i in range(30)]
    # 12-25 % against 12-70 % of the shorter side (a rotated square spans up to 1.3x its size)
    assert max(small) <= 0.25 * 1.3 + 0.02 and sum(e > 0.4 for e in plain) >= 10
    # without the emphasis no extra random draw is made: the training and evaluation streams stay as they were
    a, b = one_shape_image(random.Random(7)), one_shape_image(random.Random(7), small_share=0.0)
    assert a[1:] == b[1:] and np.array_equal(np.asarray(a[0]), np.asarray(b[0]))


def test_the_variety_style_draws_like_another_renderer_and_the_ball_still_moves_that_way():
    import numpy as np
    from PIL import Image, ImageDraw

    from kimivl.demo.tasks import OTHER_VARIANTS, VARY_FPS, draw_shape

    # an equilateral triangle of size 100 (apex up): 86.6 wide, 75 high
    img = Image.new("RGB", (200, 200), (255, 255, 255))
    draw_shape(ImageDraw.Draw(img), "triangle", 100, 100, 100, (0, 0, 0), equilateral=True)
    ys, xs = np.nonzero(np.asarray(img)[..., 0] < 128)
    assert abs(np.ptp(xs) - 86.6) <= 2 and abs(np.ptp(ys) - 75) <= 2

    travels, fps, edge_colours = [], set(), []
    for seed in range(24):
        s = sample("direction", random.Random(seed), vary=True)
        assert s.video_fps in VARY_FPS and s.to_messages()[0]["content"][0]["fps"] == s.video_fps
        first, last = (np.asarray(f).astype(int) for f in (s.video[0], s.video[-1]))
        fps.add(s.video_fps)

        def centre(a):
            ys, xs = np.nonzero(np.abs(a - a[0, 0]).sum(-1) > 60)
            return xs.mean(), ys.mean()

        (x0, y0), (x1, y1) = centre(first), centre(last)
        moved = {"left": x0 - x1, "right": x1 - x0, "up": y0 - y1, "down": y1 - y0}
        assert max(moved, key=moved.get) == s.answer
        side = first.shape[1] if s.answer in ("left", "right") else first.shape[0]
        travels.append(moved[s.answer] / side)
        edge_colours.append(len(np.unique(first.reshape(-1, 3), axis=0)))
    assert min(travels) < 0.3 and len(fps) >= 3  # slower balls and other frame rates than the plain stream
    assert max(edge_colours) > 2 and min(edge_colours) == 2  # some frames anti-aliased, some not

    # the colour stays the named one, from the third palette too
    hits = 0
    for seed in range(40):
        s = sample("color", random.Random(seed), vary=True)
        a = np.asarray(s.images[0]).reshape(-1, 3).astype(int)
        colours, counts = np.unique(a, axis=0, return_counts=True)
        ink = colours[np.argsort(counts)[-2]]  # the most common colour after the background
        variants = COLOR_VARIANTS[s.answer] + (OTHER_VARIANTS[s.answer],)
        dist = [np.abs(ink - np.array(v)).sum() for v in variants]
        assert min(dist) <= 3 * 18
        hits += int(np.argmin(dist) == len(variants) - 1)
    assert hits >= 5
