"""The ``kimivl`` command."""
from __future__ import annotations

import json

import pytest

from kimivl.cli import main


def test_info_reports_official_parameter_counts(configs_dir, capsys):
    assert main(["info", str(configs_dir / "Kimi-VL-A3B-Instruct"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"]["total"] == 16_407_656_048
    assert info["parameters"]["vision_tower"] == 416_866_032
    assert info["parameters"]["language_model"] == 15_960_110_208
    # 26 MoE layers x 58 inactive experts x 3 x 1408 x 2048 fewer parameters per token
    assert info["parameters"]["language_model_active_per_token"] == 15_960_110_208 - 26 * 58 * 3 * 1408 * 2048
    assert info["weights_bytes"]["bfloat16"] == 2 * 16_407_656_048
    assert info["mla_cache_bytes_per_token_bf16"] == (512 + 64) * 27 * 2


def test_info_on_a_missing_directory_is_a_clear_error(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_chat_one_shot_streams_an_answer(golden_dir, capsys):
    from kimivl.processing import KimiVLProcessor

    image = golden_dir / "inputs" / "image_70x98.png"
    rc = main(["chat", "--model", str(golden_dir), "--image", str(image), "--max-new-tokens", "8",
               "Describe this picture."])
    assert rc == 0
    out = capsys.readouterr().out
    # the golden weights are random: compare with the official greedy continuation instead of an answer
    expected = KimiVLProcessor.from_pretrained(golden_dir).decode([525, 638, 345, 480, 168, 557, 83],
                                                                  skip_special_tokens=True)
    assert out == expected + "\n"


def test_chat_with_a_missing_image_is_a_clear_error(golden_dir, tmp_path, capsys):
    rc = main(["chat", "--model", str(golden_dir), "--image", str(tmp_path / "nope.png"), "hi"])
    assert rc == 2
    assert "nope.png" in capsys.readouterr().err


def test_session_keeps_answers_not_reasoning_in_history(golden_dir):
    from kimivl.chat.session import ChatSession

    session = ChatSession.from_pretrained(str(golden_dir))
    session.attach("image", str(golden_dir / "inputs" / "image_28x28.png"))
    turn = session._finish(session.messages_for("what?")[-1], "◁think▷it is round◁/think▷ a circle")
    assert (turn.reasoning.strip(), turn.answer) == ("it is round", "a circle")
    assert session.history[-1] == {"role": "assistant", "content": "a circle"}
    assert session.history[-2]["content"][0]["type"] == "image" and session.pending == []
    session.reset()
    assert session.history == []


def test_session_generation_settings_are_checked_when_it_is_made():
    from kimivl.chat.session import ChatSession, generation_settings
    from kimivl.errors import KimiVLInputError

    with pytest.raises(KimiVLInputError, match=r"unknown generation setting 'max_tokens' \(did you mean "
                                               r"'max_new_tokens'\?\); the settings are max_new_tokens, "):
        ChatSession(None, None, generation={"max_tokens": 5})
    with pytest.raises(KimiVLInputError, match="unknown generation setting 'tokenizer'"):  # the session's own
        ChatSession(None, None, generation={"tokenizer": None})
    with pytest.raises(KimiVLInputError, match="generation must be a dict of stream.. settings, got int"):
        ChatSession(None, None, generation=5)
    assert {"max_new_tokens", "temperature", "seed", "stop_strings"} <= set(generation_settings())
    ChatSession(None, None, generation={"max_new_tokens": 5, "do_sample": False})


def test_session_drops_the_attachment_that_failed_and_stays_usable(golden_dir, tmp_path):
    from kimivl.chat.session import ChatSession
    from kimivl.errors import KimiVLInputError

    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    session = ChatSession.from_pretrained(str(golden_dir), generation={"max_new_tokens": 2})
    session.attach("image", str(bad))
    with pytest.raises(KimiVLInputError, match=r"image 0 \(message 0 item 0\): not a readable image"):
        session.answer("What is it?")
    assert session.pending == [] and session.history == []
    turn = session.answer("Then describe nothing.")  # the bad image is not sent again
    assert isinstance(turn.text, str) and len(session.history) == 2
    assert all(isinstance(m["content"], str) or all(p["type"] == "text" for p in m["content"])
               for m in session.history)


def test_chat_without_a_model_names_the_missing_demo_model(capsys, monkeypatch, tmp_path):
    import kimivl

    monkeypatch.setattr(kimivl, "DEMO_MODEL", str(tmp_path / "kimivl-demo"))
    assert main(["chat", "hi"]) == 2
    err = capsys.readouterr().err
    assert "demo model is not shipped" in err and "--model" in err


def test_chat_prints_a_thinking_models_answer_and_its_reasoning_only_when_asked():
    import io

    from kimivl.cli import _print_turn

    class Session:  # the deltas a thinking model streams, markers cut across them
        def ask(self, question):
            yield from ["◁thi", "nk▷ It is ro", "und. ◁/", "think▷\n\n", "A circ", "le."]

    hidden, shown = io.StringIO(), io.StringIO()
    _print_turn(Session(), "what?", False, hidden)
    _print_turn(Session(), "what?", True, shown)
    assert hidden.getvalue() == "A circle.\n"
    assert shown.getvalue() == "◁think▷ It is round. ◁/think▷\n\nA circle.\n"


def test_session_turns_read_the_history_from_the_prompt_cache(golden_dir):
    from kimivl.chat.session import ChatSession

    session = ChatSession.from_pretrained(str(golden_dir), generation={"max_new_tokens": 6})
    session.attach("image", str(golden_dir / "inputs" / "image_70x98.png"))
    first = session.answer("Describe this picture.")
    prompt_tokens = len(session.prompt_cache.ids) - 5  # the cache holds the prompt and 5 of the 6 new tokens
    second = session.answer("And then?")
    assert session.prompt_cache.reused >= prompt_tokens
    fresh = ChatSession.from_pretrained(str(golden_dir), generation={"max_new_tokens": 6})
    fresh.history = [session.history[0], {"role": "assistant", "content": first.answer}]
    assert fresh.answer("And then?").text == second.text  # a full prefill of the same conversation
    session.reset()
    assert session.prompt_cache.ids == [] and session.prompt_cache.cache is None


def test_info_reports_the_int8_size(configs_dir, capsys):
    """quantization="int8": the decoder's linear layers at one byte (+ a float32 scale per row), the rest bf16."""
    assert main(["info", str(configs_dir / "Kimi-VL-A3B-Instruct"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    quantized = 15_228_862_464  # every decoder Linear but lm_head and kv_b_proj (kimivl.quantization.int8)
    assert 15_000_000_000 < quantized < info["parameters"]["language_model"]
    rows = info["weights_bytes"]["int8"] - 2 * (16_407_656_048 - quantized) - quantized
    assert rows > 0 and rows % 4 == 0  # the scales: one float32 per output row
    assert info["weights_bytes"]["int8"] < 0.55 * info["weights_bytes"]["bfloat16"]


def test_chat_with_the_decoder_in_int8_still_answers(capsys):
    import kimivl

    image = f"{kimivl.__path__[0]}/assets/examples/shape.png"
    assert main(["chat", "--quantization", "int8", "--image", image, "What color is the shape?"]) == 0
    assert capsys.readouterr().out == "blue\n"
    with pytest.raises(SystemExit) as exit_:  # argparse: not a choice
        main(["chat", "-q", "int4", "hi"])
    assert exit_.value.code == 2 and "invalid choice: 'int4'" in capsys.readouterr().err
