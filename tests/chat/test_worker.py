"""Pieces of the server without HTTP: the stop-string trimmer of streamed text, the loopback check."""
from __future__ import annotations

import random

import pytest

from kimivl.chat.worker import StopTrimmer


def _trimmed(text: str, stops: list[str]) -> str:
    cuts = [text.find(s) for s in stops if s in text]
    return text[:min(cuts)] if cuts else text


@pytest.mark.parametrize("stops", [["END"], ["\n\n", "Q:"], ["abcab"], ["x"]])
def test_stop_trimmer_gives_the_cut_text_for_any_split_into_deltas(stops):
    rng = random.Random(0)
    alphabet = "abcENDQ:x\n "
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(0, len(text) + 1)))
        deltas = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        trimmer = StopTrimmer(stops)
        out = "".join(trimmer.push(d) for d in deltas) + trimmer.flush()
        assert out == _trimmed(text, stops), (text, deltas)
        assert trimmer.hit == any(s in text for s in stops)


def test_stop_trimmer_holds_back_only_a_possible_stop_prefix():
    trimmer = StopTrimmer(["STOP"])
    assert trimmer.push("hello ST") == "hello "
    assert trimmer.push("AR") == "STAR"
    assert trimmer.push(" and STO") == " and "
    assert trimmer.push("P more") == "" and trimmer.hit
    assert trimmer.flush() == ""


def test_loopback_check():
    pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
    from kimivl.chat.server import is_loopback

    assert all(is_loopback(h) for h in ("127.0.0.1", "127.8.0.1", "::1", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.4", "example.com"))
