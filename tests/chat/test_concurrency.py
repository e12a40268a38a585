"""Several clients at once: one model worker, answers never mixed; disconnecting clients free the worker;
the queue bound answers 429."""
from __future__ import annotations

import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install openai)")

LONG = {"ignore_eos": True}  # extension: generate past [EOS], so a request runs until max_tokens


def _answer(client, messages, stream: bool, max_tokens: int | None = None) -> str:
    kwargs = {"max_tokens": max_tokens} if max_tokens else {}
    if not stream:
        r = client.chat.completions.create(model="kimivl-tiny", messages=messages, **kwargs)
        return r.choices[0].message.content
    chunks = client.chat.completions.create(model="kimivl-tiny", messages=messages, stream=True, **kwargs)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_eight_concurrent_clients_all_get_their_own_answer(server, golden_dir, golden_answer, tiny, h):
    """Eight clients (streamed and not, two different conversations) at once; each answer is exactly right."""
    text_messages = [{"role": "user", "content": "Tell me a story."}]
    text_answer = h.reference_answer(tiny, text_messages, max_new_tokens=16)
    jobs = [(h.golden_messages(golden_dir), golden_answer, None) if i % 2 == 0 else (text_messages, text_answer, 16)
            for i in range(8)]
    before = h.health(server)["requests"]["completed"]
    barrier = threading.Barrier(8, timeout=30)

    def run(i: int) -> str:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        messages, _, max_tokens = jobs[i]
        barrier.wait()
        return _answer(client, messages, stream=i % 4 < 2, max_tokens=max_tokens)

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = [f.result(timeout=180) for f in [pool.submit(run, i) for i in range(8)]]
    assert answers == [expected for _, expected, _ in jobs]
    assert h.health(server)["requests"]["completed"] == before + 8


def _stats(server, h) -> dict:
    return h.health(server)["requests"]


def _cancelled_while_held(server, h, release) -> None:
    """Wait until the job noticed its client left (held, or already stopped if that came before the hold), then
    let the worker go on: a cancelled job stops at its next token."""
    worker = h.worker_of(server)

    def noticed() -> bool:
        job = worker.current
        return job is None or job.cancelled.is_set()

    assert h.wait_for(noticed, timeout=30)
    release.set()


def test_disconnecting_streaming_client_frees_the_worker(server, client, tiny, golden_dir, golden_answer, h):
    before = _stats(server, h)
    with h.held_worker(tiny[0], after_steps=8) as release:
        stream = client.chat.completions.create(model="kimivl-tiny", messages=h.golden_messages(golden_dir),
                                                stream=True, max_tokens=450, extra_body=LONG)
        received = 0
        for chunk in stream:  # a few tokens, then hang up
            received += bool(chunk.choices and chunk.choices[0].delta.content)
            if received == 2:
                break
        stream.close()
        _cancelled_while_held(server, h, release)
    assert h.wait_for(lambda: _stats(server, h)["cancelled"] == before["cancelled"] + 1, timeout=30), _stats(server, h)
    assert _stats(server, h)["completed"] == before["completed"]  # stopped early, not run to max_tokens
    assert _answer(client, h.golden_messages(golden_dir), stream=False) == golden_answer
    assert h.wait_for(lambda: not h.health(server)["busy"], timeout=30)


def test_disconnecting_non_streaming_client_frees_the_worker(server, client, tiny, golden_dir, golden_answer, h):
    before = _stats(server, h)
    body = json.dumps({"messages": h.golden_messages(golden_dir), "max_tokens": 450, **LONG}).encode()
    with h.held_worker(tiny[0], after_steps=2) as release:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Content-Type: application/json\r\n" + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            assert h.wait_for(lambda: h.health(server)["busy"], timeout=30)
        _cancelled_while_held(server, h, release)
    assert h.wait_for(lambda: _stats(server, h)["cancelled"] == before["cancelled"] + 1, timeout=30), _stats(server, h)
    assert _stats(server, h)["completed"] == before["completed"]
    assert _answer(client, h.golden_messages(golden_dir), stream=True) == golden_answer


def test_full_queue_is_a_429_and_the_server_recovers(tiny, golden_dir, golden_answer, h):
    srv = h.start_server(tiny, max_queue=1)
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    try:
        with h.held_worker(tiny[0], after_steps=1) as release, ThreadPoolExecutor(max_workers=1) as pool:
            running = client.chat.completions.create(model="kimivl-tiny", messages=h.golden_messages(golden_dir),
                                                     stream=True, max_tokens=450, extra_body=LONG)
            next(iter(running))
            assert h.wait_for(lambda: h.health(srv)["busy"], timeout=30)  # held in its first steps
            waiting = pool.submit(_answer, client, h.golden_messages(golden_dir), False)
            assert h.wait_for(lambda: h.health(srv)["waiting"] == 1, timeout=30)
            with pytest.raises(openai.RateLimitError) as info:
                client.chat.completions.create(model="kimivl-tiny", messages=h.golden_messages(golden_dir))
            assert info.value.code == "max_queue" and "1 requests are waiting" in info.value.message
            running.close()  # the client leaves: the worker drops it and answers the waiting request
            _cancelled_while_held(srv, h, release)
            assert waiting.result(timeout=120) == golden_answer
    finally:
        srv.stop()
