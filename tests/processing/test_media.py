"""Media sources: image loading and its errors, video sampling/budget, PDF pages/budget and their errors."""
from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kimivl.errors import KimiVLInputError
from kimivl.processing import DOCUMENT_BLOCK, IMAGE_BLOCK, MEDIA_PAD, VIDEO_BLOCK, image_size, load_image
from kimivl.processing.video import PyAVDecoder, VideoOptions, format_timestamp


def frame_colour(index: int) -> tuple[int, int, int]:
    """Colour of frame ``index`` of the videos made by the ``make_video`` fixture."""
    return (index * 9) % 256, 255 - (index * 9) % 256, 128


def _png_bytes(size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (255, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------- images
def test_image_sources(tmp_path):
    data = _png_bytes()
    path = tmp_path / "red.png"
    path.write_bytes(data)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    for source in [path, str(path), f"file://{path}", data, bytearray(data), url, {"url": url},
                   np.zeros((30, 40, 3), np.uint8), Image.open(path)]:
        image = load_image(source)
        assert image.size == (40, 30)
        assert image_size(source) == (40, 30)


@pytest.mark.parametrize("source, message", [
    (b"definitely not an image", "not a readable image"),
    (b"", "empty"),
    ("https://example.com/cat.png", "remote URLs are not fetched"),
    ("/no/such/file.png", "file not found"),
    ("data:image/png;base64", "malformed data URL"),
    ("data:image/png;base64,@@@", r"malformed data URL: its 3-character payload is not valid base64"),
    ("HTTPS://example.com/cat.png", "remote URLs are not fetched"),
    (12345, "unsupported image type int"),
    (np.zeros((4, 4), np.float32), "arrays must be uint8"),
])
def test_image_source_errors(source, message):
    with pytest.raises(KimiVLInputError, match=message):
        load_image(source, label="image 3")


def test_data_url_base64_may_wrap_lines():
    encoded = base64.b64encode(_png_bytes()).decode()
    wrapped = "\n".join(encoded[i:i + 76] for i in range(0, len(encoded), 76))  # MIME-style line breaks
    assert image_size("data:image/png;base64," + wrapped) == (40, 30)


def test_a_directory_is_named_as_one(tmp_path):
    with pytest.raises(KimiVLInputError, match=f"image 0: '{re.escape(str(tmp_path))}' is a directory, not an "
                                               "image file"):
        load_image(tmp_path, label="image 0")


def test_truncated_image_header_ok_pixels_refused(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(buf, format="PNG")
    truncated = buf.getvalue()[: len(buf.getvalue()) // 2]
    assert image_size(truncated) == (64, 64)  # header is intact: preflight can still count it
    with pytest.raises(KimiVLInputError, match="image 0: the image data is truncated or corrupt"):
        load_image(truncated, label="image 0")


# ------------------------------------------------------------------------------------------- video
def test_timestamp_format():
    assert [format_timestamp(t) for t in (0, 0.5, 12.25, 75)] == ["[0.0s]", "[0.5s]", "[12.2s]", "[75.0s]"]


def _colour_index(image: Image.Image) -> int:
    r = int(np.asarray(image.convert("RGB"))[..., 0].mean().round())
    return round(r / 9)


def test_video_frames_by_fps(processor, make_video, tmp_path):
    path = make_video(tmp_path / "clip.mp4", frames=25, fps=10)  # 2.5 s
    processor.video_options = VideoOptions(fps=2.0, max_frames=32, max_tokens=10_000)
    out = processor(text=f"<|im_user|>user<|im_middle|>{VIDEO_BLOCK}What changes?", videos=[path])
    text = processor.decode(out.input_ids[0])
    stamps = ["[0.0s]", "[0.5s]", "[1.0s]", "[1.5s]", "[2.0s]"]
    # a 64x48 frame is padded to 84x56 = 6x4 patches = 6 tokens
    expected_text = "".join(s + IMAGE_BLOCK.replace(MEDIA_PAD, MEDIA_PAD * 6) for s in stamps)
    assert f"<|im_middle|>{expected_text}What changes?" in text
    assert out.image_grid_hws.tolist() == [[4, 6]] * 5
    frames = PyAVDecoder().frames_at(path, [0.0, 0.5, 1.0, 1.5, 2.0], "video 0")
    assert [_colour_index(f) for f in frames] == [0, 5, 10, 15, 20]


def test_video_max_frames_and_frame_choice(make_video, tmp_path, tiny_processor):
    from kimivl.processing.video import plan_video

    path = make_video(tmp_path / "clip.mp4", frames=25, fps=10)
    plan = plan_video(path, tiny_processor.image_processor, VideoOptions(fps=10, max_frames=3), label="v",
                      decoder=None)
    assert plan.detail["timestamps"] == pytest.approx([0.0, 2.5 / 3, 5.0 / 3])
    assert [b.prefix for b in plan.blocks] == ["[0.0s]", "[0.8s]", "[1.7s]"]
    # frame on screen at t: pts <= t < next pts -> frames 8 (0.8 s) and 16 (1.6 s)
    assert [_colour_index(f) for f in plan.load()] == [0, 8, 16]


@pytest.mark.parametrize("frames, fps, options, expected", [
    # 6 frames at 25 fps last 0.24 s: one sample at 2 fps; the floor takes 4 of its frames, first and last
    (6, 25, VideoOptions(fps=2.0), [0, 2, 3, 5]),
    (3, 25, VideoOptions(fps=2.0), [0, 1, 2]),  # fewer frames than the floor: all of them
    (8, 10, VideoOptions(fps=2.0, min_frames=6), [0, 1, 3, 4, 6, 7]),
    (6, 25, VideoOptions(fps=2.0, min_frames=1), [0]),  # floor off: the fps rule alone
    (6, 25, VideoOptions(fps=2.0, max_frames=2), [0, 5]),  # max_frames bounds the floor
])
def test_video_short_clip_floor(make_video, tmp_path, tiny_processor, frames, fps, options, expected):
    """A clip with fewer samples at ``fps`` than ``min_frames`` is sampled on its own frames, spread evenly."""
    from kimivl.processing.video import plan_video

    path = make_video(tmp_path / "short.mp4", frames=frames, fps=fps)
    plan = plan_video(path, tiny_processor.image_processor, options, label="v", decoder=None)
    assert plan.detail["timestamps"] == pytest.approx([i / fps for i in expected])
    assert [_colour_index(f) for f in plan.load()] == expected


def test_video_sparse_samples_seek(make_video, tmp_path):
    """Samples further apart than PyAVDecoder.seek_gap_s are reached by seeking; the frame is still exact."""
    path = make_video(tmp_path / "long.mp4", frames=60, fps=2, gop=6)  # 30 s, a keyframe every 3 s
    decoder = PyAVDecoder()
    assert decoder.probe(path, "v").duration == pytest.approx(30.0)
    frames = decoder.frames_at(path, [0.0, 1.2, 25.0, 29.9], "v")
    reds = [int(np.asarray(f)[..., 0].mean().round()) for f in frames]
    assert reds == pytest.approx([frame_colour(i)[0] for i in (0, 2, 50, 59)], abs=3)


def test_video_budget_lowers_resolution_before_dropping(make_video, tmp_path, tiny_processor):
    from kimivl.processing.video import plan_video

    ip = tiny_processor.image_processor
    path = make_video(tmp_path / "big.mp4", frames=10, fps=5, width=224, height=168)  # 2 s, 48 tokens/frame
    full = plan_video(path, ip, VideoOptions(fps=5), label="v", decoder=None)
    assert len(full.blocks) == 10 and full.tokens == 480 and full.blocks[0].tokens == 48
    lowered = plan_video(path, ip, VideoOptions(fps=5, max_tokens=200, min_frame_tokens=4), label="v", decoder=None)
    assert len(lowered.blocks) == 10 and lowered.tokens <= 200
    assert lowered.blocks[0].width < 224
    frames = lowered.load()
    assert frames[0].size == (lowered.blocks[0].width, lowered.blocks[0].height)
    dropped = plan_video(path, ip, VideoOptions(fps=5, max_tokens=100, min_frame_tokens=20), label="v", decoder=None)
    assert dropped.tokens <= 100 and 1 < len(dropped.blocks) < 10
    assert dropped.blocks[0].prefix == "[0.0s]" and dropped.blocks[-1].prefix == "[1.8s]"  # spread evenly
    with pytest.raises(KimiVLInputError, match="one frame at the lowest resolution .* needs 48 tokens"):
        plan_video(path, ip, VideoOptions(fps=5, max_tokens=10, min_frame_tokens=64), label="v", decoder=None)


def test_video_as_list_of_frames(processor):
    frames = [Image.new("RGB", (28, 28), frame_colour(i)) for i in range(6)]
    messages = [{"role": "user", "content": [{"type": "video", "video": frames, "fps": 2, "max_frames": 3},
                                             {"type": "text", "text": "What happens?"}]}]
    out = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                        return_tensors="pt")
    text = processor.decode(out.input_ids[0])
    assert f"[0.0s]{IMAGE_BLOCK}[1.0s]{IMAGE_BLOCK}[2.0s]{IMAGE_BLOCK}What happens?" in text
    assert out.image_grid_hws.tolist() == [[2, 2]] * 3
    assert out.pixel_values.shape == (12, 3, 14, 14)
    # frames 0, 2, 4 were picked: their colours appear in that order
    reds = out.pixel_values.view(3, 4, 3, 14, 14)[:, 0, 0, 0, 0]
    assert reds.tolist() == pytest.approx([(frame_colour(i)[0] / 255 - 0.5) / 0.5 for i in (0, 2, 4)], abs=1e-6)


@pytest.mark.parametrize("content, message", [
    (b"\x00\x01not a video at all" * 50, "cannot open the video"),
    (None, "video file not found"),
])
def test_unopenable_video(processor, tmp_path, content, message):
    pytest.importorskip("av", reason="video tests need PyAV")
    path = tmp_path / "broken.mp4"
    if content is not None:
        path.write_bytes(content)
    messages = [{"role": "user", "content": [{"type": "video", "video": str(path)}]}]
    with pytest.raises(KimiVLInputError, match=f"video 0 .*{message}"):
        processor.apply_chat_template(messages, tokenize=True, return_dict=True)
    with pytest.raises(KimiVLInputError, match=message):
        processor.preflight(messages)


@pytest.mark.parametrize("kind, source, message", [
    ("video", "https://x.org/a.mp4", r"remote URLs are not fetched \('https://x.org/a.mp4'\); download the file"),
    ("document", "http://x.org/a.pdf", r"remote URLs are not fetched \('http://x.org/a.pdf'\); download the file"),
    ("video", "DIR", "'DIR' is a directory, not a video file"),
    ("document", "DIR", "'DIR' is a directory, not a PDF file"),
])
def test_video_and_document_paths_are_checked_like_images(processor, tmp_path, kind, source, message):
    pytest.importorskip("av" if kind == "video" else "pypdfium2")
    source, message = source.replace("DIR", str(tmp_path)), message.replace("DIR", re.escape(str(tmp_path)))
    messages = [{"role": "user", "content": [{"type": kind, kind: source}]}]
    with pytest.raises(KimiVLInputError, match=f"{kind} 0 \\(message 0 item 0\\): {message}"):
        processor.apply_chat_template(messages, tokenize=True)
    if source.startswith("http"):
        with pytest.raises(KimiVLInputError, match="pass its path or bytes$"):  # no data URLs for these kinds
            processor.apply_chat_template(messages, tokenize=True)


@pytest.mark.parametrize("source, message", [
    (5, "unsupported video type int"),
    (Image.new("RGB", (28, 28)), r"unsupported video type PIL image 28x28"),
    ({"url": "clip.mp4"}, r"unsupported video type dict with keys \['url'\]"),
    (np.zeros((3, 28, 28), np.uint8), r"must be uint8 frames \(T, H, W, C\) or .* got ndarray uint8 \(3, 28, 28\)"),
    (np.zeros((1, 2, 28, 28, 3), np.uint8), r"got ndarray uint8 \(1, 2, 28, 28, 3\)"),
    ("torch-float", r"must be uint8 frames .* got Tensor float32 \(2, 3, 28, 28\)"),
])
def test_unsupported_video_types_are_named(processor, source, message):
    import torch

    if isinstance(source, str):
        source = torch.zeros(2, 3, 28, 28)
    messages = [{"role": "user", "content": [{"type": "video", "video": source}, {"type": "text", "text": "?"}]}]
    with pytest.raises(KimiVLInputError, match=f"video 0 \\(message 0 item 0\\): .*{message}"):
        processor.apply_chat_template(messages, tokenize=True)


def test_video_preflight_decodes_nothing_and_matches(processor, make_video, tmp_path):
    path = make_video(tmp_path / "clip.mp4", frames=20, fps=10)

    class CountingDecoder(PyAVDecoder):
        calls = 0

        def frames_at(self, source, timestamps, label):
            CountingDecoder.calls += 1
            return super().frames_at(source, timestamps, label)

    processor.video_decoder = CountingDecoder()
    messages = [{"role": "user", "content": [{"type": "video", "video": path}, {"type": "text", "text": "Hi"}]}]
    report = processor.preflight(messages)
    assert CountingDecoder.calls == 0
    # 2 s at the default 1 fps: 2 samples, raised to the floor of 4 (min_frames) of the clip's 20 frames
    assert report.media[0].kind == "video" and report.media[0].blocks == 4
    out = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                        return_tensors="pt")
    assert CountingDecoder.calls == 1
    assert report.total_tokens == out.input_ids.shape[1]
    assert report.media[0].tokens == int((out.input_ids == processor.image_token_id).sum())


def test_video_placeholder_mismatch(processor, make_video, tmp_path):
    path = make_video(tmp_path / "clip.mp4", frames=5, fps=10)
    with pytest.raises(KimiVLInputError, match="1 video blocks in the text but 2 videos given"):
        processor(text=VIDEO_BLOCK, videos=[path, path])


# ------------------------------------------------------------------------------------------- documents
def test_pdf_pages_and_markers(processor, make_pdf):
    data = make_pdf([(200, 300), (300, 200), (100, 100)])
    processor.document_options = processor.document_options.__class__(dpi=72)
    messages = [{"role": "user", "content": [{"type": "document", "document": data},
                                             {"type": "text", "text": "Summarise."}]}]
    report = processor.preflight(messages)
    out = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                        return_tensors="pt")
    text = processor.decode(out.input_ids[0])

    def pads(n: int) -> str:
        return IMAGE_BLOCK.replace(MEDIA_PAD, MEDIA_PAD * n)

    # 72 dpi: 1 pt = 1 px; 200x300 -> pad 210x308 -> 15x22 patches -> 8*11 = 88 tokens (grid 22x16 / 4)
    grids = out.image_grid_hws.tolist()
    assert grids == [[22, 16], [16, 22], [8, 8]]
    assert (f"[page 1/3]{pads(88)}[page 2/3]{pads(88)}[page 3/3]{pads(16)}Summarise." in text)
    assert report.total_tokens == out.input_ids.shape[1]
    assert [m.sizes for m in report.media] == [[(200, 300), (300, 200), (100, 100)]]
    # the red square of page 1 (10..30 pt, 40..60 pt from the top) is red in the pixels
    page1 = out.pixel_values[:22 * 16].view(22, 16, 3, 14, 14).permute(2, 0, 3, 1, 4).reshape(3, 308, 224)
    assert page1[:, 50, 20].tolist() == pytest.approx([(200 / 255 - .5) / .5, (30 / 255 - .5) / .5,
                                                       (30 / 255 - .5) / .5], abs=0.05)


def test_pdf_page_budget(processor, make_pdf):
    data = make_pdf([(200, 300)] * 5)
    messages = [{"role": "user", "content": [{"type": "document", "document": data, "dpi": 72, "max_pages": 3}]}]
    text = processor.decode(processor.apply_chat_template(messages, tokenize=True, return_tensors="pt")[0])
    assert "[page 3/5]" in text and "[page 4/5]" not in text and text.count("[page") == 4
    assert "[pages 4-5 not shown]<|im_end|>" in text
    # budget: lower the resolution first (all pages stay), then drop pages from the end
    lowered = processor.preflight([{"role": "user", "content": [
        {"type": "document", "document": data, "dpi": 72, "max_tokens": 200, "min_page_tokens": 4}]}])
    assert lowered.media[0].blocks == 5 and lowered.media[0].tokens <= 200
    dropped = processor.preflight([{"role": "user", "content": [
        {"type": "document", "document": data, "dpi": 72, "max_tokens": 200, "min_page_tokens": 60}]}])
    assert dropped.media[0].blocks == 2 and dropped.media[0].detail["pages"] == 5


def test_encrypted_pdf(processor, make_pdf):
    data = make_pdf([(100, 100)], password="secret")
    doc = [{"role": "user", "content": [{"type": "document", "document": data}]}]
    with pytest.raises(KimiVLInputError, match="document 0 .*encrypted .*password"):
        processor.apply_chat_template(doc, tokenize=True)
    doc[0]["content"][0]["password"] = "wrong"
    with pytest.raises(KimiVLInputError, match="encrypted .*wrong password"):
        processor.preflight(doc)
    doc[0]["content"][0]["password"] = "secret"
    assert processor.preflight(doc).media[0].blocks == 1


@pytest.mark.parametrize("mangle", ["truncate", "garbage", "empty", "missing"])
def test_broken_pdf(processor, make_pdf, tmp_path, mangle):
    data = make_pdf([(100, 100)] * 2)
    source: object = {"truncate": data[: len(data) // 3], "garbage": b"%PDF-1.7\n" + b"\x00junk" * 100,
                      "empty": b"", "missing": str(tmp_path / "none.pdf")}[mangle]
    with pytest.raises(KimiVLInputError, match="document 0 .*(broken or not a PDF|empty|not found)"):
        processor(text=DOCUMENT_BLOCK, documents=[source])


def test_image_arrays_and_tensors_in_either_channel_layout():
    import torch

    rgb = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    reference = np.asarray(load_image(rgb))
    for source in (rgb.transpose(2, 0, 1), torch.from_numpy(rgb), torch.from_numpy(rgb).permute(2, 0, 1)):
        assert np.array_equal(np.asarray(load_image(source)), reference) and image_size(source) == (40, 30)
    with pytest.raises(KimiVLInputError, match=r"tensors must be uint8 .* got torch.float32 \(3, 30, 40\)"):
        load_image(torch.zeros(3, 30, 40), label="image 0")


def test_video_as_one_array_or_tensor_of_frames(processor):
    import torch

    frames = np.stack([np.full((28, 28, 3), frame_colour(i), np.uint8) for i in range(6)])

    def encode(video):
        messages = [{"role": "user", "content": [{"type": "video", "video": video, "fps": 2, "max_frames": 3},
                                                 {"type": "text", "text": "What happens?"}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                             return_tensors="pt")

    reference = encode([Image.fromarray(f) for f in frames])
    for video in (frames, torch.from_numpy(frames), torch.from_numpy(frames).permute(0, 3, 1, 2)):  # THWC, TCHW
        out = encode(video)
        assert torch.equal(out.input_ids, reference.input_ids) and torch.equal(out.pixel_values, reference.pixel_values)
    # processor(videos=...): one 4-D tensor is one video, as one 4-D array is
    processor.video_options = {"fps": 2, "max_frames": 3}
    called = [processor(text=VIDEO_BLOCK, videos=video) for video in (frames, torch.from_numpy(frames))]
    assert called[0].image_grid_hws.shape == (3, 2) and torch.equal(called[0].input_ids, called[1].input_ids)


@pytest.mark.parametrize("item, message", [
    ({"type": "video", "video": "clip.mp4", "speed": 2}, "video 0 (message 0 item 0): unknown video option 'speed'; "
                                                         "the options are fps, max_frames"),
    ({"type": "video", "video": "clip.mp4", "max_frame": 2}, "unknown video option 'max_frame' (did you mean "
                                                             "'max_frames'?)"),
    ({"type": "video", "video": "clip.mp4", "fps": "fast"}, "video option fps = 'fast' must be a number, got str"),
    ({"type": "document", "document": "a.pdf", "pages": [1]}, "unknown document option 'pages' (did you mean "
                                                              "'max_pages'?)"),
])
def test_unknown_or_mistyped_media_options_are_named(processor, item, message):
    messages = [{"role": "user", "content": [item, {"type": "text", "text": "?"}]}]
    with pytest.raises(KimiVLInputError, match=re.escape(message)):
        processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
