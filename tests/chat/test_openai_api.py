"""The server through the official ``openai`` client: answers are the official greedy continuation (golden
image) or the library's own ``generate`` on the same conversation; usage counts; streaming; settings."""
from __future__ import annotations

import pytest

pytest.importorskip("openai", reason="the openai client is not installed (pip install openai)")


def test_models_health_and_page(client, server, h):
    assert [m.id for m in client.models.list().data] == ["kimivl-tiny"]
    assert h.health(server)["model"] == "kimivl-tiny"
    status, page = h.http(server.url + "/")
    assert status == 200 and "/v1/chat/completions" in page and "<title>kimivl chat</title>" in page


def test_non_streamed_answer_is_the_official_continuation(client, golden_dir, golden_answer, h):
    r = client.chat.completions.create(model="kimivl-tiny", messages=h.golden_messages(golden_dir))
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == golden_answer
    assert r.choices[0].finish_reason == "stop"  # [EOS] after the 7 tokens
    # golden README: 55 prompt ids, 12 of them image tokens; 7 tokens + [EOS]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (55, 8, 63)
    assert r.usage.prompt_tokens_details.image_tokens == 12


def test_streamed_answer_is_the_official_continuation(client, golden_dir, golden_answer, h):
    chunks = list(client.chat.completions.create(model="kimivl-tiny", messages=h.golden_messages(golden_dir),
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == golden_answer
    assert sum(bool(c.choices and c.choices[0].delta.content) for c in chunks) > 1  # really streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens_details.image_tokens == 12
    assert len({c.id for c in chunks}) == 1


def test_stream_ends_with_done_and_has_no_usage_unless_asked(server, golden_dir, h):
    import json
    import urllib.request

    body = json.dumps({"messages": h.golden_messages(golden_dir), "stream": True}).encode()
    request = urllib.request.Request(server.url + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = response.read().decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert all("usage" not in json.loads(e[6:]) for e in events[:-2])


def test_multi_image_matches_the_library(client, golden_dir, tiny, h):
    paths = [golden_dir / "inputs" / name for name in ("image_70x98.png", "image_140x56.png")]
    question = "Compare the two pictures."
    request = [{"role": "user", "content": [h.image_part(h.data_url(p)) for p in paths]
                + [{"type": "text", "text": question}]}]
    expected = h.reference_answer(tiny, [{"role": "user", "content": [{"type": "image", "image": str(p)} for p in paths]
                                          + [{"type": "text", "text": question}]}], max_new_tokens=20)
    r = client.chat.completions.create(model="kimivl-tiny", messages=request, max_tokens=20)
    assert r.choices[0].message.content == expected
    assert r.usage.prompt_tokens_details.image_tokens == 12 + 10  # grids 8x6 and 4x10, merged 2x2
    streamed = client.chat.completions.create(model="kimivl-tiny", messages=request, max_tokens=20, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected


def test_multi_turn_text_conversation_matches_the_library(client, tiny, h):
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hello?"},
                {"role": "assistant", "content": "Hi."},
                {"role": "user", "content": [{"type": "text", "text": "What "}, {"type": "text", "text": "now?"}]}]
    expected = h.reference_answer(tiny, messages, max_new_tokens=12)
    r = client.chat.completions.create(model="kimivl-tiny", messages=messages, max_completion_tokens=12)
    assert r.choices[0].message.content == expected


def test_max_tokens_gives_finish_reason_length(client, golden_dir, tiny, h):
    r = client.chat.completions.create(model="kimivl-tiny", messages=h.golden_messages(golden_dir), max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    assert r.choices[0].message.content == tiny[1].decode(h.GOLDEN_ANSWER_IDS[:3], skip_special_tokens=True)


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_cuts_the_answer_before_it(client, golden_dir, golden_answer, h, stream):
    stop = "detai"  # inside the golden answer; OpenAI leaves the stop string out
    assert stop in golden_answer
    r = client.chat.completions.create(model="kimivl-tiny", messages=h.golden_messages(golden_dir), stop=[stop],
                                       stream=stream)
    if stream:
        chunks = [c for c in r if c.choices]
        text, finish = "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason
    else:
        text, finish = r.choices[0].message.content, r.choices[0].finish_reason
    assert text == golden_answer[:golden_answer.index(stop)]
    assert finish == "stop"


def test_seeded_sampling_is_reproducible_and_matches_the_library(client, golden_dir, tiny, h):
    kwargs = dict(model="kimivl-tiny", messages=h.golden_messages(golden_dir), temperature=1.0, top_p=0.9, seed=11,
                  max_tokens=12)
    first = client.chat.completions.create(**kwargs).choices[0].message.content
    assert client.chat.completions.create(**kwargs).choices[0].message.content == first
    image = golden_dir / "inputs" / "image_70x98.png"
    expected = h.reference_answer(tiny, [{"role": "user", "content": [{"type": "image", "image": str(image)},
                                                                      {"type": "text", "text": h.GOLDEN_QUESTION}]}],
                                  do_sample=True, temperature=1.0, top_p=0.9, seed=11, max_new_tokens=12)
    assert first == expected


def test_local_image_under_the_allowed_path(client, media_dir, golden_answer):
    r = client.chat.completions.create(model="kimivl-tiny", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": (media_dir / "allowed" / "golden.png").as_uri()}},
        {"type": "text", "text": "Describe this picture."}]}])
    assert r.choices[0].message.content == golden_answer


def test_client_sees_the_error_message(client):
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="kimivl-tiny", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=100_000)
    assert info.value.status_code == 400 and info.value.code == "context_length_exceeded"
    assert "context_length of 512" in info.value.message
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert info.value.code == "model_not_found"


def _golden_logprobs(golden, tiny, answer_ids, top: int):
    """(token, bytes, logprob, [(token, logprob)] * top) of the answer tokens, from the official step logits."""
    import torch

    tokenizer = tiny[1].tokenizer
    rows = torch.log_softmax(golden["generate.step_logits"].double(), -1)
    out = []
    for token, row in zip(answer_ids, rows):
        best = row.topk(top)
        out.append((tokenizer.convert_ids_to_tokens(token), tokenizer.token_bytes(token), float(row[token]),
                    [(tokenizer.convert_ids_to_tokens(int(i)), float(v)) for v, i in zip(best.values, best.indices)]))
    return out


def _check_entries(entries, expected):
    assert len(entries) == len(expected) == 7  # the 7 answer tokens; the stop id [EOS] adds no content
    for entry, (token, token_bytes, logprob, top) in zip(entries, expected):
        assert (entry.token, bytes(entry.bytes)) == (token, token_bytes) and abs(entry.logprob - logprob) < 1e-4
        assert [t.token for t in entry.top_logprobs] == [t for t, _ in top]
        assert all(abs(t.logprob - lp) < 1e-4 for t, (_, lp) in zip(entry.top_logprobs, top))


def test_logprobs_are_the_official_step_distributions(client, golden_dir, golden, golden_answer, tiny, h):
    expected = _golden_logprobs(golden, tiny, h.GOLDEN_ANSWER_IDS, top=3)
    r = client.chat.completions.create(model="kimivl-tiny", messages=h.golden_messages(golden_dir), logprobs=True,
                                       top_logprobs=3)
    assert r.choices[0].message.content == golden_answer
    _check_entries(r.choices[0].logprobs.content, expected)
    assert b"".join(bytes(e.bytes) for e in r.choices[0].logprobs.content).decode(errors="replace") == golden_answer
    chunks = list(client.chat.completions.create(model="kimivl-tiny", messages=h.golden_messages(golden_dir),
                                                 logprobs=True, top_logprobs=3, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    _check_entries(streamed, expected)
    plain = client.chat.completions.create(model="kimivl-tiny", messages=h.golden_messages(golden_dir))
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == golden_answer


def test_top_logprobs_needs_logprobs(server, golden_dir, h):
    status, body = h.post_json(server, {"messages": h.golden_messages(golden_dir), "top_logprobs": 2})
    assert status == 400 and body["error"]["message"] == "top_logprobs needs logprobs=true"
    status, body = h.post_json(server, {"messages": h.golden_messages(golden_dir), "logprobs": True,
                                        "top_logprobs": 21})
    assert status == 400 and body["error"]["param"] == "top_logprobs"


def test_n_sampled_answers_are_the_library_batch(client, golden_dir, tiny, h):
    import torch

    from kimivl.generation import generate

    model, processor = tiny
    messages = h.golden_messages(golden_dir)
    r = client.chat.completions.create(model="kimivl-tiny", messages=messages, n=3, temperature=1.0, seed=5,
                                       max_tokens=6)
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image", "image": str(golden_dir / "inputs" / "image_70x98.png")},
                                      {"type": "text", "text": h.GOLDEN_QUESTION}]}],
        add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    with torch.inference_mode():
        out = generate(model, **inputs, max_new_tokens=6, do_sample=True, temperature=1.0, seed=5,
                       num_return_sequences=3, tokenizer=processor)
    expected = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.message.content for c in r.choices] == expected and len(set(expected)) > 1
    stop_ids = set(model.generation_config.eos_ids())
    new_ids = out[:, inputs["input_ids"].shape[1]:].tolist()
    used = [next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row)) for row in new_ids]
    assert r.usage.completion_tokens == sum(used)  # each answer's tokens, its stop id included
    chunks = list(client.chat.completions.create(model="kimivl-tiny", messages=messages, n=3, temperature=1.0,
                                                 seed=5, max_tokens=6, stream=True))
    texts = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
             for i in range(3)]
    assert texts == expected
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(finishes) == sorted(c.finish_reason for c in r.choices)


def test_n_greedy_answers_are_one_answer_given_n_times(client, golden_dir, golden_answer, h):
    r = client.chat.completions.create(model="kimivl-tiny", messages=h.golden_messages(golden_dir), n=2,
                                       temperature=0)
    assert [c.message.content for c in r.choices] == [golden_answer] * 2
    assert [c.finish_reason for c in r.choices] == ["stop", "stop"] and r.usage.completion_tokens == 16


def test_fields_clients_send_by_default_change_nothing(server, golden_dir, golden_answer, h):
    """Values that ask for nothing this server lacks (plain text, no tools, no storage) are accepted."""
    status, body = h.post_json(server, {"messages": h.golden_messages(golden_dir), "response_format": {"type": "text"},
                                        "tools": [], "tool_choice": "none", "parallel_tool_calls": False,
                                        "store": False, "metadata": {"run": "1"}, "service_tier": "auto"})
    assert status == 200 and body["choices"][0]["message"]["content"] == golden_answer, body


def test_the_next_turn_reads_the_history_from_the_prompt_cache(client, golden_dir, golden_answer, tiny, h):
    """usage.prompt_tokens_details.cached_tokens: the follow-up prefills only what is new (the image turn is read
    from the worker's prompt cache), and its answer is the library's full-prefill answer."""
    first = client.chat.completions.create(model="kimivl-tiny", messages=h.golden_messages(golden_dir))
    assert first.choices[0].message.content == golden_answer
    follow_up = [*h.golden_messages(golden_dir), {"role": "assistant", "content": golden_answer},
                 {"role": "user", "content": "And then?"}]
    second = client.chat.completions.create(model="kimivl-tiny", messages=follow_up, max_tokens=8)
    assert first.usage.prompt_tokens <= second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens
    image = {"type": "image", "image": str(golden_dir / "inputs" / "image_70x98.png")}
    expected = h.reference_answer(tiny, [{"role": "user", "content": [image, {"type": "text",
                                                                              "text": h.GOLDEN_QUESTION}]},
                                         {"role": "assistant", "content": golden_answer},
                                         {"role": "user", "content": "And then?"}], max_new_tokens=8)
    assert second.choices[0].message.content == expected


def test_interleaved_conversations_each_keep_their_prompt_cache(client, golden_dir, golden_answer, h):
    """Two conversations answered in turn (A, B, A, B): each follow-up reads its own history (--prompt-caches)."""
    a = h.golden_messages(golden_dir)
    b = [{"role": "user", "content": "Tell me a story about the sea."}]
    first = {"a": client.chat.completions.create(model="kimivl-tiny", messages=a, max_tokens=4),
             "b": client.chat.completions.create(model="kimivl-tiny", messages=b, max_tokens=4)}
    for name, messages in (("a", a), ("b", b)):
        follow_up = [*messages, {"role": "assistant", "content": first[name].choices[0].message.content},
                     {"role": "user", "content": "Go on."}]
        r = client.chat.completions.create(model="kimivl-tiny", messages=follow_up, max_tokens=4)
        assert r.usage.prompt_tokens_details.cached_tokens >= first[name].usage.prompt_tokens, name
