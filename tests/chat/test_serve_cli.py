"""``kimivl serve`` as a user runs it: a subprocess on a free loopback port, then a request, then Ctrl-C."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys

import pytest

from kimivl.cli import build_parser


def test_serve_defaults_bind_loopback_and_use_the_demo_model():
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.model) == ("127.0.0.1", 8000, None)
    assert not args.allow_remote_images and args.allowed_local_media_path is None


@pytest.mark.parametrize("value, message", [("99999", "port must be 0-65535, got 99999"),
                                            ("-1", "port must be 0-65535, got -1"),
                                            ("http", "port must be an integer 0-65535, got 'http'")])
def test_serve_port_out_of_range_is_a_usage_error(capsys, value, message):
    with pytest.raises(SystemExit) as exit_:  # argparse, before anything is loaded or bound
        build_parser().parse_args(["serve", "--port", value])
    assert exit_.value.code == 2 and f"argument --port: {message}" in capsys.readouterr().err
    assert build_parser().parse_args(["serve", "--port", "0"]).port == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_kimivl_serve_answers_and_stops_on_ctrl_c(golden_dir, golden_answer, h):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kimivl.cli", "serve", "--model", str(golden_dir), "--port",
                             str(port), "--max-images", "2", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"kimivl serve exited with {proc.returncode}: {proc.stdout.read()}")
            try:
                return h.http(base + "/health")[0] == 200
            except OSError:
                return False

        assert h.wait_for(up, timeout=120, interval=0.2), "kimivl serve did not come up within 120 s"
        status, body = h.http(base + "/v1/models")
        assert status == 200 and body["data"][0]["id"] == "kimivl-tiny"  # the directory name
        payload = {"messages": h.golden_messages(golden_dir)}
        status, body = h.http(base + "/v1/chat/completions", json.dumps(payload).encode())
        assert status == 200 and body["choices"][0]["message"]["content"] == golden_answer
        image = h.image_part(h.data_url(golden_dir / "inputs" / "image_28x28.png"))
        status, body = h.http(base + "/v1/chat/completions", json.dumps(
            {"messages": [{"role": "user", "content": [image] * 3}]}).encode())
        assert status == 400 and body["error"]["code"] == "max_images"  # the flag reached the server
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 0


def test_serve_with_a_missing_model_is_a_clear_error(tmp_path, capsys):
    pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
    from kimivl.cli import main

    assert main(["serve", "--model", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
