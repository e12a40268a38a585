"""Videos (vLLM's ``video_url`` part) and PDFs (OpenAI's ``file`` part) through the server: the answer equals the
library's for the same media, and their bounds are 4xx errors naming the rule."""
from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

QUESTION = "What happens here?"


def _data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _video_part(url: str) -> dict[str, Any]:
    return {"type": "video_url", "video_url": {"url": url}}


def _pdf_part(data: bytes) -> dict[str, Any]:
    return {"type": "file", "file": {"file_data": _data_url("application/pdf", data), "filename": "doc.pdf"}}


def _ask(*parts: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"model": "kimivl-tiny", "messages": [{"role": "user", "content": [*parts, {"type": "text",
                                                                                        "text": QUESTION}]}],
            "max_tokens": 8, **extra}


def _media_tokens(tiny, item: dict[str, Any]) -> int:
    inputs = tiny[1].apply_chat_template([{"role": "user", "content": [item, {"type": "text", "text": QUESTION}]}],
                                         add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt")
    return int((inputs["input_ids"] == tiny[1].image_token_id).sum())


def test_a_video_url_part_gets_the_librarys_answer(server, tiny, make_video, media_dir, tmp_path, h):
    path = make_video(tmp_path / "clip.mp4", frames=25, fps=10)
    item = {"type": "video", "video": str(path)}
    want = h.reference_answer(tiny, [{"role": "user", "content": [item, {"type": "text", "text": QUESTION}]}],
                              max_new_tokens=8)
    status, body = h.post_json(server, _ask(_video_part(_data_url("video/mp4", path.read_bytes()))))
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == want
    assert body["usage"]["prompt_tokens_details"]["image_tokens"] == _media_tokens(tiny, item) > 0
    local = media_dir / "allowed" / "clip.mp4"  # a local path under --allowed-local-media-path, as for images
    local.write_bytes(path.read_bytes())
    status, body = h.post_json(server, _ask(_video_part(local.as_uri())))
    assert status == 200 and body["choices"][0]["message"]["content"] == want, body


def test_a_pdf_file_part_gets_the_librarys_answer(server, tiny, make_pdf, h):
    data = make_pdf([(120, 90), (90, 120)])
    item = {"type": "document", "document": data}
    want = h.reference_answer(tiny, [{"role": "user", "content": [item, {"type": "text", "text": QUESTION}]}],
                              max_new_tokens=8)
    status, body = h.post_json(server, _ask(_pdf_part(data)))
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == want
    assert body["usage"]["prompt_tokens_details"]["image_tokens"] == _media_tokens(tiny, item) > 0


@pytest.mark.parametrize("case", ["too_many_videos", "too_many_documents", "video_frames_too_large",
                                  "pdf_by_file_id", "pdf_as_a_url", "image_as_a_video", "broken_video",
                                  "remote_video"])
def test_media_part_errors_name_the_rule(server, make_video, make_pdf, tmp_path, h, case):
    clip = _data_url("video/mp4", make_video(tmp_path / "clip.mp4", frames=5).read_bytes())
    pdf = make_pdf([(100, 100)])
    cases: dict[str, tuple[list[dict[str, Any]], str, str]] = {
        "too_many_videos": ([_video_part(clip)] * 3, "max_videos", "3 videos; the server's max_videos is 2"),
        "too_many_documents": ([_pdf_part(pdf)] * 3, "max_documents", "3 documents; the server's max_documents is 2"),
        "video_frames_too_large": ([_video_part(_data_url("video/mp4", make_video(
            tmp_path / "big.mp4", frames=2, width=400, height=300).read_bytes()))], "max_image_pixels",
            "video 0: its 400x300 = 120,000-pixel frames are over the server's max_image_pixels=100,000"),
        "pdf_by_file_id": ([{"type": "file", "file": {"file_id": "file-abc"}}], "invalid_document",
                           "document 0: a file part needs file_data, a data:application/pdf;base64 URL; got "
                           "file_id (this server has no Files API)"),
        "pdf_as_a_url": ([{"type": "file", "file": {"file_data": "https://example.com/a.pdf"}}], "invalid_document",
                         "file_data must be a data URL"),
        "image_as_a_video": ([_video_part(_data_url("image/png", b"x"))], "invalid_video",
                             "video 0: data URLs must look like data:video/<type>;base64,<data>"),
        "broken_video": ([_video_part(_data_url("video/mp4", b"not a video"))], "invalid_video",
                         "video 0: cannot open the video"),
        "remote_video": ([_video_part("https://example.com/a.mp4")], "allow_remote_images",
                         "remote video URLs are refused"),
    }
    parts, code, words = cases[case]
    status, body = h.post_json(server, _ask(*parts))
    assert status == 400, body
    assert body["error"]["code"] == code and words in body["error"]["message"], body
    assert h.health(server)["status"] == "ok"


def test_video_and_document_bounds_are_flags(tmp_path: Path):
    from kimivl.chat.limits import ServerLimits

    with pytest.raises(ValueError, match="max_videos must be a positive integer, got 0"):
        ServerLimits(max_videos=0)
