"""``kimivl serve --reasoning-parser kimi_vl``: a thinking model's ◁think▷ block goes to ``reasoning_content`` /
``reasoning``, the answer to ``content``; streamed and not, with logprobs, and answers without a block unchanged.

The golden weights are random, so the model is made to answer a scripted thinking text (``h.scripted_answer``)
through the real server, worker and generation loop."""
from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

REASONING = "The shape is round and its color is blue."
ANSWER = "It is a blue circle."
THINKING_TEXT = f"◁think▷ {REASONING} ◁/think▷\n\n{ANSWER}"


@pytest.fixture(scope="module")
def thinking_server(tiny, h) -> Iterator[Any]:
    server = h.start_server(tiny, reasoning_parser="kimi_vl", **h.TEST_LIMITS)
    yield server
    server.stop()


def _answer_ids(tiny, text: str) -> list[int]:
    model, processor = tiny
    return processor.tokenizer.encode(text) + [model.generation_config.eos_ids()[0]]


def _stream(server, payload: dict[str, Any], h) -> list[dict[str, Any]]:
    status, raw = h.http(server.url + "/v1/chat/completions", json.dumps({**payload, "stream": True}).encode())
    assert status == 200, raw
    events = [e[len("data: "):] for e in raw.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def _request(h, **extra: Any) -> dict[str, Any]:
    return {"model": "kimivl-tiny", "messages": [{"role": "user", "content": "What is the shape?"}], **extra}


def test_reasoning_is_split_from_the_answer(thinking_server, tiny, h):
    ids = _answer_ids(tiny, THINKING_TEXT)
    with h.scripted_answer(tiny[0], ids):
        status, body = h.post_json(thinking_server, _request(h, logprobs=True))
        chunks = _stream(thinking_server, _request(h, logprobs=True), h)
    assert status == 200, body
    message = body["choices"][0]["message"]
    assert (message["content"], message["reasoning_content"], message["reasoning"]) == (ANSWER, REASONING, REASONING)
    assert body["choices"][0]["finish_reason"] == "stop" and body["usage"]["completion_tokens"] == len(ids)
    # every token's logprob entry is kept: their bytes are the whole raw text, markers included
    entries = body["choices"][0]["logprobs"]["content"]
    assert b"".join(bytes(e["bytes"]) for e in entries).decode() == THINKING_TEXT

    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]][1:]  # after the role chunk
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == REASONING
    assert "".join(d.get("content") or "" for d in deltas) == ANSWER
    assert all(d.get("reasoning") == d.get("reasoning_content") for d in deltas)
    assert sum(bool(d.get("reasoning_content")) for d in deltas) > 1 and sum(bool(d.get("content")) for d in deltas) > 1
    texts = [c for c in chunks if c["choices"] and c["choices"][0]["delta"]][1:]
    assert all(c["choices"][0]["delta"].get("content") or c["choices"][0]["delta"].get("reasoning_content")
               for c in texts)  # no empty chunks: logprobs wait for text
    streamed = [e for c in texts for e in c["choices"][0]["logprobs"]["content"]]
    assert streamed == entries


def test_an_unclosed_block_is_all_reasoning_and_plain_answers_pass(thinking_server, tiny, golden_dir, golden_answer,
                                                                   h):
    with h.scripted_answer(tiny[0], _answer_ids(tiny, THINKING_TEXT)):
        status, body = h.post_json(thinking_server, _request(h, max_tokens=12))  # cut inside the reasoning
        chunks = _stream(thinking_server, _request(h, max_tokens=12), h)
    assert status == 200, body
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"]["content"] == ""
    assert REASONING.startswith(choice["message"]["reasoning_content"]) and choice["message"]["reasoning_content"]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]][1:]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == choice["message"]["reasoning_content"]
    assert not any(d.get("content") for d in deltas)

    # an Instruct-style answer (no block) is the content as it was, and no reasoning
    status, body = h.post_json(thinking_server, {"model": "kimivl-tiny", "messages": h.golden_messages(golden_dir)})
    message = body["choices"][0]["message"]
    assert status == 200 and message["content"] == golden_answer and message["reasoning_content"] is None
    chunks = _stream(thinking_server, {"model": "kimivl-tiny", "messages": h.golden_messages(golden_dir)}, h)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == golden_answer


def test_n_answers_are_split_each(thinking_server, tiny, h):
    with h.scripted_answer(tiny[0], _answer_ids(tiny, THINKING_TEXT)):
        status, body = h.post_json(thinking_server, _request(h, n=2, temperature=1.0, seed=1))
        chunks = _stream(thinking_server, _request(h, n=2, temperature=1.0, seed=1), h)
    assert status == 200, body
    assert [(c["message"]["reasoning_content"], c["message"]["content"]) for c in body["choices"]] == \
        [(REASONING, ANSWER)] * 2
    for index in (0, 1):
        deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"] and c["choices"][0]["index"] == index]
        assert "".join(d.get("reasoning_content") or "" for d in deltas) == REASONING
        assert "".join(d.get("content") or "" for d in deltas) == ANSWER


def test_an_answer_sent_back_as_it_came_continues_the_chat(thinking_server, tiny, h):
    """``messages.append(response.choices[0].message)`` (the openai client's habit) sends reasoning_content and
    reasoning back: accepted, and only the answer is rendered into the next prompt."""
    openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install openai)")
    client = openai.OpenAI(base_url=thinking_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    messages: list[Any] = [{"role": "user", "content": "What is the shape?"}]
    with h.scripted_answer(tiny[0], _answer_ids(tiny, THINKING_TEXT)):
        first = client.chat.completions.create(model="kimivl-tiny", messages=messages)
        messages += [first.choices[0].message, {"role": "user", "content": "And its color?"}]
        second = client.chat.completions.create(model="kimivl-tiny", messages=messages)
    assert first.choices[0].message.reasoning_content == REASONING
    assert second.choices[0].message.content == ANSWER
    rendered = tiny[1].apply_chat_template([messages[0], {"role": "assistant", "content": ANSWER}, messages[2]],
                                           add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    assert second.usage.prompt_tokens == rendered["input_ids"].shape[1]


def test_json_output_follows_the_reasoning_block(thinking_server, tiny, h):
    """response_format with the reasoning parser: the ◁think▷ block stays free, the JSON after it validates."""
    pytest.importorskip("llguidance", reason="structured output needs llguidance (pip install 'kimivl[structured]')")
    schema = {"type": "object", "properties": {"color": {"enum": ["red", "blue"]}}, "required": ["color"],
              "additionalProperties": False}
    thinking = tiny[1].tokenizer.encode(f"◁think▷ {REASONING} ◁/think▷")
    with h.scripted_answer(tiny[0], thinking, then_free=True):
        status, body = h.post_json(thinking_server, _request(h, response_format={
            "type": "json_schema", "json_schema": {"name": "color", "schema": schema}}))
    assert status == 200, body
    message = body["choices"][0]["message"]
    assert message["reasoning_content"] == REASONING and json.loads(message["content"])["color"] in ("red", "blue")


def test_without_the_parser_the_text_is_raw(server, tiny, h):
    with h.scripted_answer(tiny[0], _answer_ids(tiny, THINKING_TEXT)):
        status, body = h.post_json(server, _request(h))
    assert status == 200 and body["choices"][0]["message"] == {"role": "assistant", "content": THINKING_TEXT}


def test_an_unknown_parser_is_named(tiny):
    from kimivl.chat.server import create_app

    with pytest.raises(ValueError, match=r"unknown reasoning parser 'deepseek_r1'; choose one of \['kimi_vl'\]"):
        create_app(*tiny, reasoning_parser="deepseek_r1")
