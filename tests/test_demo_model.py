"""The shipped demo model (kimivl.DEMO_MODEL): official layout, and its answers on fresh samples.

Only the colour task is asserted: it is the one this early model has learned reliably (docs/demo-model.md
gives the full evaluation; the other tasks are at chance and are not claimed).
"""
from __future__ import annotations

from pathlib import Path

import pytest

import kimivl
from kimivl.demo.evaluate import answer, evaluate


@pytest.fixture(scope="module")
def demo():
    from kimivl import KimiVLForConditionalGeneration, KimiVLProcessor

    path = Path(kimivl.DEMO_MODEL)
    assert (path / "config.json").is_file(), f"the shipped demo model is missing at {path}"
    return KimiVLForConditionalGeneration.from_pretrained(path), KimiVLProcessor.from_pretrained(path)


def test_demo_model_is_small_and_in_the_official_layout(demo):
    model, _ = demo
    size = sum(f.stat().st_size for f in Path(kimivl.DEMO_MODEL).glob("*.safetensors"))
    assert size < 30 * 2**20
    assert {k.split(".")[0] for k in model.state_dict()} == {"vision_tower", "multi_modal_projector", "language_model"}
    t = model.config.text_config
    assert t.topk_method == "noaux_tc" and t.kv_lora_rank == 64 and t.n_routed_experts == 8


def test_demo_model_names_the_colour_of_fresh_shapes(demo):
    model, processor = demo
    result = evaluate(model, processor, samples_per_task=20, seed=2026, tasks=["color"])["color"]
    assert result.accuracy >= 0.8, f"{result.correct}/{result.total}, e.g. {result.failures}"


def test_demo_model_answers_the_readme_example(demo):
    from PIL import Image

    model, processor = demo
    image = Image.open(Path(kimivl.__file__).parent / "assets" / "examples" / "shape.png")
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "What color is the shape?"}]}]
    assert answer(model, processor, messages) == "blue"
