"""Fine-tuning on a CUDA device through the public entry point (``train`` with ``device``): the same losses as on
the CPU, a checkpoint resumed on the GPU, LoRA with bf16 autocast, the vision stage, and the exports load on the
CPU. Skipped without a CUDA device (CI has none; ``scripts/gpu_check.sh`` runs them)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from kimivl import KimiVLForConditionalGeneration
from kimivl.training import train
from training.test_trainer import make_tiny_args
from training.test_vision_stage import LABELS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # float32 as on the CPU
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def test_sft_on_cuda_follows_the_cpu_and_resumes(tmp_path, tiny_dir, processor, conversations):
    runs = {device: train(make_tiny_args(tiny_dir, tmp_path / device, max_steps=6, device=device, save_steps=3),
                          processor=processor, train_data=conversations) for device in ("cpu", "cuda")}
    cpu, gpu = runs["cpu"].losses, runs["cuda"].losses
    # float32 both: the first step sees the same weights; later steps drift by last bits through Adam
    assert abs(gpu[0] - cpu[0]) <= 1e-4 * abs(cpu[0]), (gpu, cpu)
    torch.testing.assert_close(torch.tensor(gpu), torch.tensor(cpu), rtol=2e-2, atol=0)
    assert gpu[-1] < 0.75 * gpu[0], gpu
    # the checkpoint written on the GPU resumes there: the last three steps again
    resumed = train(make_tiny_args(tiny_dir, tmp_path / "cuda", max_steps=6, device="cuda", save_steps=3,
                                   resume_from_checkpoint=str(tmp_path / "cuda" / "checkpoint-3"), export_dir=""),
                    processor=processor, train_data=conversations)
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(gpu), rtol=1e-4, atol=0)
    # the export is an ordinary CPU checkpoint with the trained weights
    exported = load_file(str(runs["cuda"].export_dir / "model.safetensors"))
    trained = load_file(str(tmp_path / "cuda" / "checkpoint-6" / "model.safetensors"))
    assert all(torch.equal(exported[k], trained[k]) for k in exported)
    model = KimiVLForConditionalGeneration.from_pretrained(runs["cuda"].export_dir)
    assert next(model.parameters()).device.type == "cpu"


def test_lora_bf16_and_gradient_checkpointing_on_cuda(tmp_path, tiny_dir, processor, conversations):
    result = train(make_tiny_args(tiny_dir, tmp_path, max_steps=8, device="cuda", lora=True, lora_r=8, bf16=True,
                                  gradient_checkpointing=True, learning_rate=1e-2),
                   processor=processor, train_data=conversations)
    assert all(torch.isfinite(torch.tensor(result.losses))) and result.losses[-1] < result.losses[0], result.losses
    merged = load_file(str(result.export_dir / "model.safetensors"))
    golden = load_file(str(tiny_dir / "model.safetensors"))
    assert set(merged) == set(golden)  # merged back into the official keys
    assert not torch.equal(merged["language_model.model.layers.0.self_attn.o_proj.weight"],
                           golden["language_model.model.layers.0.self_attn.o_proj.weight"])


def test_vision_stage_on_cuda_changes_only_the_tower(tmp_path, tiny_dir, processor, images):
    records = [{"image": images[0], "labels": {"size": "tall", "parity": "even"}},
               {"image": images[1], "labels": {"size": "wide", "parity": "odd"}},
               {"image": images[2], "labels": {"size": "small"}}]
    result = train(dict(model=str(tiny_dir), output_dir=str(tmp_path), stage="vision", vision_labels=LABELS,
                        max_steps=12, batch_size=3, learning_rate=3e-3, progress="none", shuffle=False,
                        device="cuda"), processor=processor, train_data=records)
    assert result.losses[-1] < 0.5 * result.losses[0], result.losses
    exported = load_file(str(result.export_dir / "model.safetensors"))
    golden = load_file(str(tiny_dir / "model.safetensors"))
    changed = {k for k in golden if not torch.equal(exported[k], golden[k])}
    assert changed and all(k.startswith("vision_tower.") for k in changed), sorted(changed)[:5]
