"""The model card's Hugging Face example runs with only its import changed (the public API promise), and
from_pretrained's Hugging Face spellings (torch_dtype, device_map, attn_implementation, trust_remote_code)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from PIL import Image

import kimivl
from kimivl import KimiVLConfig, KimiVLForConditionalGeneration, KimiVLProcessor

SHAPE_PNG = Path(kimivl.__file__).parent / "assets" / "examples" / "shape.png"


def test_model_card_example_with_one_import_changed():
    # Kimi-VL-A3B-Instruct's model card, verbatim but for the import line, the path and the question.
    from kimivl import KimiVLForConditionalGeneration as AutoModelForCausalLM
    from kimivl import KimiVLProcessor as AutoProcessor

    model_path = kimivl.DEMO_MODEL
    model = AutoModelForCausalLM.from_pretrained(
        model_path,
        torch_dtype="auto",
        device_map="auto",
        trust_remote_code=True,
    )
    processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=True)

    image_path = str(SHAPE_PNG)
    image = Image.open(image_path)
    messages = [
        {"role": "user", "content": [{"type": "image", "image": image_path},
                                     {"type": "text", "text": "What color is the shape?"}]}
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    inputs = processor(images=image, text=text, return_tensors="pt", padding=True, truncation=True).to(model.device)
    generated_ids = model.generate(**inputs, max_new_tokens=512)
    generated_ids_trimmed = [
        out_ids[len(in_ids):] for in_ids, out_ids in zip(inputs.input_ids, generated_ids)
    ]
    response = processor.batch_decode(
        generated_ids_trimmed, skip_special_tokens=True, clean_up_tokenization_spaces=False
    )[0]
    assert response.strip() == "blue"
    assert model.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_torch_dtype_is_dtype(golden_dir):
    model = KimiVLForConditionalGeneration.from_pretrained(golden_dir, torch_dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert KimiVLForConditionalGeneration.from_pretrained(golden_dir, torch_dtype="auto").dtype == torch.float32
    # both spellings may be given when they agree, never when they differ
    assert KimiVLForConditionalGeneration.from_pretrained(golden_dir, dtype="bfloat16",
                                                          torch_dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"dtype=torch.float32 and torch_dtype=torch.bfloat16 disagree"):
        KimiVLForConditionalGeneration.from_pretrained(golden_dir, dtype=torch.float32, torch_dtype=torch.bfloat16)


@pytest.mark.parametrize("device_map", ["cpu", {"": "cpu"}, {"vision_tower": "cpu", "language_model": "cpu"},
                                        torch.device("cpu")])
def test_device_map_naming_one_device(golden_dir, device_map):
    model = KimiVLForConditionalGeneration.from_pretrained(golden_dir, device_map=device_map)
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_device_map_auto_and_its_refusals(golden_dir):
    model = KimiVLForConditionalGeneration.from_pretrained(golden_dir, device_map="auto")
    assert model.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match=r"device_map sends modules to 2 devices \(\['cpu', 'meta'\]\); kimivl keeps"):
        KimiVLForConditionalGeneration.from_pretrained(golden_dir, device_map={"vision_tower": "cpu",
                                                                               "language_model": "meta"})
    assert KimiVLForConditionalGeneration.from_pretrained(golden_dir, device=torch.device("cpu"),
                                                          device_map="cpu").device.type == "cpu"  # they agree
    with pytest.raises(ValueError, match="device='meta' and device_map='cpu' disagree"):
        KimiVLForConditionalGeneration.from_pretrained(golden_dir, device="meta", device_map="cpu")
    with pytest.raises(ValueError, match="device_map must be 'auto', a device, a device index or a dict, got 1.5"):
        KimiVLForConditionalGeneration.from_pretrained(golden_dir, device_map=1.5)


def test_attn_implementation_picks_the_vision_backend(golden_dir, golden):
    model = KimiVLForConditionalGeneration.from_pretrained(golden_dir, attn_implementation="eager")
    assert model.vision_tower.attn_backend == "eager"
    with torch.no_grad():
        out = model.vision_tower(golden["processor.pixel_values"], golden["processor.image_grid_hws"])
    torch.testing.assert_close(out, golden["vision.tower_out"], atol=1e-4, rtol=0)
    sdpa = KimiVLForConditionalGeneration.from_pretrained(golden_dir, attn_implementation="sdpa")
    assert sdpa.vision_tower.attn_backend == "sdpa"
    with pytest.raises(ValueError, match=r"attn_implementation='flex_attention' is not known; use one of"):
        KimiVLForConditionalGeneration.from_pretrained(golden_dir, attn_implementation="flex_attention")


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here")
def test_flash_attention_2_without_flash_attn_says_how_to_install(golden_dir):
    with pytest.raises(ImportError, match=r"pip install 'kimivl\[flash\]'"):
        KimiVLForConditionalGeneration.from_pretrained(golden_dir, attn_implementation="flash_attention_2")


def test_trust_remote_code_is_accepted_and_runs_nothing(golden_dir):
    # the checkpoint names remote code in auto_map; kimivl never imports it, with the flag on or off
    assert "auto_map" in KimiVLConfig.from_pretrained(golden_dir).extra
    assert KimiVLConfig.from_pretrained(golden_dir, trust_remote_code=True).text_config.hidden_size == 64
    KimiVLForConditionalGeneration.from_pretrained(golden_dir, trust_remote_code=True, low_cpu_mem_usage=True)
    KimiVLProcessor.from_pretrained(golden_dir, trust_remote_code=False)
    with pytest.raises(TypeError, match="unexpected keyword argument 'load_in_8bit'"):
        KimiVLForConditionalGeneration.from_pretrained(golden_dir, load_in_8bit=True)


def test_processor_keywords_of_transformers_pass_and_typos_do_not(golden_dir):
    processor = KimiVLProcessor.from_pretrained(golden_dir)
    plain = processor(text="hello there")
    same = processor(text="hello there", truncation=True, return_attention_mask=True, add_special_tokens=True,
                     return_token_type_ids=False, verbose=False)
    assert torch.equal(plain["input_ids"], same["input_ids"])
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'image' \(did you mean 'images'\?\)"):
        processor(text="hello there", image="cat.png")


def test_a_device_this_machine_lacks_is_named(golden_dir):
    with pytest.raises(ValueError, match=r"device='tpu' is not a device name \(e.g. 'cpu', 'cuda', 'cuda:1'\)"):
        KimiVLForConditionalGeneration.from_pretrained(golden_dir, device="tpu")
    with pytest.raises(ValueError, match=r"device='cuda:99', but (torch was built without CUDA|no CUDA device is "
                                         r"visible|only \d+ CUDA device\(s\) are visible)"):
        KimiVLForConditionalGeneration.from_pretrained(golden_dir, device="cuda:99")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has an MPS device")
def test_an_mps_device_this_machine_lacks_is_named(golden_dir):
    with pytest.raises(ValueError, match=r"device='mps', but no MPS device is available \(torch .*\); use "
                                         r"device='cpu'"):
        KimiVLForConditionalGeneration.from_pretrained(golden_dir, device="mps")


def test_transformers_streamer_logits_processors_and_generation_config_work():
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    model = KimiVLForConditionalGeneration.from_pretrained(kimivl.DEMO_MODEL)
    processor = KimiVLProcessor.from_pretrained(kimivl.DEMO_MODEL)
    messages = [{"role": "user", "content": [{"type": "image", "image": str(SHAPE_PNG)},
                                             {"type": "text", "text": "What color is the shape?"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    n = inputs["input_ids"].shape[1]
    streamed: list[str] = []

    class Collect(transformers.TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            streamed.append(text)

    out = model.generate(**inputs, max_new_tokens=8, streamer=Collect(processor.tokenizer, skip_prompt=True,
                                                                      skip_special_tokens=True))
    assert "".join(streamed).strip() == processor.batch_decode(out[:, n:], skip_special_tokens=True)[0] == "blue"
    blue = processor.tokenizer.encode("blue")
    banned = transformers.LogitsProcessorList([transformers.NoBadWordsLogitsProcessor([blue], eos_token_id=[0])])
    other = model.generate(**inputs, max_new_tokens=4, logits_processor=banned)
    assert blue[0] not in other[0, n:].tolist()
    # transformers' GenerationConfig leaves unset fields None: the checkpoint's stop ids stay
    short = model.generate(**inputs, generation_config=transformers.GenerationConfig(max_new_tokens=5, do_sample=False))
    assert processor.batch_decode(short[:, n:], skip_special_tokens=True)[0] == "blue" and short.shape[1] - n == 2


def test_transformers_model_surface_for_fine_tuning_libraries(golden_dir, golden):
    model = KimiVLForConditionalGeneration.from_pretrained(golden_dir)
    assert model.get_input_embeddings() is model.language_model.model.embed_tokens
    assert model.get_output_embeddings() is model.language_model.lm_head
    inputs = {k: golden[f"prompt.{k}"] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_hws")}
    model.train()
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    assert not model.is_gradient_checkpointing
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.gradient_checkpointing_enable()  # idempotent
    assert model.is_gradient_checkpointing and model._checkpointed_blocks == 3 + 2  # decoder layers + vision blocks
    again = model(**inputs, labels=inputs["input_ids"]).loss
    again.backward()
    assert torch.equal(again, loss)
    for name, grad in plain.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=0, atol=0)
    model.get_input_embeddings().weight.requires_grad_(False)  # a frozen base, as peft leaves it
    assert not model.get_input_embeddings()(inputs["input_ids"]).requires_grad
    model.enable_input_require_grads()
    assert model.get_input_embeddings()(inputs["input_ids"]).requires_grad
