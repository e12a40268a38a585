"""The vision stage (kimivl/training/vision_stage.py) on the golden tiny checkpoint: pooling maths, the tower
learns image labels, only the tower changes, the export is a whole official checkpoint, resume, errors."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from kimivl import KimiVLForConditionalGeneration
from kimivl.errors import KimiVLInputError
from kimivl.training import TrainingArguments, train
from kimivl.training.vision_stage import PooledLabelHeads, SumPooledHead, VisionStageTrainer, pool_image_tokens

LABELS = {"size": ["small", "wide", "tall"], "parity": ["even", "odd"]}


@pytest.fixture(scope="module")
def records(images):
    """The three golden images (70x98, 140x56, 28x28), each with a label per set; one has only one label."""
    return [{"image": images[0], "labels": {"size": "tall", "parity": "even"}},
            {"image": images[1], "labels": {"size": "wide", "parity": "odd"}},
            {"image": images[2], "labels": {"size": "small"}}]


def _args(tiny_dir, out, **kw):
    base = dict(model=str(tiny_dir), output_dir=str(out), stage="vision", vision_labels=LABELS, max_steps=12,
                batch_size=3, learning_rate=3e-3, warmup_steps=0, progress="none", shuffle=False, seed=0)
    return TrainingArguments.from_dict({**base, **kw})


def test_pooling_is_per_image_max_and_mean():
    torch.manual_seed(0)
    grids = torch.tensor([[4, 6], [2, 2]])  # 6 and 1 merged tokens
    feats = torch.randn(7, 4, 3)
    pooled = pool_image_tokens(feats, grids, (2, 2))
    flat = feats.flatten(1)
    want = torch.stack([torch.cat([flat[:6].max(0).values, flat[:6].mean(0)]), torch.cat([flat[6], flat[6]])])
    torch.testing.assert_close(pooled, want, rtol=0, atol=0)


def test_sum_head_adds_per_token_logits_so_counts_are_linear():
    torch.manual_seed(0)
    head = SumPooledHead(4, 3, tokens_ref=5)
    with torch.no_grad():
        head.proj.weight.normal_()
        head.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
    tokens = torch.randn(9, 4)
    got = head(tokens, [6, 3])
    per_token = torch.nn.functional.layer_norm(tokens, (4,)) @ head.proj.weight.T
    want = torch.stack([per_token[:6].sum(0), per_token[6:].sum(0)]) / 5 + head.bias
    torch.testing.assert_close(got, want)
    # k copies of one "object" token among fixed background tokens: logits move by k times one step
    obj, bg = torch.randn(1, 4), torch.zeros(1, 4)
    logits = [head(torch.cat([obj.expand(k, 4), bg.expand(5, 4)]), [k + 5])[0] for k in range(4)]
    steps = [logits[k + 1] - logits[k] for k in range(3)]
    torch.testing.assert_close(steps[1], steps[0])
    torch.testing.assert_close(steps[2], steps[0])
    assert torch.count_nonzero(SumPooledHead(4, 3).proj.weight) == 0  # starts at chance, whatever the image size


def test_sum_pooled_label_set_trains(tmp_path, tiny_dir, processor, records):
    model = KimiVLForConditionalGeneration.from_pretrained(tiny_dir)
    args = _args(tiny_dir, tmp_path, vision_pooling={"size": "sum"}, max_steps=20, export_dir="")
    processor = copy.copy(processor)
    processor.image_processor = copy.copy(processor.image_processor)
    processor.image_processor.in_token_limit = 64  # the golden images have 4-40 patches: no resize either way
    trainer = VisionStageTrainer(model, processor, args, records)
    assert isinstance(trainer.model.heads["size"], SumPooledHead)
    assert trainer.model.heads["size"].tokens_ref == 16  # merged tokens (2x2) of a full-budget image
    assert isinstance(trainer.model.heads["parity"], torch.nn.Sequential)  # the default stays max + mean
    result = trainer.train()
    assert result.losses[-1] < 0.3 * result.losses[0], result.losses
    batch = next(trainer._batches())
    assert [p["size"] for p in trainer.model.predict(batch["pixel_values"], batch["image_grid_hws"])] == \
        ["tall", "wide", "small"]


def test_tower_learns_labels_and_only_the_tower_changes(tmp_path, tiny_dir, processor, records):
    model = KimiVLForConditionalGeneration.from_pretrained(tiny_dir)
    trainer = VisionStageTrainer(model, processor, _args(tiny_dir, tmp_path), records)
    result = trainer.train()
    assert result.losses[-1] < 0.2 * result.losses[0], result.losses
    batch = next(trainer._batches())  # the next epoch, in order (shuffle off): the same encoding as training
    preds = trainer.model.predict(batch["pixel_values"], batch["image_grid_hws"])
    assert [p["size"] for p in preds] == ["tall", "wide", "small"]
    assert [p["parity"] for p in preds[:2]] == ["even", "odd"]

    golden = load_file(str(tiny_dir / "model.safetensors"))
    exported = load_file(str(result.export_dir / "model.safetensors"))
    assert set(exported) == set(golden)  # the whole model, official keys, no head weights
    changed = {k for k in golden if not torch.equal(exported[k], golden[k])}
    assert changed and all(k.startswith("vision_tower.") for k in changed), sorted(changed)[:5]
    reloaded = KimiVLForConditionalGeneration.from_pretrained(result.export_dir)
    for k, v in reloaded.vision_tower.state_dict().items():
        assert torch.equal(v, model.vision_tower.state_dict()[k]), k
    assert (result.export_dir / "tiktoken.model").is_file() and (result.export_dir / "config.json").is_file()


def test_resume_continues_identically(tmp_path, tiny_dir, records):
    kw = dict(shuffle=True, batch_size=2, export_dir="", warmup_steps=2)  # first 2 steps: same schedule
    straight = train(_args(tiny_dir, tmp_path / "a", max_steps=4, **kw), train_data=records)
    train(_args(tiny_dir, tmp_path / "b", max_steps=2, **kw), train_data=records)
    resumed = train(_args(tiny_dir, tmp_path / "b", max_steps=4, resume_from_checkpoint="latest", **kw),
                    train_data=records)
    assert resumed.losses == straight.losses
    a = load_file(str(tmp_path / "a" / "checkpoint-4" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoint-4" / "model.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("heads.") for k in a)  # the heads are part of the state
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("record, message", [
    ({"image": None, "labels": {"colour": "red"}}, "label set 'colour' is not in vision_labels"),
    ({"image": None, "labels": {"size": "huge"}}, "size = 'huge' is not one of its 3 classes"),
    ({"labels": {"size": "tall"}}, "a vision-stage record is"),
    ({"image": None, "labels": {}}, "has no labels"),
])
def test_bad_records_name_the_problem(tmp_path, tiny_dir, processor, images, record, message):
    record = {**record, "image": images[0]} if "image" in record else record
    model = KimiVLForConditionalGeneration.from_pretrained(tiny_dir)
    trainer = VisionStageTrainer(model, processor, _args(tiny_dir, tmp_path, max_steps=1), [record])
    with pytest.raises(KimiVLInputError, match=message):
        trainer.train()


@pytest.mark.parametrize("kw, message", [
    (dict(vision_labels=None), "stage 'vision' needs vision_labels"),
    (dict(vision_labels={"size": ["one"]}), "needs >= 2 distinct classes"),
    (dict(vision_labels={"size": "abc"}), "vision_labels must map label-set names to lists"),
    (dict(stage="pretrain"), r"stage = 'pretrain' must be one of \('sft', 'vision'\)"),
    (dict(distributed="fsdp2"), "auto, none or ddp with stage vision"),
    (dict(lora=True), "lora is not supported"),
    (dict(vision_pooling={"size": "median"}), r"vision_pooling\['size'\] = 'median'; expected one of"),
    (dict(vision_pooling={"colour": "sum"}), "vision_pooling names 'colour', which is not a label set"),
    (dict(vision_pooling=["sum"]), "vision_pooling must map label-set names"),
])
def test_bad_configs_name_the_problem(tmp_path, tiny_dir, processor, records, kw, message):
    with pytest.raises(ValueError, match=message):
        args = _args(tiny_dir, tmp_path, **kw)
        VisionStageTrainer(KimiVLForConditionalGeneration.from_pretrained(tiny_dir), processor, args, records)


def test_yaml_numbers_become_class_names(tmp_path, tiny_dir):
    args = _args(tiny_dir, tmp_path, vision_labels={"count": [1, 2, 3]})
    assert args.vision_labels == {"count": ["1", "2", "3"]}
    heads = PooledLabelHeads(KimiVLForConditionalGeneration.from_pretrained(tiny_dir).vision_tower, args.vision_labels)
    assert heads.heads["count"][1].out_features == 3
