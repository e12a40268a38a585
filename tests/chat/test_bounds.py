"""Safety of the server: every bound and refusal is a 4xx in the OpenAI error shape naming the rule, never a
500, and the server keeps answering correctly afterwards."""
from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image


def _png(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _user(*parts: dict) -> dict:
    return {"messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "What is it?"}]}]}


def _image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def _cases(media_dir, golden_dir) -> dict[str, tuple[dict | bytes, int, str, str]]:
    """name -> (request JSON or raw body, status, error code, words the message must contain)."""
    small = "data:image/png;base64," + base64.b64encode((golden_dir / "inputs" / "image_28x28.png")
                                                        .read_bytes()).decode()
    return {
        "body_too_large": ({"messages": [{"role": "user", "content": "x" * 600_000}]}, 413, "max_body_bytes",
                           "max_body_bytes=524,288"),
        "too_many_images": (_user(*[_image(small)] * 4), 400, "max_images", "4 images; the server's max_images is 3"),
        "too_many_pixels": (_user(_image(_png(400, 300))), 400, "max_image_pixels",
                            "400x300 = 120,000 pixels is over the server's max_image_pixels=100,000"),
        "context_by_max_tokens": ({**_user(_image(small)), "max_tokens": 500}, 400, "context_length_exceeded",
                                  "max_tokens 500, over the model's context_length of 512"),
        "context_by_prompt": ({"messages": [{"role": "user", "content": "lorem ipsum " * 400}]}, 400,
                              "context_length_exceeded", "context_length of 512"),
        "malformed_json": (b'{"messages": [', 400, "invalid_json", "not valid JSON"),
        "not_an_object": (b"[1, 2]", 400, "invalid_json", "must be a JSON object"),
        "nan": (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, "invalid_json",
                "NaN"),
        "unknown_field": ({**_user(), "functions": []}, 400, "unknown_field", "'functions'"),
        "json_mode": ({**_user(), "response_format": {"type": "xml"}}, 400, "invalid_value",
                      'response_format must be {"type": "text"}, {"type": "json_object"} or'),
        "tools": ({**_user(), "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "unsupported_value",
                  "tools are not supported: this server runs no tools (got 1)"),
        "tool_choice_required": ({**_user(), "tool_choice": "required"}, 400, "unsupported_value",
                                 "tool_choice 'required' is not supported"),
        "unknown_nested_field": (_user({"type": "image_url", "image_url": {"url": small, "size": 3}}), 400,
                                 "unknown_field", "messages[0].content[0].image_url.size"),
        "unknown_part_type": (_user({"type": "input_audio", "input_audio": {}}), 400, "invalid_value",
                              "messages[0].content[0]"),
        "bad_role": ({"messages": [{"role": "tool", "content": "x"}]}, 400, "invalid_value", "messages[0].role"),
        "no_messages": ({"messages": []}, 400, "invalid_value", "messages"),
        "temperature_range": ({**_user(), "temperature": 7}, 400, "invalid_value", "temperature"),
        "n_above_eight": ({**_user(), "n": 9}, 400, "invalid_value", "n"),
        "too_many_stops": ({**_user(), "stop": ["a", "b", "c", "d", "e"]}, 400, "invalid_value", "at most 4"),
        "model_not_found": ({**_user(), "model": "gpt-4o"}, 404, "model_not_found", "'gpt-4o' is not served here"),
        "remote_url": (_user(_image("https://example.com/cat.png")), 400, "allow_remote_images",
                       "--allow-remote-images"),
        "other_scheme": (_user(_image("ftp://example.com/cat.png")), 400, "invalid_image", "unsupported image URL"),
        "bad_base64": (_user(_image("data:image/png;base64,@@@not-base64@@@")), 400, "invalid_image",
                       "not valid base64"),
        "not_an_image": (_user(_image("data:image/png;base64," + base64.b64encode(b"hello world").decode())), 400,
                         "invalid_image", "not a readable image"),
        "truncated_image": (_user(_image("data:image/png;base64," + base64.b64encode(
            (golden_dir / "inputs" / "image_140x56.png").read_bytes()[:3000]).decode())), 400, "invalid_input",
                            "truncated"),
        "seed_range": ({**_user(), "seed": 2**70}, 400, "invalid_value", "seed"),
        "not_image_data_url": (_user(_image("data:text/plain;base64,aGk=")), 400, "invalid_image",
                               "data:image/<type>;base64"),
        "local_outside": (_user(_image((media_dir / "outside" / "secret.png").as_uri())), 400,
                          "allowed_local_media_path", "not a file under the allowed local media path"),
        "local_traversal": (_user(_image(str(media_dir / "allowed") + "/../outside/secret.png")), 400,
                            "allowed_local_media_path", "not a file under the allowed local media path"),
        "local_symlink_out": (_user(_image((media_dir / "allowed" / "link.png").as_uri())), 400,
                              "allowed_local_media_path", "not a file under the allowed local media path"),
        "local_missing": (_user(_image(str(media_dir / "allowed" / "nope.png"))), 400, "allowed_local_media_path",
                          "file not found"),
        "reasoning_on_a_user_message": ({"messages": [{"role": "user", "content": "hi", "reasoning_content": "x"}]},
                                        400, "invalid_value",
                                        "messages[0].reasoning_content is a field of assistant messages"),
        "tool_calls": ({"messages": [{"role": "user", "content": "hi"},
                                     {"role": "assistant", "content": "", "tool_calls": [{"id": "c"}]},
                                     {"role": "user", "content": "and?"}]}, 400, "invalid_value",
                       "messages[1].tool_calls: this server runs no tools"),
    }


CASES = ["body_too_large", "too_many_images", "too_many_pixels", "context_by_max_tokens", "context_by_prompt",
         "malformed_json", "not_an_object", "nan", "unknown_field", "json_mode", "tools", "tool_choice_required",
         "unknown_nested_field", "unknown_part_type",
         "bad_role", "no_messages", "temperature_range", "n_above_eight", "too_many_stops", "model_not_found",
         "remote_url", "other_scheme", "bad_base64", "not_an_image", "truncated_image", "seed_range",
         "not_image_data_url", "local_outside",
         "local_traversal", "local_symlink_out", "local_missing", "reasoning_on_a_user_message", "tool_calls"]


@pytest.mark.parametrize("case", CASES)
def test_bad_request_is_a_4xx_naming_the_rule(server, media_dir, golden_dir, h, case):
    payload, status, code, words = _cases(media_dir, golden_dir)[case]
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    got, answer = h.http(server.url + "/v1/chat/completions", body)
    assert got == status, answer
    error = answer["error"]
    assert error["code"] == code and words in error["message"], error
    assert error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}
    assert h.health(server)["status"] == "ok"


def test_bounds_in_streaming_requests_are_json_errors_too(server, h):
    got, answer = h.post_json(server, {**_user(_image(_png(400, 300))), "stream": True})
    assert got == 400 and answer["error"]["code"] == "max_image_pixels"


def test_unknown_routes_and_methods_use_the_error_shape(server, h):
    got, answer = h.http(server.url + "/v1/completions", b"{}")
    assert got == 404 and answer["error"]["code"] == "not_found"
    got, answer = h.http(server.url + "/v1/chat/completions", method="GET")
    assert got == 405 and answer["error"]["code"] == "method_not_allowed"


def test_chunked_body_over_the_bound_is_refused(server, h):
    """No Content-Length: the counted bytes are bounded as well."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        payload = json.dumps({"messages": [{"role": "user", "content": "y" * 700_000}]}).encode()
        chunks = (payload[i:i + 65536] for i in range(0, len(payload), 65536))
        conn.request("POST", "/v1/chat/completions", body=chunks, encode_chunked=True,
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 413 and json.loads(response.read())["error"]["code"] == "max_body_bytes"
    finally:
        conn.close()


def test_server_without_local_path_refuses_files_and_can_allow_remote_urls(tiny, golden_dir, golden_answer, h):
    """A second server: remote URLs allowed (fetched here from a loopback HTTP server), local files refused."""
    import http.server
    import threading

    image = (golden_dir / "inputs" / "image_70x98.png").read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            found = self.path == "/golden.png"
            self.send_response(200 if found else 404)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(image if found else b"")

        def log_message(self, *args: object) -> None:
            pass

    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=files.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    srv = h.start_server(tiny, allow_remote_images=True, max_images=2)
    try:
        base = f"http://127.0.0.1:{files.server_address[1]}"
        got, answer = h.post_json(srv, {"messages": [{"role": "user", "content": [
            _image(base + "/golden.png"), {"type": "text", "text": h.GOLDEN_QUESTION}]}]})
        assert got == 200 and answer["choices"][0]["message"]["content"] == golden_answer
        got, answer = h.post_json(srv, _user(_image(base + "/missing.png")))
        assert got == 400 and answer["error"]["code"] == "remote_fetch_failed" and "404" in answer["error"]["message"]
        got, answer = h.post_json(srv, _user(_image(str(golden_dir / "inputs" / "image_28x28.png"))))
        assert got == 400 and answer["error"]["code"] == "allowed_local_media_path"
        assert "--allowed-local-media-path" in answer["error"]["message"]
        assert h.health(srv)["status"] == "ok"
    finally:
        srv.stop()
        files.shutdown()
        files.server_close()
        thread.join(timeout=10)


def test_still_answers_correctly_after_the_bad_requests(client, golden_dir, golden_answer, h):
    r = client.chat.completions.create(model="kimivl-tiny", messages=h.golden_messages(golden_dir))
    assert r.choices[0].message.content == golden_answer
