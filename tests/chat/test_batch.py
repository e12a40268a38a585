"""``kimivl run-batch``: an OpenAI batch file answered by the server's own code, in order, nothing dropped."""
from __future__ import annotations

import json
from pathlib import Path

from kimivl.cli import main


def test_run_batch_answers_every_line_in_order(golden_dir: Path, tmp_path: Path, golden_answer, tiny, h):
    lines = [
        {"custom_id": "image", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "kimivl-tiny", "messages": h.golden_messages(golden_dir)}},
        {"custom_id": "sampled", "method": "POST", "url": "/v1/chat/completions",
         "body": {"messages": [{"role": "user", "content": "Tell me a story."}], "n": 2, "temperature": 1.0,
                  "seed": 5, "max_tokens": 6}},
        {"custom_id": "refused", "method": "POST", "url": "/v1/chat/completions",
         "body": {"messages": [{"role": "user", "content": "hi"}], "functions": []}},
        {"custom_id": "embeddings", "method": "POST", "url": "/v1/embeddings", "body": {"input": "hi"}},
        {"custom_id": "streamed", "method": "POST", "url": "/v1/chat/completions",
         "body": {"messages": [{"role": "user", "content": "hi"}], "stream": True}},
    ]
    source = tmp_path / "batch.jsonl"
    source.write_text("\n".join([*(json.dumps(line) for line in lines[:2]), "{not json", "",
                                 *(json.dumps(line) for line in lines[2:])]) + "\n")
    out = tmp_path / "out" / "results.jsonl"
    assert main(["run-batch", "-i", str(source), "-o", str(out), "--model", str(golden_dir),
                 "--served-model-name", "kimivl-tiny", "--log-level", "warning"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["custom_id"] for r in records] == ["image", "sampled", None, "refused", "embeddings", "streamed"]
    image, sampled, broken, refused, embeddings, streamed = records
    assert image["error"] is None and image["response"]["status_code"] == 200
    assert image["response"]["body"]["choices"][0]["message"]["content"] == golden_answer
    assert image["response"]["request_id"] == image["response"]["body"]["id"]
    assert len({c["message"]["content"] for c in sampled["response"]["body"]["choices"]}) == 2
    assert broken["error"]["code"] == "invalid_json" and "line 3" in broken["error"]["message"]
    assert refused["response"]["status_code"] == 400
    assert refused["response"]["body"]["error"]["code"] == "unknown_field"
    assert embeddings["error"]["code"] == "invalid_url" and streamed["error"]["code"] == "invalid_request"


def test_a_missing_input_file_is_named(tmp_path: Path, capsys):
    assert main(["run-batch", "-i", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "out.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "kimivl run-batch: error: --input-file" in err and "nope.jsonl: no such file" in err


def test_run_batch_on_an_int8_model_equals_the_library(golden_dir: Path, tmp_path: Path, h):
    """``--quantization int8`` reaches the served model: the answer is the int8 library model's greedy answer."""
    from kimivl import KimiVLForConditionalGeneration, KimiVLProcessor

    source = tmp_path / "batch.jsonl"
    body = {"messages": h.golden_messages(golden_dir), "max_tokens": 6}
    source.write_text(json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
                                  "body": body}) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["run-batch", "-i", str(source), "-o", str(out), "--model", str(golden_dir), "-q", "int8",
                 "--log-level", "warning"]) == 0
    answer = json.loads(out.read_text())["response"]["body"]["choices"][0]["message"]["content"]
    from PIL import Image

    model = KimiVLForConditionalGeneration.from_pretrained(golden_dir, quantization="int8")
    processor = KimiVLProcessor.from_pretrained(golden_dir)
    image = Image.open(golden_dir / "inputs" / "image_70x98.png")
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": h.GOLDEN_QUESTION}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    ids = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert answer == processor.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
