"""``response_format`` json_schema / json_object: the server's answers parse and validate by construction
(llguidance), streamed and not, and bad formats or schemas are 400s naming ``response_format``."""
from __future__ import annotations

import json
from typing import Any

import pytest

pytest.importorskip("llguidance", reason="structured output needs llguidance (pip install 'kimivl[structured]')")

SCHEMA = {"type": "object", "properties": {"color": {"enum": ["red", "blue"]},
                                           "count": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["color", "count"], "additionalProperties": False}
STORY = [{"role": "user", "content": "Tell me a story."}]


def _format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def test_json_schema_answers_validate(server, golden_dir, h):
    for messages in (STORY, h.golden_messages(golden_dir)):
        status, body = h.post_json(server, {"messages": messages, "response_format": _format(SCHEMA)})
        assert status == 200, body
        choice = body["choices"][0]
        value = json.loads(choice["message"]["content"])
        assert set(value) == {"color", "count"} and value["color"] in ("red", "blue") and 0 <= value["count"] <= 9
        assert choice["finish_reason"] == "stop"
    status, raw = h.http(server.url + "/v1/chat/completions", json.dumps(
        {"messages": STORY, "response_format": _format(SCHEMA), "stream": True, "n": 2, "temperature": 1.0,
         "seed": 2}).encode())
    assert status == 200, raw
    chunks = [json.loads(e[6:]) for e in raw.split("\n\n") if e.startswith("data: {")]
    for index in (0, 1):
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                       if c["choices"] and c["choices"][0]["index"] == index)
        assert json.loads(text)["color"] in ("red", "blue")


def test_json_object_answers_are_objects(server, h):
    bounded = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 8}}, "required": ["a"],
               "additionalProperties": False}
    status, body = h.post_json(server, {"messages": STORY, "response_format": {"type": "json_object"},
                                        "max_tokens": 1})
    assert status == 200 and body["choices"][0]["message"]["content"] == "{", body
    status, body = h.post_json(server, {"messages": STORY, "response_format": _format(bounded)})
    assert status == 200 and len(json.loads(body["choices"][0]["message"]["content"])["a"]) <= 8, body


@pytest.mark.parametrize(("fmt", "words"), [
    ({"type": "json_schema", "json_schema": {"name": "x"}}, 'response_format must be {"type": "text"}'),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
        "a": {"type": "nonsense"}}}}}, "response_format: the JSON schema cannot be used"),
    ({"type": "xml"}, "got {\"type\": \"xml\"}"),
])
def test_bad_formats_are_named(server, h, fmt, words):
    status, body = h.post_json(server, {"messages": STORY, "response_format": fmt})
    assert status == 400 and body["error"]["param"] == "response_format" and words in body["error"]["message"], body
