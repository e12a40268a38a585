"""Data and collation: assistant-only labels, sharegpt and JSONL records, mixed image sizes in one batch."""
from __future__ import annotations

import json
import re

import pytest
import torch

from kimivl import KimiVLForConditionalGeneration, KimiVLInputError
from kimivl.processing import IGNORE_INDEX
from kimivl.training import (ConversationDataset, SampleStream, TrainingArguments, collate, encode_conversation,
                             read_jsonl, sharegpt_to_messages)


def _labelled_spans(labels: torch.Tensor) -> list[list[int]]:
    spans, current = [], []
    for t in labels.tolist():
        if t != IGNORE_INDEX:
            current.append(t)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return spans


def test_labels_are_assistant_content_and_end_token_only(processor, images):
    conv = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "text", "text": "Colour?"}]},
            {"role": "assistant", "content": "red"},
            {"role": "user", "content": "And the shape?"},
            {"role": "assistant", "content": "a disc"}]
    ex = encode_conversation(processor, conv)
    spans = _labelled_spans(ex.labels)
    assert [processor.decode(s) for s in spans] == ["red<|im_end|>", "a disc<|im_end|>"]
    labelled = ex.labels != IGNORE_INDEX
    assert torch.equal(ex.input_ids[labelled], ex.labels[labelled])  # labels are the ids themselves
    assert not labelled[ex.input_ids == processor.image_token_id].any()  # image rows never trained
    # everything before the first answer (system, user, image, role markers) is masked
    first = int(labelled.nonzero()[0])
    assert processor.decode(ex.input_ids[:first].tolist()).endswith("<|im_assistant|>assistant<|im_middle|>")


def test_sharegpt_record_equals_messages_record(processor, images):
    record = {"conversations": [{"from": "human", "value": "<image>What is it?"}, {"from": "gpt", "value": "a red disc"}],
              "images": [images[0]]}
    messages = [{"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "text", "text": "What is it?"}]},
                {"role": "assistant", "content": "a red disc"}]
    assert sharegpt_to_messages(record) == messages
    a, b = encode_conversation(processor, record), encode_conversation(processor, {"messages": messages})
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    torch.testing.assert_close(a.pixel_values, b.pixel_values, rtol=0, atol=0)


def test_sharegpt_without_tags_puts_media_first_and_counts_tags(images):
    untagged = sharegpt_to_messages({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}],
                                     "images": [images[0], images[1]]})
    assert [it["type"] for it in untagged[0]["content"]] == ["image", "image", "text"]
    with pytest.raises(KimiVLInputError, match="2 <image> tags for 1 images"):
        sharegpt_to_messages({"conversations": [{"from": "human", "value": "<image><image>Q"},
                                                {"from": "gpt", "value": "A"}], "images": [images[0]]})


def test_jsonl_with_relative_image_paths(tmp_path, tiny_dir, processor):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes((tiny_dir / "inputs" / "image_28x28.png").read_bytes())
    lines = [{"messages": [{"role": "user", "content": [{"type": "image", "image": "img/a.png"},
                                                        {"type": "text", "text": "Q"}]},
                           {"role": "assistant", "content": "A"}]},
             {"conversations": [{"from": "human", "value": "<image>Q"}, {"from": "gpt", "value": "A"}],
              "images": ["img/a.png"]}]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    records = read_jsonl(path)
    assert len(records) == 2
    ds = ConversationDataset(path, processor)
    a, b = ds[0], ds[1]
    assert torch.equal(a.input_ids, b.input_ids) and a.image_grid_hws.tolist() == [[2, 2]]
    path.write_text("{not json\n")
    with pytest.raises(KimiVLInputError, match="train.jsonl:1"):
        read_jsonl(path)


def test_collated_batch_of_mixed_image_sizes_gives_per_example_logits(tiny_dir, processor, conversations):
    """Padding and patch concatenation are exact: each row of the batch has the logits of that example alone."""
    model = KimiVLForConditionalGeneration.from_pretrained(tiny_dir)
    examples = [encode_conversation(processor, c) for c in conversations]
    batch = collate(examples, processor.tokenizer.pad_token_id)
    assert batch["image_grid_hws"].tolist() == torch.cat([e.image_grid_hws for e in examples[:3]]).tolist()
    assert batch["pixel_values"].shape[0] == sum(e.pixel_values.shape[0] for e in examples[:3])
    lengths = batch["attention_mask"].sum(1).tolist()
    assert lengths == [e.num_tokens for e in examples]
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"], image_grid_hws=batch["image_grid_hws"])
        for i, ex in enumerate(examples):
            alone = model(input_ids=ex.input_ids[None], pixel_values=ex.pixel_values, image_grid_hws=ex.image_grid_hws)
            torch.testing.assert_close(out.logits[i, :ex.num_tokens], alone.logits[0], atol=1e-4, rtol=1e-4)


def test_sample_stream_restarts_at_any_position():
    data = list(range(5))
    stream = SampleStream(data, seed=3, shuffle=True)
    full = [r for _, (_, r) in zip(range(12), stream.iterate(0))]
    assert sorted(full[:5]) == data and sorted(full[5:10]) == data and full[:5] != full[5:10]
    assert [r for _, (_, r) in zip(range(5), stream.iterate(7))] == full[7:12]
    calls = SampleStream(lambda i: i * 10)
    assert [r for _, (_, r) in zip(range(3), calls.iterate(4))] == [40, 50, 60]


def test_unknown_config_key_is_an_error_with_a_suggestion(tmp_path):
    with pytest.raises(ValueError, match=r"'freez' \(did you mean 'freeze'\?\)"):
        TrainingArguments.from_dict({"freez": ["vision_tower"]})
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_steps: 0\n")
    from kimivl.training import load_training_args

    with pytest.raises(ValueError, match="max_steps = 0"):
        load_training_args(cfg)


def test_yaml_values_of_the_wrong_type_are_named_and_1e_5_reads_as_a_number(tmp_path):
    from kimivl.training import load_training_args

    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rate: 1e-5\nmax_grad_norm: 5e-1\nfreeze: vision_tower\n")
    args = load_training_args(cfg)  # PyYAML reads 1e-5 (no dot) as a string
    assert args.learning_rate == 1e-5 and args.max_grad_norm == 0.5 and args.freeze == ["vision_tower"]
    for text, needle in [("learning_rate: fast\n", "learning_rate = 'fast' must be a number, got str"),
                         ("max_steps: '3'\n", "max_steps = '3' must be an integer, got str"),
                         ("bf16: 1\n", "bf16 = 1 must be true/false, got int"),
                         ("freeze: [1]\n", "freeze = [1] must be a list (a string each), got list")]:
        cfg.write_text(text)
        with pytest.raises(ValueError, match=re.escape(f"training config: {needle}")):
            load_training_args(cfg)


def test_malformed_records_and_missing_media_are_named_at_read_time(tmp_path):
    path = tmp_path / "train.jsonl"
    good = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
    for record, needle in [({"messages": "bad"}, "'messages' must be a non-empty list of {'role', 'content'} dicts, "
                                                 "got str 'bad'"),
                           ({"messages": []}, "'messages' must be a non-empty list of {'role', 'content'} dicts, "
                                              "got an empty list"),
                           ({"messages": [{"content": "Q"}]}, "message 0 must be a dict with a 'role' string"),
                           ({"messages": [{"role": "user", "content": [{"type": "image", "image": "gone.png"}]}]},
                            f"message 0 item 0: image file 'gone.png' not found (looked in {tmp_path}")]:
        path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
        with pytest.raises(KimiVLInputError, match=re.escape(f"train.jsonl:2: {needle}")):
            read_jsonl(path)
