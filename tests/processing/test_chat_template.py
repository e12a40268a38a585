"""Chat rendering: golden text, default template == official template, loss mask, thinking helpers."""
from __future__ import annotations

import pytest
import torch

from kimivl.errors import KimiVLInputError
from kimivl.processing import (IGNORE_INDEX, IMAGE_BLOCK, ChatRenderer, ThinkingStream, prepare_messages,
                               split_thinking, strip_thinking)

CONVERSATIONS = [
    [{"role": "user", "content": [{"type": "image", "image": "x.png"}, {"type": "text", "text": "Describe."}]}],
    [{"role": "user", "content": "What is in the image?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "hello"},
     {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "u"}},
                                  {"type": "text", "text": " b"}, {"image": "y.png"}]}],
    [{"role": "assistant", "content": [{"type": "text", "text": "x"}]}, {"role": "user", "content": ""}],
]


def test_golden_chat_text(tiny_processor, expected_json):
    for key, messages in [("prompt", expected_json["prompt"]["messages"]),
                          ("text_only", [{"role": "user", "content": "What is in the image?"}])]:
        text = tiny_processor.apply_chat_template(messages, add_generation_prompt=True)
        assert text == expected_json[key]["chat_text"]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_builtin_template_renders_like_the_official_one(tiny_dir, messages, add_generation_prompt):
    official = ChatRenderer((tiny_dir / "chat_template.jinja").read_text())
    builtin = ChatRenderer(None)
    prepared, _ = prepare_messages(messages, need_sources=False)
    assert builtin.render(prepared, add_generation_prompt=add_generation_prompt) == \
        official.render(prepared, add_generation_prompt=add_generation_prompt)


def test_template_text_format(tiny_processor):
    text = tiny_processor.apply_chat_template(CONVERSATIONS[2], add_generation_prompt=True)
    assert text == ("<|im_system|>system<|im_middle|>Be brief.<|im_end|><|im_user|>user<|im_middle|>hi<|im_end|>"
                    "<|im_assistant|>assistant<|im_middle|>hello<|im_end|><|im_user|>user<|im_middle|>a"
                    f"{IMAGE_BLOCK} b{IMAGE_BLOCK}<|im_end|><|im_assistant|>assistant<|im_middle|>")


def test_batch_of_conversations_renders_each(tiny_processor):
    texts = tiny_processor.apply_chat_template(CONVERSATIONS[:2], add_generation_prompt=True)
    assert isinstance(texts, list) and len(texts) == 2 and texts[1].endswith("<|im_assistant|>assistant<|im_middle|>")


def test_loss_mask_covers_assistant_content_and_end_token(processor, tiny_dir):
    conversation = [
        {"role": "user", "content": [{"type": "image", "image": tiny_dir / "inputs" / "image_28x28.png"},
                                     {"type": "text", "text": "What colour?"}]},
        {"role": "assistant", "content": "Mostly green."},
        {"role": "user", "content": "Sure?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Yes, "}, {"type": "text", "text": "quite."}]},
    ]
    out = processor.apply_chat_template(conversation, tokenize=True, return_dict=True, return_tensors="pt",
                                        return_labels=True)
    ids, labels = out.input_ids[0], out.labels[0]
    plain = processor.apply_chat_template(conversation, tokenize=True, return_dict=True, return_tensors="pt")
    assert torch.equal(plain.input_ids, out.input_ids)  # same renderer, same ids
    assert torch.equal(out.pixel_values, plain.pixel_values)
    trained = labels != IGNORE_INDEX
    assert torch.equal(labels[trained], ids[trained])
    # the trained positions are exactly the two assistant answers, each with its <|im_end|>
    runs, current = [], []
    for i in range(len(ids)):
        if trained[i]:
            current.append(int(ids[i]))
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    assert [processor.decode(r) for r in runs] == ["Mostly green.<|im_end|>", "Yes, quite.<|im_end|>"]
    assert not trained[ids == processor.image_token_id].any()


def test_loss_mask_batch_padding_and_rules(processor):
    convs = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
             [{"role": "user", "content": "A longer question here?"}, {"role": "assistant", "content": "No."}]]
    out = processor.apply_chat_template(convs, tokenize=True, return_dict=True, return_tensors="pt",
                                        return_labels=True, padding_side="right")
    assert out.labels.shape == out.input_ids.shape
    assert torch.all(out.labels[out.attention_mask == 0] == IGNORE_INDEX)
    assert out.attention_mask[0, -1] == 0 and out.attention_mask[0, 0] == 1
    with pytest.raises(KimiVLInputError, match="return_labels needs tokenize=True"):
        processor.apply_chat_template(convs[0], tokenize=False, return_labels=True)
    with pytest.raises(KimiVLInputError, match="add_generation_prompt=False"):
        processor.apply_chat_template(convs[0], tokenize=True, add_generation_prompt=True, return_labels=True)


def test_loss_mask_refuses_templates_that_rewrite_assistant_content():
    renderer = ChatRenderer("{% for m in messages %}{{ m['content'] | upper }}{% endfor %}")
    renderer_drop = ChatRenderer("{% for m in messages if m['role'] != 'assistant' %}{{ m['content'] }}{% endfor %}")
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert renderer.render_with_mask(messages).trainable_spans == [(1, 2)]  # upper() keeps the sentinels
    with pytest.raises(KimiVLInputError, match="verbatim"):
        renderer_drop.render_with_mask(messages)


def test_thinking_split():
    assert split_thinking("◁think▷ I look closely. ◁/think▷ A cat.") == ("I look closely.", "A cat.", True)
    assert split_thinking("◁think▷ still thinking") == ("still thinking", "", False)
    assert split_thinking("A plain answer.") == ("", "A plain answer.", True)
    assert split_thinking("reasoning after an opened prompt◁/think▷answer") == (
        "reasoning after an opened prompt", "answer", True)
    assert split_thinking("◁think▷a◁/think▷b").answer == "b"


def _streamed(pieces: list[str], inside: bool = False) -> tuple[list[str], list[str]]:
    """Each push's (reasoning, answer) and the flush's, as two lists of pieces."""
    stream = ThinkingStream(inside=inside)
    out = [stream.push(p) for p in pieces] + [stream.flush()]
    return [r for r, _ in out], [a for _, a in out]


THINKING_OUTPUTS = ["◁think▷ I look closely.\n It is round. ◁/think▷\n\nA circle, blue.",
                    "◁think▷still thinking  ", "  A plain answer ◁ with a ◁think mark inside.  ",
                    "\n◁think▷a◁/think▷b", "◁think▷◁/think▷", "◁thin", "◁think▷x◁/thi"]


@pytest.mark.parametrize("text", THINKING_OUTPUTS)
def test_thinking_stream_equals_the_split_at_every_cut(text: str) -> None:
    """Cut the text into two and three pieces everywhere (markers and whitespace runs split across pieces):
    the joined reasoning / answer never depend on the cuts, and equal split_thinking's for outputs that open
    with the marker; text without an opening marker passes unchanged."""
    want = ("", text)
    if text.lstrip().startswith("◁think▷"):
        close = text.find("◁/think▷")
        want = (split_thinking(text).reasoning, text[close + len("◁/think▷"):].lstrip() if close >= 0 else "")
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            reasoning, answer = _streamed([text[:i], text[i:j], text[j:]])
            assert ("".join(reasoning), "".join(answer)) == want, (i, j)


def test_thinking_stream_holds_back_only_what_may_still_change() -> None:
    reasoning, answer = _streamed(["◁think▷ The", " shape is", " round. ◁", "/think▷ Blue", " circle."])
    assert reasoning == ["The", " shape is", " round.", "", "", ""]  # " ◁" waits: it may open the close marker
    assert answer == ["", "", "", "Blue", " circle.", ""]
    assert _streamed(["He", "llo"]) == (["", "", ""], ["He", "llo", ""])  # no marker can start with "He"
    assert _streamed(["◁", "x"]) == (["", "", ""], ["", "◁x", ""])
    assert _streamed(["still", " in◁/think▷ out"], inside=True) == (["still", " in", ""], ["", "out", ""])


def test_strip_thinking_history():
    history = [{"role": "user", "content": "Q1"},
               {"role": "assistant", "content": "◁think▷long reasoning◁/think▷Answer 1"},
               {"role": "user", "content": "Q2"},
               {"role": "assistant", "content": [{"type": "text", "text": "◁think▷more◁/think▷Answer 2"}]}]
    stripped = strip_thinking(history)
    assert stripped[1]["content"] == "Answer 1"
    assert stripped[3]["content"] == [{"type": "text", "text": "Answer 2"}]
    assert history[1]["content"].startswith("◁think▷")  # input untouched
    assert strip_thinking(history, keep_last=True)[3] is history[3]


@pytest.mark.parametrize("messages, message", [
    ({"role": "user", "content": "x"}, "a conversation is a list"),
    ([{"content": "x"}], "message 0 must be a dict with a string 'role'"),
    ([{"role": "assistant", "content": None}], "content must be a string or a list"),
    ([{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]}], "unknown content type 'audio'"),
    ([{"role": "user", "content": [{"type": "text"}]}], "text item without a string 'text'"),
    ([{"role": "user", "content": ["hello"]}], "content items are dicts"),
    ([{"role": "user", "content": [{"type": "image"}]}], "image item without its data"),
])
def test_malformed_messages(tiny_processor, messages, message):
    with pytest.raises(KimiVLInputError, match=message):
        tiny_processor.apply_chat_template(messages, tokenize=True)


@pytest.mark.parametrize("messages, message", [
    ([{"role": "user", "content": "hi"}, {"role": "robot", "content": "hi"}],
     r"message 1: unknown role 'robot' \(the chat template knows assistant, system, user\)"),
    ([], r"the conversation is empty: it needs at least one message"),
])
@pytest.mark.parametrize("tokenize", [True, False])
def test_unknown_roles_and_empty_conversations(tiny_processor, messages, message, tokenize):
    with pytest.raises(KimiVLInputError, match=message):
        tiny_processor.apply_chat_template(messages, tokenize=tokenize)


def test_roles_a_template_tests_for_are_accepted(tiny_processor):
    """A role outside system/user/assistant renders with no role token in the Kimi-VL template, so it is refused;
    a template that handles it (``message['role'] == 'tool'``) may use it."""
    template = ("{% for m in messages %}{% if m['role'] == 'tool' %}<tool>{% endif %}{{ m['content'] }}"
                "{% endfor %}")
    messages = [{"role": "user", "content": "q"}, {"role": "tool", "content": "42"}]
    assert tiny_processor.apply_chat_template(messages, chat_template=template) == "q<tool>42"
    assert ChatRenderer(template).roles == {"system", "user", "assistant", "tool"}
    with pytest.raises(KimiVLInputError, match="message 1: unknown role 'tool'"):
        tiny_processor.apply_chat_template(messages)
    with pytest.raises(KimiVLInputError, match="message 1: unknown role 'tool'"):
        tiny_processor.preflight(messages)


def test_image_item_without_data_is_fine_for_text_only_rendering(tiny_processor):
    text = tiny_processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}])
    assert IMAGE_BLOCK in text
