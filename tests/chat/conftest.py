"""Fixtures for the server tests: the golden tiny model, uvicorn servers on loopback, request helpers.

The golden weights are random, so answers are gibberish but deterministic: tests compare the server's text
with the official greedy continuation (golden README) or with the library's own ``generate`` on the same
messages. Servers listen on 127.0.0.1 only, on a free port, in a daemon thread.
"""
from __future__ import annotations

import base64
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="the [serve] extra is not installed (fastapi)")
pytest.importorskip("uvicorn", reason="the [serve] extra is not installed (uvicorn)")

# the official greedy continuation of the golden prompt (golden README), before [EOS]
GOLDEN_ANSWER_IDS = [525, 638, 345, 480, 168, 557, 83]
GOLDEN_QUESTION = "Describe this picture."
REQUEST_TIMEOUT_S = 60.0


class ServerThread:
    """uvicorn serving an app on 127.0.0.1:<free port> in a daemon thread."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the test server did not start within {timeout} s")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()


@pytest.fixture(scope="session")
def tiny(golden_dir: Path) -> tuple[Any, Any]:
    """(model, processor) of the golden tiny checkpoint."""
    from kimivl.modeling import KimiVLForConditionalGeneration
    from kimivl.processing import KimiVLProcessor

    return KimiVLForConditionalGeneration.from_pretrained(golden_dir), KimiVLProcessor.from_pretrained(golden_dir)


@pytest.fixture(scope="session")
def golden_answer(tiny: tuple[Any, Any]) -> str:
    return tiny[1].decode(GOLDEN_ANSWER_IDS, skip_special_tokens=True)


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory: pytest.TempPathFactory, golden_dir: Path) -> Path:
    """``allowed/`` (the server's allowed local media path, with a golden image and a symlink that leads out
    of it) beside ``outside/`` (an image the server must not read)."""
    root = tmp_path_factory.mktemp("media")
    (root / "allowed").mkdir()
    (root / "outside").mkdir()
    image = (golden_dir / "inputs" / "image_70x98.png").read_bytes()
    (root / "allowed" / "golden.png").write_bytes(image)
    (root / "outside" / "secret.png").write_bytes(image)
    (root / "allowed" / "link.png").symlink_to(root / "outside" / "secret.png")
    return root


def start_server(tiny: tuple[Any, Any], reasoning_parser: str | None = None, **limits: Any) -> ServerThread:
    from kimivl.chat.limits import ServerLimits
    from kimivl.chat.server import create_app

    model, processor = tiny
    return ServerThread(create_app(model, processor, model_name="kimivl-tiny", limits=ServerLimits(**limits),
                                   reasoning_parser=reasoning_parser)).start()


# bounds small enough for the tests to cross them with small inputs
TEST_LIMITS = {"max_body_bytes": 512 * 1024, "max_images": 3, "max_image_pixels": 100_000}


@pytest.fixture(scope="session")
def server(tiny: tuple[Any, Any], media_dir: Path) -> Iterator[ServerThread]:
    srv = start_server(tiny, allowed_local_media_path=str(media_dir / "allowed"), **TEST_LIMITS)
    yield srv
    srv.stop()


@pytest.fixture()
def client(server: ServerThread) -> Any:
    openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install openai)")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_S)


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def golden_messages(golden_dir: Path) -> list[dict[str, Any]]:
    """The golden prompt (one image, the golden question) as an OpenAI request."""
    return [{"role": "user", "content": [image_part(data_url(golden_dir / "inputs" / "image_70x98.png")),
                                         {"type": "text", "text": GOLDEN_QUESTION}]}]


def http(url: str, body: bytes | None = None, method: str | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """(status, parsed JSON body or text) of one request, without raising on 4xx/5xx."""
    request = urllib.request.Request(url, data=body, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def post_json(server: ServerThread, payload: dict[str, Any]) -> tuple[int, Any]:
    return http(server.url + "/v1/chat/completions", json.dumps(payload).encode())


def health(server: ServerThread) -> dict[str, Any]:
    status, body = http(server.url + "/health")
    assert status == 200 and body["status"] == "ok", body
    return body


def wait_for(predicate: Any, timeout: float = 20.0, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds passed (bounded in time and count)."""
    for _ in range(int(timeout / interval) + 1):
        if predicate():
            return True
        time.sleep(interval)
    return False


def reference_answer(tiny: tuple[Any, Any], messages: list[dict[str, Any]], **settings: Any) -> str:
    """The library's own answer (processor + generate) for processor-format messages."""
    import torch

    from kimivl.generation import generate

    model, processor = tiny
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    with torch.inference_mode():
        out = generate(model, inputs["input_ids"], inputs["attention_mask"], inputs.get("pixel_values"),
                       inputs.get("image_grid_hws"), tokenizer=processor, **settings)
    return processor.decode(out[0, inputs["input_ids"].shape[1]:].tolist(), skip_special_tokens=True)


@contextmanager
def held_worker(model: Any, after_steps: int) -> Iterator[threading.Event]:
    """Make the model worker wait (in its next ``lm_head`` call after ``after_steps`` steps) until the yielded
    event is set, so tests of busy / disconnect / queue states do not depend on how fast the machine is."""
    release = threading.Event()
    steps = [0]

    def hook(module: Any, args: Any) -> None:
        steps[0] += 1
        if steps[0] > after_steps:
            release.wait(timeout=120)

    handle = model.language_model.lm_head.register_forward_pre_hook(hook)
    try:
        yield release
    finally:
        release.set()
        handle.remove()


@contextmanager
def scripted_answer(model: Any, token_ids: list[int], then_free: bool = False) -> Iterator[None]:
    """Make the model answer ``token_ids`` (then repeat the last) in every generation: each ``lm_head`` call's
    logits put all weight on the next scripted id, counted from the prompt's forward (the prefill, the only
    forward asked for ``last_positions``: with a prompt cache it may cover a single new position). The golden
    weights are random; this gives the real server and generation loop an answer with a known text, e.g. a
    thinking model's (``then_free``: only its beginning, the model's own logits after it)."""
    import torch

    calls = [0]

    def restart(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        if kwargs.get("last_positions") is not None:
            calls[0] = 0

    def hook(module: Any, args: Any, out: torch.Tensor) -> torch.Tensor:
        if then_free and calls[0] >= len(token_ids):  # the script said: the model's own logits from here
            return out
        token = token_ids[min(calls[0], len(token_ids) - 1)]
        calls[0] += 1
        forced = torch.full_like(out, -30.0)
        forced[..., token] = 30.0
        return forced

    handles = [model.language_model.model.register_forward_pre_hook(restart, with_kwargs=True),
               model.language_model.lm_head.register_forward_hook(hook)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def worker_of(server: ServerThread) -> Any:
    return server.server.config.app.state.service.worker


@pytest.fixture(scope="session")
def h() -> Any:
    """The helpers above, for the test modules (conftest modules are not importable under importlib mode)."""
    import types

    return types.SimpleNamespace(
        GOLDEN_ANSWER_IDS=GOLDEN_ANSWER_IDS, GOLDEN_QUESTION=GOLDEN_QUESTION, TEST_LIMITS=TEST_LIMITS,
        start_server=start_server, data_url=data_url, image_part=image_part, golden_messages=golden_messages,
        http=http, post_json=post_json, health=health, wait_for=wait_for, reference_answer=reference_answer,
        held_worker=held_worker, worker_of=worker_of, scripted_answer=scripted_answer)
