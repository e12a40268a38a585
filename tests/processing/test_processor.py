"""KimiVLProcessor: golden ids/pixels, splicing, count checks, batching, outputs, preflight, loading."""
from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kimivl.errors import KimiVLInputError
from kimivl.processing import IMAGE_BLOCK, MEDIA_PAD, KimiVLBatch, KimiVLProcessor


def _prompt_messages(tiny_dir: Path, expected_json: dict) -> list[dict]:
    messages = json.loads(json.dumps(expected_json["prompt"]["messages"]))
    messages[0]["content"][0]["image"] = str(tiny_dir / "inputs" / messages[0]["content"][0]["image"])
    return messages


def test_import_paths():
    import kimivl
    from kimivl.processing import KimiVLProcessor as direct

    assert kimivl.KimiVLProcessor is direct


def test_golden_prompt_via_chat_template(tiny_processor, tiny_dir, expected, expected_json):
    out = tiny_processor.apply_chat_template(_prompt_messages(tiny_dir, expected_json), add_generation_prompt=True,
                                             tokenize=True, return_dict=True, return_tensors="pt")
    assert list(out) == ["input_ids", "attention_mask", "pixel_values", "image_grid_hws"]
    assert torch.equal(out.input_ids, expected["prompt.input_ids"])
    assert torch.equal(out["attention_mask"], expected["prompt.attention_mask"])
    torch.testing.assert_close(out.pixel_values, expected["prompt.pixel_values"], atol=1e-6, rtol=0)
    assert torch.equal(out.image_grid_hws, expected["prompt.image_grid_hws"])
    assert int((out.input_ids == 763).sum()) == expected_json["prompt"]["num_media_pad"]


def test_golden_prompt_via_call(tiny_processor, tiny_dir, expected, expected_json):
    image = Image.open(tiny_dir / "inputs" / "image_70x98.png")
    out = tiny_processor(text=expected_json["prompt"]["chat_text"], images=image, return_tensors="pt")
    assert out.input_ids.tolist() == [expected_json["prompt"]["input_ids"]]
    torch.testing.assert_close(out.pixel_values, expected["prompt.pixel_values"], atol=1e-6, rtol=0)


def test_golden_text_only(tiny_processor, expected):
    out = tiny_processor.apply_chat_template([{"role": "user", "content": "What is in the image?"}],
                                             add_generation_prompt=True, tokenize=True, return_dict=True,
                                             return_tensors="pt")
    assert torch.equal(out.input_ids, expected["text_only.input_ids"])
    assert "pixel_values" not in out and torch.all(out.attention_mask == 1)
    ids = tiny_processor.apply_chat_template([{"role": "user", "content": "What is in the image?"}],
                                             add_generation_prompt=True, tokenize=True)
    assert ids == expected["text_only.input_ids"].tolist()


def test_three_images_in_order(tiny_processor, tiny_dir, expected, expected_json):
    paths = [tiny_dir / "inputs" / n for n in expected_json["images"]]
    content = [{"type": "image", "image": p} for p in paths] + [{"type": "text", "text": "Compare."}]
    out = tiny_processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True, return_tensors="pt")
    torch.testing.assert_close(out.pixel_values, expected["processor.pixel_values"], atol=1e-6, rtol=0)
    assert torch.equal(out.image_grid_hws, expected["processor.image_grid_hws"])
    ids = out.input_ids[0].tolist()
    # runs of <|media_pad|> of 12, 10 and 1 tokens, in image order
    runs, n = [], 0
    for t in ids + [0]:
        if t == 763:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    assert runs == expected_json["vision"]["tokens_per_image_after_merge"]


def test_image_sources_in_messages(tiny_processor, tiny_dir):
    data = (tiny_dir / "inputs" / "image_28x28.png").read_bytes()
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    content = [{"type": "image", "image": data}, {"type": "image_url", "image_url": {"url": url}},
               {"type": "image", "image": Image.open(io.BytesIO(data))},
               {"type": "image", "path": str(tiny_dir / "inputs" / "image_28x28.png")}]
    out = tiny_processor.apply_chat_template([{"role": "user", "content": content}], tokenize=True,
                                             return_dict=True, return_tensors="pt")
    assert out.image_grid_hws.tolist() == [[2, 2]] * 4
    per_image = out.pixel_values.view(4, 4, 3, 14, 14)
    assert all(torch.equal(per_image[0], per_image[i]) for i in range(4))


@pytest.mark.parametrize("n_placeholders, n_images", [(2, 1), (1, 2), (0, 1), (1, 0)])
def test_placeholder_image_count_mismatch(tiny_processor, n_placeholders, n_images):
    text = "Look: " + IMAGE_BLOCK * n_placeholders
    images = [Image.new("RGB", (28, 28))] * n_images
    with pytest.raises(KimiVLInputError,
                       match=f"{n_placeholders} {MEDIA_PAD.replace('|', '[|]')} image placeholders in the text but "
                             f"{n_images} images given"):
        tiny_processor(text=text, images=images or None)


def test_images_counted_across_a_batch(tiny_processor):
    images = [Image.new("RGB", (28, 28), (255, 0, 0)), Image.new("RGB", (56, 28), (0, 0, 255))]
    out = tiny_processor(text=["a" + IMAGE_BLOCK, "b" + IMAGE_BLOCK], images=images)
    assert out.image_grid_hws.tolist() == [[2, 2], [2, 4]]
    assert (out.input_ids == 763).sum(1).tolist() == [1, 2]
    with pytest.raises(KimiVLInputError, match="2 .* placeholders in the text but 3 images"):
        tiny_processor(text=["a" + IMAGE_BLOCK, "b" + IMAGE_BLOCK], images=images + images[:1])


def test_corrupt_image_in_conversation(tiny_processor, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(KimiVLInputError, match=r"image 0 \(message 0 item 1\): not a readable image"):
        tiny_processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "x"},
                                                                          {"type": "image", "image": bad}]}],
                                           tokenize=True)


def test_batch_left_padding(tiny_processor, expected_json):
    long_text, short_text = expected_json["prompt"]["chat_text"], expected_json["text_only"]["chat_text"]
    image = Image.new("RGB", (70, 98))
    out = tiny_processor(text=[long_text, short_text], images=[image], return_tensors="pt")
    assert out.input_ids.shape == (2, 55) and out.attention_mask.sum(1).tolist() == [55, 35]
    assert out.input_ids[1, :20].tolist() == [tiny_processor.tokenizer.pad_token_id] * 20
    assert out.input_ids[1, 20:].tolist() == expected_json["text_only"]["input_ids"]
    assert out.attention_mask[1, :20].tolist() == [0] * 20
    right = tiny_processor(text=[long_text, short_text], images=[image], padding_side="right")
    assert right.input_ids[1, :35].tolist() == expected_json["text_only"]["input_ids"]
    assert right.attention_mask[1, 35:].tolist() == [0] * 20
    assert tiny_processor.padding_side == "left"  # the per-call choice does not stick
    fixed = tiny_processor(text=short_text, padding="max_length", max_length=40)
    assert fixed.input_ids.shape == (1, 40)
    with pytest.raises(KimiVLInputError, match="different lengths"):
        tiny_processor(text=[long_text, short_text], images=[image], padding=False)
    lists = tiny_processor(text=[long_text, short_text], images=[image], padding=False, return_tensors=None)
    assert [len(r) for r in lists["input_ids"]] == [55, 35]


def test_batch_feature_access_and_to(tiny_processor, expected_json):
    out = tiny_processor(text=expected_json["prompt"]["chat_text"], images=[Image.new("RGB", (70, 98))])
    assert isinstance(out, KimiVLBatch) and out.input_ids is out["input_ids"]
    with pytest.raises(AttributeError, match="no field 'labels'"):
        _ = out.labels
    half = out.to(torch.float16)
    assert half.pixel_values.dtype == torch.float16 and half.input_ids.dtype == torch.int64
    moved = out.to("cpu")
    assert moved.pixel_values.device.type == "cpu" and torch.equal(moved.input_ids, out.input_ids)
    assert out.to(device="cpu", dtype=torch.bfloat16).pixel_values.dtype == torch.bfloat16
    as_np = tiny_processor(text="hi", return_tensors="np")
    assert isinstance(as_np["input_ids"], np.ndarray)


def test_batch_decode(tiny_processor, expected_json):
    ids = torch.tensor([expected_json["text_only"]["input_ids"]])
    assert tiny_processor.batch_decode(ids) == [expected_json["text_only"]["chat_text"]]
    assert tiny_processor.batch_decode(ids, skip_special_tokens=True) == [
        "systemYou are a helpful assistantuserWhat is in the image?assistant"]
    assert tiny_processor.decode(ids[0, -1]) == "<|im_middle|>"
    with pytest.raises(KimiVLInputError, match=r"decode expects token ids \(an int, a list of ints or a 1-D tensor "
                                               r"/ array\), got NoneType"):
        tiny_processor.decode(None)
    with pytest.raises(KimiVLInputError, match="batch_decode expects rows of token ids .*got NoneType"):
        tiny_processor.batch_decode(None)


def test_preflight_counts_and_refusal(processor, tiny_dir, tmp_path, expected_json):
    messages = _prompt_messages(tiny_dir, expected_json)
    report = processor.preflight(messages)
    assert report.total_tokens == 55 and report.text_tokens == 43
    assert [(m.kind, m.tokens, m.sizes) for m in report.media] == [("image", 12, [(70, 98)])]
    # pixels are not decoded: a file with a valid header but truncated data still counts
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (980, 1000, 3), np.uint8)).save(buf, format="PNG")
    big = tmp_path / "big.png"
    big.write_bytes(buf.getvalue()[:5000])
    big_messages = [{"role": "user", "content": [{"type": "image", "image": big}, {"type": "text", "text": "?"}]}]
    report = processor.preflight(big_messages, check=False)
    assert report.media[0].tokens == 1056 and report.context_length == 512
    with pytest.raises(KimiVLInputError, match=r"needs 1\d{3} tokens but the model context is 512.*image 0.*1056"):
        processor.preflight(big_messages)
    with pytest.raises(KimiVLInputError, match=r"needs 55 tokens \+ 500 new tokens but the model context is 512"):
        processor.preflight(messages, max_new_tokens=500)
    # the processor itself refuses over-long inputs too, naming the numbers
    with pytest.raises(KimiVLInputError, match="over the model context of 512"):
        processor(text="hello " * 600)


def test_from_pretrained_template_sources(tmp_path, tiny_dir, expected_json):
    plain = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, plain, ignore=shutil.ignore_patterns("*.safetensors", "expected", "inputs"))
    (plain / "chat_template.jinja").unlink()
    proc = KimiVLProcessor.from_pretrained(plain)  # template from tokenizer_config.json
    assert proc.apply_chat_template([{"role": "user", "content": "What is in the image?"}],
                                    add_generation_prompt=True) == expected_json["text_only"]["chat_text"]
    config = json.loads((plain / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    proc = KimiVLProcessor.from_pretrained(plain)  # built-in template
    assert proc.apply_chat_template([{"role": "user", "content": "What is in the image?"}],
                                    add_generation_prompt=True) == expected_json["text_only"]["chat_text"]
    cfg = json.loads((plain / "config.json").read_text())
    cfg["media_placeholder_token_id"] = 760
    (plain / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(KimiVLInputError, match="media_placeholder_token_id=760 but the tokenizer's"):
        KimiVLProcessor.from_pretrained(plain)


def test_missing_checkpoint_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        KimiVLProcessor.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="tiktoken.model"):
        KimiVLProcessor.from_pretrained(tmp_path)


def test_text_is_required(tiny_processor):
    with pytest.raises(KimiVLInputError, match="text is required"):
        tiny_processor(images=[Image.new("RGB", (28, 28))])


def test_chat_template_override_and_positional_misuse(tiny_processor):
    text = tiny_processor.apply_chat_template([{"role": "user", "content": "hi"}],
                                              chat_template="{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert text == "[hi]"
    assert tiny_processor.apply_chat_template([{"role": "user", "content": "x"}],
                                              chat_template="{{ bos_token }}{{ greeting }}", greeting="!") == "[BOS]!"
    with pytest.raises(KimiVLInputError, match="got Image .*pass media by keyword"):
        tiny_processor(Image.new("RGB", (28, 28)), "text")


def test_video_dict_with_options_in_call(tiny_processor):
    frames = [Image.new("RGB", (28, 28), (i * 40, 0, 0)) for i in range(4)]
    from kimivl.processing import VIDEO_BLOCK

    out = tiny_processor(text="x" + VIDEO_BLOCK, videos=[{"video": frames, "fps": 4}])
    assert "[0.0s]" + IMAGE_BLOCK in tiny_processor.decode(out.input_ids[0])
    assert "[0.8s]" in tiny_processor.decode(out.input_ids[0])  # 3/4 s
    assert out.image_grid_hws.shape == (4, 2)
    with pytest.raises(KimiVLInputError, match="need fps > 0"):
        tiny_processor(text=VIDEO_BLOCK, videos=[{"video": frames, "fps": 0}])


def test_options_given_as_dicts_equal_the_options_objects(tiny_dir):
    from kimivl.processing import VIDEO_BLOCK
    from kimivl.processing.document import DocumentOptions
    from kimivl.processing.video import VideoOptions

    frames = [Image.new("RGB", (28, 28), (i * 40, 0, 0)) for i in range(6)]
    as_dict = KimiVLProcessor.from_pretrained(tiny_dir, video_options={"fps": 2, "max_frames": 3},
                                              document_options={"dpi": 72.0})
    as_object = KimiVLProcessor.from_pretrained(tiny_dir, video_options=VideoOptions(fps=2, max_frames=3),
                                                document_options=DocumentOptions(dpi=72.0))
    assert as_dict.video_options == as_object.video_options and as_dict.document_options.dpi == 72.0
    a, b = (p(text="x" + VIDEO_BLOCK, videos=[frames]) for p in (as_dict, as_object))
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert a.image_grid_hws.shape == (3, 2)  # max_frames took effect
    as_dict.video_options = {"max_frames": 2}  # the attribute takes a dict too
    assert as_dict.video_options == VideoOptions(max_frames=2)


@pytest.mark.parametrize("kwargs, message", [
    ({"video_options": "fast"}, "video_options must be a VideoOptions or a dict of its fields, got str 'fast'"),
    ({"video_options": {"speed": 2}}, "video_options: unknown video option 'speed'"),
    ({"video_options": {"fps": 0}}, "video_options: need fps > 0"),
    ({"document_options": [1]}, "document_options must be a DocumentOptions or a dict of its fields, got list [1]"),
    ({"document_options": {"dpi": "high"}}, "document_options: document option dpi = 'high' must be a number"),
    ({"context_length": "big"}, "context_length must be a positive integer or None (no check), got 'big'"),
    ({"context_length": 0}, "context_length must be a positive integer or None (no check), got 0"),
    ({"padding_side": "middle"}, "padding_side must be 'left' or 'right', got 'middle'"),
    ({"video_decoder": 5}, ("video_decoder must have the VideoDecoder methods probe(source, label) and "
                            "frames_at(source, timestamps, label); int lacks probe and frames_at")),
])
def test_wrong_constructor_options_are_refused_at_construction(tiny_dir, kwargs, message):
    import re

    with pytest.raises(KimiVLInputError, match=re.escape(message)):
        KimiVLProcessor.from_pretrained(tiny_dir, **kwargs)


@pytest.mark.parametrize("name, limit", [("Kimi-VL-A3B-Instruct", 4096), ("Kimi-VL-A3B-Thinking-2506", 16384)])
def test_release_preprocessor_configs(name, limit):
    from kimivl.processing import KimiVLImageProcessor

    path = Path(__file__).resolve().parents[2] / "configs" / name / "preprocessor_config.json"
    if not path.is_file():
        pytest.skip(f"{path} not in this checkout")
    ip = KimiVLImageProcessor.from_pretrained(path)
    assert ip.in_token_limit == limit and ip.pad_input and ip.image_mean == [0.5] * 3
    # 1792x1792 (3.2 MP) = 128x128 patches: unresized under 2506's limit (4096 tokens); the earlier
    # releases halve it to 896x896 = 64x64 patches (1024 tokens)
    assert ip.num_image_tokens(1792, 1792) == (4096 if limit == 16384 else 1024)


def test_media_budgets_from_preprocessor_config(tmp_path):
    import json
    import shutil

    from kimivl.processing import KimiVLProcessor

    golden = Path(__file__).resolve().parents[2].parent / "shared" / "golden" / "kimivl-tiny"
    if not golden.is_dir():
        pytest.skip("golden set not found")
    for name in ("tiktoken.model", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json"):
        shutil.copy(golden / name, tmp_path / name)
    cfg = json.loads((tmp_path / "preprocessor_config.json").read_text())
    cfg["video_options"] = {"max_frames": 4, "max_tokens": 64}
    cfg["document_options"] = {"dpi": 72.0}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    proc = KimiVLProcessor.from_pretrained(tmp_path)
    assert (proc.video_options.max_frames, proc.video_options.max_tokens) == (4, 64)
    assert proc.document_options.dpi == 72.0 and proc.document_options.max_pages == 16
    cfg["video_options"] = {"fps": -1}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="video_options.*fps=-1"):
        KimiVLProcessor.from_pretrained(tmp_path)
    cfg["video_options"] = "fast"  # not a mapping: refused, not ignored
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    with pytest.raises(KimiVLInputError, match="preprocessor_config.json video_options must be a mapping of "
                                               "VideoOptions fields, got str 'fast'"):
        KimiVLProcessor.from_pretrained(tmp_path)


def test_save_pretrained_writes_what_from_pretrained_reads(golden_dir, tmp_path):
    import json

    from kimivl.processing.document import DocumentOptions

    processor = KimiVLProcessor.from_pretrained(golden_dir, document_options=DocumentOptions(dpi=100.0))
    processor.save_pretrained(tmp_path)
    # the official files come back as they were (nothing dropped, nothing added)
    assert (tmp_path / "tiktoken.model").read_bytes() == (golden_dir / "tiktoken.model").read_bytes()
    assert (tmp_path / "chat_template.jinja").read_text() == (golden_dir / "chat_template.jinja").read_text()
    for name in ("tokenizer_config.json", "preprocessor_config.json"):
        saved, read = (json.loads((d / name).read_text()) for d in (tmp_path, golden_dir))
        assert {k: v for k, v in saved.items() if k != "document_options"} == read
    assert json.loads((tmp_path / "preprocessor_config.json").read_text())["document_options"] == {"dpi": 100.0}
    again = KimiVLProcessor.from_pretrained(tmp_path)
    assert again.document_options == DocumentOptions(dpi=100.0) and again.video_options == processor.video_options
    messages = [{"role": "user", "content": [{"type": "image", "image": str(golden_dir / "inputs" / "image_70x98.png")},
                                             {"type": "text", "text": "Describe this picture."}]}]
    a, b = (p.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                  return_tensors="pt") for p in (processor, again))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_continue_final_message_ends_the_text_inside_the_last_message(golden_dir):
    processor = KimiVLProcessor.from_pretrained(golden_dir)
    messages = [{"role": "user", "content": "What is shown?"}, {"role": "assistant", "content": "It shows a "}]
    full = processor.apply_chat_template(messages)
    text = processor.apply_chat_template(messages, continue_final_message=True)
    assert full.startswith(text) and text.endswith("<|im_middle|>It shows a") and full.endswith("a <|im_end|>")
    ids = processor.apply_chat_template(messages, continue_final_message=True, tokenize=True, return_tensors="pt")
    assert processor.decode(ids[0]) == text
    parts = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": [{"type": "text", "text": "A1"}]}]
    assert processor.apply_chat_template(parts, continue_final_message=True).endswith("<|im_middle|>A1")
    with pytest.raises(KimiVLInputError, match="cannot come with add_generation_prompt"):
        processor.apply_chat_template(messages, continue_final_message=True, add_generation_prompt=True)


@pytest.mark.parametrize("return_tensors", ["pt", "np", None])
def test_assistant_tokens_mask_marks_what_labels_train(golden_dir, return_tensors):
    processor = KimiVLProcessor.from_pretrained(golden_dir)
    messages = [{"role": "user", "content": "What is shown?"}, {"role": "assistant", "content": "A red square."}]
    both = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors=return_tensors,
                                         return_labels=True, return_assistant_tokens_mask=True)
    labels = np.asarray(both["labels"])
    assert np.array_equal(np.asarray(both["assistant_masks"]), (labels != -100).astype(np.int64))
    assert 0 < int(np.asarray(both["assistant_masks"]).sum()) < labels.size
    only = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors=return_tensors,
                                         return_assistant_tokens_mask=True)
    assert "labels" not in only and np.array_equal(np.asarray(only["assistant_masks"]),
                                                   np.asarray(both["assistant_masks"]))
    with pytest.raises(KimiVLInputError, match="return_assistant_tokens_mask needs tokenize=True and return_dict"):
        processor.apply_chat_template(messages, tokenize=True, return_assistant_tokens_mask=True)
