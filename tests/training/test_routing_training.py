"""Router options in training: sequence-level balance loss and the aux-free bias update (both off by default)."""
from __future__ import annotations

import torch

from kimivl import KimiVLForConditionalGeneration
from kimivl.training import RouterMonitor, Trainer, TrainingArguments, collate, encode_conversation


def _reference_seq_aux(topk_idx, scores, mask, k):
    """Loop form of DeepSeek-V3's sequence-wise balance loss for one layer (mean over sequences)."""
    b, s = mask.shape
    e = scores.shape[-1]
    total = 0.0
    for i in range(b):
        rows = [i * s + t for t in range(s) if mask[i, t]]
        f = [0.0] * e
        for r in rows:
            for j in topk_idx[r].tolist():
                f[j] += e / (k * len(rows))
        p = [sum(float(scores[r, j] / scores[r].sum()) for r in rows) / len(rows) for j in range(e)]
        total += sum(fj * pj for fj, pj in zip(f, p))
    return total / b


def test_balance_loss_matches_the_formula_and_trains_the_router(tiny_dir, processor, conversations):
    model = KimiVLForConditionalGeneration.from_pretrained(tiny_dir).train()
    batch = collate([encode_conversation(processor, c) for c in conversations], processor.tokenizer.pad_token_id)
    monitor = RouterMonitor(model, keep_scores=True)
    seen = []
    gate = monitor.records[0].gate
    handle = gate.register_forward_hook(lambda _m, _i, out: seen.append((out[0].detach(), out[2].detach())))
    monitor.start(batch["attention_mask"])
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
          image_grid_hws=batch["image_grid_hws"])
    handle.remove()
    layer0 = monitor.records[0].scores[0]
    mine = RouterMonitor.__new__(RouterMonitor)  # the loss of layer 0 alone, through the same code
    mine.records, mine.batch_shape, mine.token_mask = [monitor.records[0]], monitor.batch_shape, monitor.token_mask
    one_layer = mine.balance_loss(1.0)
    ref = _reference_seq_aux(seen[0][0], seen[0][1], batch["attention_mask"].bool(), gate.top_k)
    assert abs(float(one_layer.detach()) - ref) < 1e-5
    loss = monitor.balance_loss(0.01)
    monitor.stop()
    loss.backward()
    assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0
    assert gate.e_score_correction_bias.grad is None
    assert layer0[1].requires_grad


def test_bias_update_moves_towards_balance():
    from kimivl.configuration import KimiVLConfig
    from pathlib import Path

    monitor = RouterMonitor.__new__(RouterMonitor)
    from kimivl.decoder.moe import MoEGate
    from kimivl.training.routing import _GateRecord

    config = KimiVLConfig.from_pretrained(Path(__file__).resolve().parents[2].parent / "shared" / "golden" / "kimivl-tiny")
    gate = MoEGate(config.text_config)
    monitor.records = [_GateRecord("g", gate, torch.tensor([10, 0, 5, 5, 5, 5, 5, 5], dtype=torch.float64))]
    monitor.update_bias(0.01)
    assert torch.equal(gate.e_score_correction_bias, torch.tensor([-0.01, 0.01, 0, 0, 0, 0, 0, 0]))


def test_trainer_bias_update_and_balance_loss_options(tmp_path, tiny_dir, processor, conversations):
    args = TrainingArguments(model=str(tiny_dir), output_dir=str(tmp_path), max_steps=3, batch_size=2,
                             progress="none", bias_update_speed=1e-3, balance_loss_alpha=1e-2, export_dir="")
    model = KimiVLForConditionalGeneration.from_pretrained(tiny_dir)
    before = model.language_model.model.layers[1].mlp.gate.e_score_correction_bias.clone()
    result = Trainer(model, processor, args, conversations).train()
    after = model.language_model.model.layers[1].mlp.gate.e_score_correction_bias
    step = (after - before).abs()
    assert step.max() > 0 and torch.all(step <= 3e-3 + 1e-7)
    assert all(r["balance_loss"] > 0 for r in result.history)
