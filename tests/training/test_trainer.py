"""The SFT loop on the golden tiny checkpoint: loss falls, freezing holds, export round trip, resume,
routing in training mode = inference routing, gradient checkpointing parity, training from scratch."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from kimivl import KimiVLForConditionalGeneration, KimiVLProcessor
from kimivl.decoder.moe import MoEGate
from kimivl.ops import cpu_kernels
from kimivl.training import (Trainer, TrainingArguments, collate, encode_conversation, enable_gradient_checkpointing, init_weights,
                             token_loss_sum, train)


def make_tiny_args(tiny_dir, output_dir, **kw):
    """Training arguments for a few quick steps on the tiny checkpoint."""
    base = dict(model=str(tiny_dir), output_dir=str(output_dir), max_steps=4, batch_size=2, learning_rate=3e-3,
                warmup_steps=0, progress="none", shuffle=False, seed=0, device="cpu")
    return TrainingArguments.from_dict({**base, **kw})


def _run(tiny_dir, processor, data, out, **kw):
    args = make_tiny_args(tiny_dir, out, **kw)
    model = KimiVLForConditionalGeneration.from_pretrained(tiny_dir)
    trainer = Trainer(model, processor, args, data)
    return trainer, trainer.train()


def test_loss_falls_and_frozen_towers_are_bit_identical(tmp_path, tiny_dir, processor, conversations):
    trainer, result = _run(tiny_dir, processor, conversations, tmp_path, max_steps=8,
                           freeze=["vision_tower", "multi_modal_projector"])
    assert result.losses[-1] < 0.5 * result.losses[0], result.losses
    golden = load_file(str(tiny_dir / "model.safetensors"))
    trained = trainer.model.state_dict()
    for name, ref in golden.items():
        if name.startswith(("vision_tower.", "multi_modal_projector.")) or name.endswith("e_score_correction_bias"):
            assert torch.equal(trained[name], ref), name  # frozen towers and the router bias (no update)
    assert not torch.equal(trained["language_model.model.layers.1.mlp.gate.weight"],
                           golden["language_model.model.layers.1.mlp.gate.weight"])  # the router trains
    lines = [json.loads(x) for x in result.metrics_file.read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 9))
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "eta_s", "router_load", "router_imbalance"} <= set(lines[-1])
    loads = lines[-1]["router_load"]
    assert set(loads) == {"language_model.model.layers.1.mlp.gate", "language_model.model.layers.2.mlp.gate"}
    assert all(abs(sum(v) - 1) < 1e-9 and len(v) == 8 for v in loads.values())


def test_export_round_trip_gives_identical_logits(tmp_path, tiny_dir, processor, conversations):
    trainer, result = _run(tiny_dir, processor, conversations, tmp_path, max_steps=2)
    export = result.export_dir
    names = {p.name for p in export.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer_config.json", "tiktoken.model",
            "preprocessor_config.json", "chat_template.jinja"} <= names
    assert set(load_file(str(export / "model.safetensors"))) == set(load_file(str(tiny_dir / "model.safetensors")))
    reloaded = KimiVLForConditionalGeneration.from_pretrained(export)
    proc = KimiVLProcessor.from_pretrained(export)
    batch = proc.apply_chat_template(conversations[0], tokenize=True, return_dict=True, return_tensors="pt")
    trainer.model.eval()
    with torch.no_grad():
        a = trainer.model(**batch).logits
        b = reloaded(**batch).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_resume_continues_identically(tmp_path, tiny_dir, processor, conversations):
    _, straight = _run(tiny_dir, processor, conversations, tmp_path / "a", max_steps=4, shuffle=True,
                       warmup_steps=2, export_dir="")
    _run(tiny_dir, processor, conversations, tmp_path / "b", max_steps=2, shuffle=True, warmup_steps=2,
         export_dir="")
    # the second run is configured for 4 steps; the schedule of the first 2 steps is the same (warmup)
    args = make_tiny_args(tiny_dir, tmp_path / "b", max_steps=4, shuffle=True, warmup_steps=2, export_dir="",
                     resume_from_checkpoint="latest")
    model = KimiVLForConditionalGeneration.from_pretrained(tiny_dir)
    trainer = Trainer(model, processor, args, conversations)
    resumed = trainer.train()
    assert resumed.losses == straight.losses
    a = load_file(str(tmp_path / "a" / "checkpoint-4" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoint-4" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_mode_routing_selects_the_inference_experts(tiny_dir, processor, conversations, monkeypatch):
    # both modes on torch's own float32 GEMM: on AMD CPUs inference takes oneDNN's (kimivl.ops.linear.float32_linear,
    # which has no backward), whose sums round differently in the last bit; the routing itself is what is compared
    monkeypatch.setattr(cpu_kernels, "onednn_float32_preferred", lambda: False)
    model = KimiVLForConditionalGeneration.from_pretrained(tiny_dir)
    batch = collate([encode_conversation(processor, c) for c in conversations], processor.tokenizer.pad_token_id)
    batch.pop("labels")
    seen: dict[str, list] = {"train": [], "eval": []}
    mode = ["eval"]
    gates = [m for m in model.modules() if isinstance(m, MoEGate)]
    handles = [g.register_forward_hook(lambda _m, _i, out: seen[mode[0]].append(out)) for g in gates]
    with torch.no_grad():
        ref = model.eval()(**batch).logits
    mode[0] = "train"
    out = model.train()(**batch).logits
    for h in handles:
        h.remove()
    assert len(seen["train"]) == len(seen["eval"]) == 2
    for (i_tr, w_tr, _), (i_ev, w_ev, _) in zip(seen["train"], seen["eval"]):
        s_tr, o_tr = i_tr.sort(-1)
        s_ev, o_ev = i_ev.sort(-1)
        assert torch.equal(s_tr, s_ev)
        torch.testing.assert_close(w_tr.gather(1, o_tr), w_ev.gather(1, o_ev), rtol=0, atol=0)
        assert w_tr.requires_grad  # weights carry gradient in training mode
    torch.testing.assert_close(out.detach(), ref, rtol=0, atol=0)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_dir, processor, conversations):
    batch = collate([encode_conversation(processor, c) for c in conversations[:2]], processor.tokenizer.pad_token_id)
    grads = []
    for ckpt in (False, True):
        model = KimiVLForConditionalGeneration.from_pretrained(tiny_dir).train()
        if ckpt:
            assert enable_gradient_checkpointing(model) == 2 + 3
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"], image_grid_hws=batch["image_grid_hws"])
        token_loss_sum(out.logits, batch["labels"], batch["attention_mask"]).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6, msg=n)


def test_from_scratch_with_a_callable_source_bf16_and_accumulation(tmp_path, tiny_dir, processor, conversations):
    from kimivl.configuration import KimiVLConfig

    config = KimiVLConfig.from_pretrained(tiny_dir)
    a = init_weights(KimiVLForConditionalGeneration(config), seed=1)
    b = init_weights(KimiVLForConditionalGeneration(config), seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    sd = a.state_dict()
    assert torch.equal(sd["language_model.model.norm.weight"], torch.ones(64))
    assert not sd["language_model.model.layers.1.mlp.gate.e_score_correction_bias"].any()
    assert not sd["vision_tower.encoder.blocks.0.wqkv.bias"].any()
    std = sd["language_model.model.layers.0.self_attn.q_proj.weight"].std().item()
    assert 0.017 < std < 0.023  # initializer_range 0.02
    # MoonViT's position table: 2-D sine-cosine at rms POS_EMB_RMS, so a linear map reads (row, column) exactly
    from kimivl.training.init import POS_EMB_RMS

    pos = sd["vision_tower.patch_embed.pos_emb.weight"]
    h, w, d = pos.shape
    assert abs(pos.pow(2).mean().sqrt().item() - POS_EMB_RMS) < 1e-3
    assert torch.equal(pos[0, :, : d // 2], pos[h - 1, :, : d // 2])  # first half: the column only
    assert torch.equal(pos[:, 0, d // 2:], pos[:, w - 1, d // 2:])  # second half: the row only
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    target = torch.stack((rows, cols), -1).reshape(-1, 2).double()
    feats = torch.cat((pos.reshape(-1, d), torch.ones(h * w, 1)), 1).double()
    fit = torch.linalg.lstsq(feats, target, driver="gelsd").solution
    assert (feats @ fit - target).abs().max() < 0.05
    result = train(dict(model=str(tiny_dir), output_dir=str(tmp_path), max_steps=6, batch_size=2,
                        gradient_accumulation_steps=2, learning_rate=3e-3, progress="none", bf16=True,
                        export_dir=""), model=a, processor=processor,
                   train_data=lambda i: conversations[i % len(conversations)])
    assert len(result.losses) == 6 and all(torch.isfinite(torch.tensor(result.losses)))
    assert result.losses[-1] < result.losses[0]


def test_freeze_prefix_matching_nothing_is_an_error(tmp_path, tiny_dir, processor, conversations):
    with pytest.raises(ValueError, match="prefix 'vision' matches no parameter"):
        _run(tiny_dir, processor, conversations, tmp_path, freeze=["vision"])


def test_cli_train_from_yaml(tmp_path, tiny_dir):
    from kimivl.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {tiny_dir}\ntrain_file: {data}\noutput_dir: {tmp_path / 'out'}\nmax_steps: 3\n"
                   "progress: log\nlearning_rate: 1.0e-3\n")
    assert main(["train", str(cfg), "max_steps=2"]) == 0
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and (tmp_path / "out" / "final" / "config.json").is_file()


def test_device_auto_is_the_cpu_without_cuda_and_bad_devices_are_named():
    from kimivl.training.parallel import resolve_device

    assert resolve_device("auto") == torch.device("cpu")  # the fixture hides any GPU from these tests
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"device = 'cuda', but no CUDA device is available"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match=r"device = 'banana' is not a device; expected auto, cpu, cuda or cuda:N"):
        resolve_device("banana")
    with pytest.raises(ValueError, match=r"device = 'meta'; training runs on auto, cpu, cuda or cuda:N"):
        resolve_device("meta")
    with pytest.raises(ValueError, match=r"training config: device = 'gpu' must be auto, cpu, cuda or cuda:N"):
        TrainingArguments(device="gpu")


def test_frozen_check_names_a_changed_parameter(tiny_dir):
    from kimivl.training import assert_unchanged, snapshot

    model = KimiVLForConditionalGeneration.from_pretrained(tiny_dir)
    ref = snapshot(model, ["multi_modal_projector"])
    assert len(ref) == 6 and all(isinstance(v, bytes) for v in ref.values())  # digests, not copies
    assert_unchanged(model, ref)
    with torch.no_grad():
        w = model.multi_modal_projector.linear_1.weight
        w.view(-1)[7] = torch.nextafter(w.view(-1)[7], torch.tensor(float("inf")))  # one bit
    with pytest.raises(AssertionError, match=r"1 frozen parameter\(s\) changed: \['multi_modal_projector.linear_1.weight'\]"):
        assert_unchanged(model, ref)
