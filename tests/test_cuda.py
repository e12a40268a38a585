"""The whole model on a CUDA device: golden parity, the public API with CPU-side processor outputs, and the
shipped demo model's answers equal to the CPU's. Skipped without a CUDA device (CI has none)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kimivl import DEMO_MODEL, KimiVLForConditionalGeneration, KimiVLProcessor

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
ATOL = RTOL = 1e-4  # float32 vs the official implementation (golden README)
EXAMPLES = Path(DEMO_MODEL).parent / "examples"


@pytest.fixture(autouse=True)
def _no_tf32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


@torch.no_grad()
def test_forward_logits_equal_golden_on_cuda(golden_dir: Path, golden: dict[str, torch.Tensor]) -> None:
    model = KimiVLForConditionalGeneration.from_pretrained(golden_dir, device="cuda")
    out = model(input_ids=golden["prompt.input_ids"].cuda(), attention_mask=golden["prompt.attention_mask"].cuda(),
                pixel_values=golden["prompt.pixel_values"].cuda(), image_grid_hws=golden["prompt.image_grid_hws"])
    torch.testing.assert_close(out.logits.cpu(), golden["prompt.logits"], atol=ATOL, rtol=RTOL)
    text = model(input_ids=golden["text_only.input_ids"].cuda())
    torch.testing.assert_close(text.logits.cpu(), golden["text_only.logits"], atol=ATOL, rtol=RTOL)


def test_training_loss_and_backward_on_cuda_bf16(golden_dir: Path, golden: dict[str, torch.Tensor]) -> None:
    model = KimiVLForConditionalGeneration.from_pretrained(golden_dir, dtype=torch.bfloat16, device="cuda")
    ids = golden["prompt.input_ids"].cuda()
    out = model(input_ids=ids, pixel_values=golden["prompt.pixel_values"],
                image_grid_hws=golden["prompt.image_grid_hws"], labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_demo_model_answers_on_cuda_as_on_cpu() -> None:
    processor = KimiVLProcessor.from_pretrained(DEMO_MODEL)
    answers = {}
    for device in ("cpu", "cuda"):
        model = KimiVLForConditionalGeneration.from_pretrained(DEMO_MODEL, device=device)
        got = []
        for image, question in ((EXAMPLES / "shape.png", "What color is the shape?"),
                                (EXAMPLES / "shape.png", "What shape is this?")):
            messages = [{"role": "user", "content": [{"type": "image", "image": str(image)},
                                                     {"type": "text", "text": question}]}]
            inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                   return_dict=True, return_tensors="pt")
            ids = model.generate(**inputs, max_new_tokens=8)  # processor outputs stay on the CPU
            got.append(processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0])
        answers[device] = got
    assert answers["cuda"] == answers["cpu"] == ["blue", "triangle"]
