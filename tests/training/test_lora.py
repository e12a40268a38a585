"""LoRA (peft): MLA-correct targets, merged model = base + adapter, frozen base, adapter and merged export."""
from __future__ import annotations

import re

import torch
from safetensors.torch import load_file

from kimivl import KimiVLForConditionalGeneration
from kimivl.training import Trainer, TrainingArguments, collate, encode_conversation
from kimivl.training.lora import default_lora_targets, load_adapter, merge_lora, merged_state_dict


def _batch(processor, conversations):
    batch = collate([encode_conversation(processor, c) for c in conversations], processor.tokenizer.pad_token_id)
    batch.pop("labels")
    return batch


def test_default_targets_are_the_mla_and_moe_projections(tiny_dir):
    model = KimiVLForConditionalGeneration.from_pretrained(tiny_dir)
    pattern = re.compile(default_lora_targets())
    hit = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and pattern.fullmatch(n)]
    suffixes = {n.split(".", 5)[-1] if n.startswith("language_model") else n for n in hit}
    layer1 = {n.removeprefix("language_model.model.layers.1.") for n in hit if ".layers.1." in n}
    assert {"self_attn.q_proj", "self_attn.kv_a_proj_with_mqa", "self_attn.kv_b_proj", "self_attn.o_proj",
            "mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj", "mlp.shared_experts.down_proj"} <= layer1
    assert {f"mlp.experts.{e}.{p}" for e in range(8) for p in ("gate_proj", "up_proj", "down_proj")} <= layer1
    assert "language_model.model.layers.0.mlp.gate_proj" in hit  # the dense first layer
    assert {"multi_modal_projector.linear_1", "multi_modal_projector.linear_2"} <= suffixes
    assert not any(n.startswith("vision_tower") or n.endswith("lm_head") for n in hit)
    assert not any(n.endswith("mlp.gate") for n in hit)  # the router stays as it is
    vision = re.compile(default_lora_targets(vision=True))
    assert vision.fullmatch("vision_tower.encoder.blocks.1.wqkv") and vision.fullmatch("vision_tower.encoder.blocks.0.mlp.fc1")


def test_lora_train_merge_adapter_round_trip_and_export(tmp_path, tiny_dir, processor, conversations):
    args = TrainingArguments(model=str(tiny_dir), output_dir=str(tmp_path), max_steps=4, batch_size=2,
                             learning_rate=1e-2, progress="none", shuffle=False, lora=True, lora_r=4, lora_alpha=8)
    golden = load_file(str(tiny_dir / "model.safetensors"))
    trainer = Trainer(KimiVLForConditionalGeneration.from_pretrained(tiny_dir), processor, args, conversations)
    result = trainer.train()
    assert result.losses[-1] < result.losses[0]
    peft_model = trainer.model.eval()
    batch = _batch(processor, conversations)
    with torch.no_grad():
        adapted = peft_model(**batch).logits
        base_only = KimiVLForConditionalGeneration.from_pretrained(tiny_dir)(**batch).logits
    assert (adapted - base_only).abs().max() > 1e-3  # the adapter does something

    # the frozen base is unchanged: every base weight equals the original checkpoint
    merged = merged_state_dict(peft_model)
    base_sd = {k.replace(".base_layer.", "."): v for k, v in peft_model.get_base_model().state_dict().items()
               if ".lora_" not in k}
    assert set(base_sd) == set(golden) == set(merged)
    assert all(torch.equal(base_sd[k], golden[k]) for k in golden)

    # exported merged checkpoint (official keys) == base + adapter
    export = result.export_dir
    assert set(load_file(str(export / "model.safetensors"))) == set(golden)
    reloaded = KimiVLForConditionalGeneration.from_pretrained(export)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, adapted, atol=1e-5, rtol=1e-5)

    # adapter save -> load on a fresh base reproduces the outputs; merge_and_unload agrees too
    fresh = load_adapter(KimiVLForConditionalGeneration.from_pretrained(tiny_dir), export / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, adapted, atol=0, rtol=0)
        plain = merge_lora(fresh)
        assert isinstance(plain, KimiVLForConditionalGeneration)
        torch.testing.assert_close(plain(**batch).logits, adapted, atol=1e-5, rtol=1e-5)


def test_lora_unmerged_export_writes_the_adapter(tmp_path, tiny_dir, processor, conversations):
    args = TrainingArguments(model=str(tiny_dir), output_dir=str(tmp_path), max_steps=1, batch_size=2,
                             progress="none", lora=True, lora_r=2, lora_merge_on_export=False,
                             freeze=["multi_modal_projector"])
    trainer = Trainer(KimiVLForConditionalGeneration.from_pretrained(tiny_dir), processor, args, conversations)
    assert not any(p.requires_grad for n, p in trainer.model.named_parameters() if "multi_modal_projector" in n)
    export = trainer.train().export_dir
    assert (export / "adapter_config.json").is_file() and (export / "adapter_model.safetensors").is_file()
    assert (export / "tokenizer_config.json").is_file() and not (export / "model.safetensors").exists()
