"""Weight-only int8 (kimivl.quantization.int8): the quantizer's bounds, the C++ kernel against float64, the layer's
paths, loading quantized from the golden checkpoint (equal to the float model on the dequantized weights), the
save / load round trip, the shipped demo model's answers, and the errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import kimivl
from kimivl import KimiVLForConditionalGeneration
from kimivl.ops.linear import Linear
from kimivl.quantization import (
    Int8Linear,
    dequantize_weight,
    quantize_model,
    quantize_weight,
)
from kimivl.quantization.int8 import quantizable


def test_quantize_weight_bounds_and_special_rows():
    torch.manual_seed(0)
    w = torch.randn(7, 33) * torch.logspace(-3, 2, 7)[:, None]
    w[3] = 0
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (7, 1)
    assert torch.all((dequantize_weight(q, scale) - w).abs() <= scale / 2 * (1 + 1e-6))
    peak = q.abs().amax(dim=1)
    assert peak[3] == 0 and scale[3, 0] == 1 and torch.all(peak[torch.arange(7) != 3] == 127)
    assert int(q.min()) >= -127  # symmetric: -128 never used
    # bf16 weights quantize from their own values
    qb, sb = quantize_weight(w.bfloat16())
    assert torch.all((dequantize_weight(qb, sb) - w.bfloat16().float()).abs() <= sb / 2 * (1 + 1e-6))


def test_quantize_weight_refuses_what_it_cannot_represent():
    w = torch.ones(4, 8)
    w[2, 5] = float("nan")
    with pytest.raises(ValueError, match=r"layers\.0\.q_proj\.weight: 1 of 4 rows hold inf or NaN"):
        quantize_weight(w, "layers.0.q_proj.weight")
    with pytest.raises(ValueError, match=r"floating \(out, in\) weight, got torch.float32 \(8,\)"):
        quantize_weight(torch.ones(8))
    with pytest.raises(ValueError, match=r"floating \(out, in\) weight, got torch.int8"):
        quantize_weight(torch.ones(2, 2, dtype=torch.int8))


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_float64(cpu_ext, rows, dtype):
    torch.manual_seed(rows)
    for n, k in ((37, 53), (64, 2048), (130, 1408)):  # odd sizes: the tails of both loops
        q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        scale = torch.rand(n) / 100
        bias = torch.randn(n)
        x = torch.randn(rows, k).to(dtype)
        ref = (x.double() @ (q.double() * scale.double()[:, None]).T + bias.double())
        out = cpu_ext.linear_int8w(x, q, scale, bias)
        assert out.dtype == dtype and out.shape == (rows, n)
        tol = 1e-5 if dtype == torch.float32 else 8e-3  # bf16: the output's rounding
        torch.testing.assert_close(out.double(), ref, atol=tol * ref.abs().max().item(), rtol=tol)


def test_kernel_errors_name_the_shapes(cpu_ext):
    q = torch.zeros(4, 8, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="scale must hold 4 float32 values"):
        cpu_ext.linear_int8w(torch.ones(1, 8), q, torch.ones(3), None)
    with pytest.raises(RuntimeError, match="x has 7 features, q expects 8"):
        cpu_ext.linear_int8w(torch.ones(1, 7), q, torch.ones(4), None)
    with pytest.raises(RuntimeError, match="q must be int8"):
        cpu_ext.linear_int8w(torch.ones(1, 8), q.float(), torch.ones(4), None)


def test_layer_paths_agree_and_keep_weights_out_of_training():
    torch.manual_seed(1)
    dense = Linear(96, 40, bias=True)
    layer = Int8Linear.from_linear(dense)
    assert [n for n, _ in layer.named_parameters()] == []  # buffers: an optimizer never sees them
    assert set(layer.state_dict()) == {"weight", "weight_scale", "bias"}
    w = dequantize_weight(layer.weight, layer.weight_scale)
    for rows in (1, 8, 9, 40):  # the decode kernel, then the dequantized product
        x = torch.randn(2, rows, 96)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), x @ w.T + dense.bias.detach(), atol=1e-5, rtol=1e-5)
    x = torch.randn(3, 96, requires_grad=True)
    layer(x).sum().backward()  # gradients reach the input (adapters can train on a quantized base)
    torch.testing.assert_close(x.grad, w.sum(0).expand(3, -1), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="input has 95 features, the layer expects 96"):
        layer(torch.randn(1, 95))


def test_dtype_casts_keep_int8_weights_and_float32_scales():
    layer = Int8Linear.from_linear(Linear(16, 8))
    scale = layer.weight_scale.clone()
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == torch.int8 and layer.weight_scale.dtype == torch.float32
    assert torch.equal(layer.weight_scale, scale)
    out = layer(torch.randn(2, 16).bfloat16())
    assert out.dtype == torch.bfloat16


def _prompt(golden):
    return dict(input_ids=golden["prompt.input_ids"], attention_mask=golden["prompt.attention_mask"],
                pixel_values=golden["prompt.pixel_values"], image_grid_hws=golden["prompt.image_grid_hws"])


@pytest.fixture(scope="module")
def int8_model(golden_dir):
    return KimiVLForConditionalGeneration.from_pretrained(golden_dir, quantization="int8")


@pytest.fixture(scope="module")
def dequantized_model(golden_dir):
    """The float model whose quantized layers hold q * scale: what the int8 model must compute."""
    model = KimiVLForConditionalGeneration.from_pretrained(golden_dir)
    with torch.no_grad():
        for _, layer in quantizable(model):
            layer.weight.copy_(dequantize_weight(*quantize_weight(layer.weight)))
    return model


def test_from_pretrained_quantizes_the_decoders_linear_layers(int8_model, golden_dir):
    names = {n for n, m in int8_model.named_modules() if isinstance(m, Int8Linear)}
    lm = int8_model.language_model
    layers = lm.config.num_hidden_layers
    assert "language_model.model.layers.0.self_attn.q_proj" in names
    assert "language_model.model.layers.1.mlp.experts.0.down_proj" in names
    assert "language_model.model.layers.1.mlp.shared_experts.gate_proj" in names
    assert not any(n.endswith(("kv_b_proj", "lm_head")) for n in names)
    assert not any(n.startswith(("vision_tower", "multi_modal_projector")) for n in names)
    assert type(lm.lm_head) is Linear and all(type(lm.model.layers[i].self_attn.kv_b_proj) is Linear
                                              for i in range(layers))
    assert int8_model.dtype == torch.float32
    float_model = KimiVLForConditionalGeneration.from_pretrained(golden_dir)
    assert set(int8_model.state_dict()) == set(float_model.state_dict()) | {n + ".weight_scale" for n in names}


def test_int8_model_equals_the_float_model_on_dequantized_weights(int8_model, dequantized_model, golden):
    """Full-tensor parity: logits of an image prompt and of a text prompt, then greedy generation (the decode steps
    take the C++ kernel, the prompt the dequantized product)."""
    with torch.no_grad():
        torch.testing.assert_close(int8_model(**_prompt(golden)).logits, dequantized_model(**_prompt(golden)).logits,
                                   atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(int8_model(input_ids=golden["text_only.input_ids"]).logits,
                                   dequantized_model(input_ids=golden["text_only.input_ids"]).logits,
                                   atol=1e-4, rtol=1e-4)
    new = int8_model.generate(**_prompt(golden), max_new_tokens=12, do_sample=False)
    assert torch.equal(new, dequantized_model.generate(**_prompt(golden), max_new_tokens=12, do_sample=False))


def test_int8_stays_close_to_the_official_logits(int8_model, golden):
    """Against the official float outputs the int8 model is an approximation: on this random tiny model (where a
    bf16 load is 2.96 off at worst, its near-tied experts flipping), most next-token choices still agree."""
    with torch.no_grad():
        logits = int8_model(**_prompt(golden)).logits
    ref = golden["prompt.logits"]
    assert (logits.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    assert (logits - ref).abs().mean() < 0.05 * ref.abs().mean()


def test_save_and_load_round_trip(int8_model, golden_dir, golden, tmp_path):
    int8_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "int-quantized"
    assert qc["config_groups"]["group_0"]["weights"]["strategy"] == "channel"
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        key = "language_model.model.layers.1.mlp.experts.3.up_proj.weight"
        assert f.get_tensor(key).dtype == torch.int8
        assert f.get_tensor(key[:-len("weight")] + "weight_scale").dtype == torch.float32
        assert f.get_tensor("language_model.lm_head.weight").dtype == torch.float32
    stored = (tmp_path / "model.safetensors").stat().st_size
    assert stored < 0.8 * (Path(golden_dir) / "model.safetensors").stat().st_size
    again = KimiVLForConditionalGeneration.from_pretrained(tmp_path)  # quantized without being asked
    assert isinstance(again.language_model.model.layers[0].mlp.gate_proj, Int8Linear)
    for key, value in int8_model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    # a bf16 load keeps the scales float32 and the weights int8
    bf16 = KimiVLForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16, quantization="int8")
    layer = bf16.language_model.model.layers[1].mlp.experts[3].up_proj
    assert layer.weight.dtype == torch.int8 and layer.weight_scale.dtype == torch.float32
    assert bf16.dtype == torch.bfloat16
    with torch.no_grad():
        out = bf16(**_prompt(golden)).logits
        ref = int8_model(**_prompt(golden)).logits
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_quantize_model_equals_quantizing_on_load(int8_model, golden_dir, golden):
    model = KimiVLForConditionalGeneration.from_pretrained(golden_dir)
    model.generate(**_prompt(golden), max_new_tokens=2)  # builds the experts' stack and the decode plans first
    quantize_model(model)
    for key, value in int8_model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    moe = model.language_model.model.layers[1].mlp
    assert "_stacked" not in moe.__dict__  # the float experts' stack is gone, not kept beside the int8 copies
    assert "quantization_config" in model.config.extra
    assert torch.equal(model.generate(**_prompt(golden), max_new_tokens=6),
                       int8_model.generate(**_prompt(golden), max_new_tokens=6))


def test_bad_quantization_requests_are_refused(golden_dir, tmp_path):
    with pytest.raises(ValueError, match=r"quantization='int4' is not supported: choose one of int8"):
        KimiVLForConditionalGeneration.from_pretrained(golden_dir, quantization="int4")
    with pytest.raises(ValueError, match="quantization='fp8' is not supported"):
        quantize_model(KimiVLForConditionalGeneration.from_pretrained(golden_dir), "fp8")
    # a checkpoint quantized some other way (fp8 compressed-tensors, say) is refused by name, not misread
    for file in Path(golden_dir).iterdir():
        if file.is_file() and file.name != "config.json":
            (tmp_path / file.name).symlink_to(file)
    config = json.loads((Path(golden_dir) / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors", "format": "float-quantized",
                                     "config_groups": {"group_0": {"weights": {"num_bits": 8, "type": "float"}}}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quantization_config is not one kimivl loads: .*float-quantized"):
        KimiVLForConditionalGeneration.from_pretrained(tmp_path)


def test_quantized_demo_model_still_answers():
    """The shipped model with its decoder in int8: the bundled example's answer and fresh colour / shape samples
    at the thresholds the float model is held to (tests/test_demo_model.py)."""
    from PIL import Image

    from kimivl import KimiVLProcessor
    from kimivl.demo.evaluate import answer, evaluate

    model = KimiVLForConditionalGeneration.from_pretrained(kimivl.DEMO_MODEL, quantization="int8")
    processor = KimiVLProcessor.from_pretrained(kimivl.DEMO_MODEL)
    image = Image.open(Path(kimivl.__file__).parent / "assets" / "examples" / "shape.png")
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "What color is the shape?"}]}]
    assert answer(model, processor, messages) == "blue"
    results = evaluate(model, processor, samples_per_task=20, seed=2026, tasks=["color", "shape"])
    assert results["color"].accuracy >= 0.85 and results["shape"].accuracy >= 0.85, results


def test_loading_puts_each_layers_experts_in_one_stack(golden_dir, tmp_path):
    """Quantizing on load (and loading an int8 checkpoint, and quantize_model) writes the routed experts' int8 weights
    and scales into one (E, N, K) stack per layer and projection, which the C++ decode step adopts without a copy: a
    full-size model would otherwise need its experts' size again when the step first stacks them."""
    def check(model):
        for layer in model.language_model.model.layers:
            if not hasattr(layer.mlp, "experts"):
                continue
            experts = layer.mlp.experts
            stack = experts[0].down_proj.weight._base
            assert stack is not None and stack.shape == (len(experts), *experts[0].down_proj.weight.shape)
            assert all(e.down_proj.weight.data_ptr() == stack[i].data_ptr() for i, e in enumerate(experts))
            stacked = layer.mlp.stacked_int8_experts()
            assert stacked[2] is stack and stacked[5].data_ptr() == experts[0].down_proj.weight_scale.data_ptr()

    model = KimiVLForConditionalGeneration.from_pretrained(golden_dir, quantization="int8")
    check(model)
    check(quantize_model(KimiVLForConditionalGeneration.from_pretrained(golden_dir)))
    model.save_pretrained(tmp_path)
    again = KimiVLForConditionalGeneration.from_pretrained(tmp_path)
    check(again)
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_quantize_model_keeps_biases():
    """Layers with a bias keep it (attention_bias configs); the int8 layer computes x @ dequantized.T + bias."""

    torch.manual_seed(0)
    model = torch.nn.Sequential(Linear(24, 40, bias=True), Linear(40, 16, bias=False))
    x = torch.randn(3, 24)
    dense = [(m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone()) for m in model]
    quantize_model(model)
    assert all(type(m) is Int8Linear for m in model)
    assert torch.equal(model[0].bias, dense[0][1]) and model[1].bias is None
    h = x
    for (weight, bias), layer in zip(dense, model):
        q, scale = quantize_weight(weight)
        assert torch.equal(layer.weight, q) and torch.equal(layer.weight_scale, scale)
        h = torch.nn.functional.linear(h, dequantize_weight(q, scale), bias)
    torch.testing.assert_close(model(x), h, rtol=1e-5, atol=1e-5)


# --- a prefill's int8 experts in one C++ call (kimivl.ops.moe.grouped_int8_moe, C++ moe_experts_int8) ---------
def _int8_experts(g: torch.Generator, hidden: int, inter: int, experts: int = 8, exact: bool = False):
    """Stacked int8 gate, up, down and their per-row scales; ``exact``: scales that are powers of two, so every
    q * scale is a bf16 value (the int8 kernel then must give the bf16 kernel's bits)."""
    shapes = ((experts, inter, hidden), (experts, inter, hidden), (experts, hidden, inter))
    q = [torch.randint(-127, 128, shape, generator=g, dtype=torch.int8) for shape in shapes]
    if exact:
        s = [2.0 ** -torch.randint(4, 9, shape[:2], generator=g).float() for shape in shapes]
    else:
        s = [torch.rand(shape[:2], generator=g) / 200 + 1e-3 for shape in shapes]
    return q, s


def _routing(g: torch.Generator, tokens: int, experts: int = 8, k: int = 3):
    idx = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)])
    return idx, torch.rand(tokens, k, generator=g)


def _avx2_experts(cpu_ext):
    if cpu_ext.experts_isa() != "avx2":
        pytest.skip("moe_experts_int8 runs where the prefill experts take the AVX2 float32 path (experts_isa() "
                    f"'avx2'); this CPU and build: {cpu_ext.experts_isa()!r}")


# (50, 22): tails of the 8-wide loops and of the 6-row blocks; (2048, 1408): the release's expert shape
@pytest.mark.parametrize("hidden,inter", [(64, 40), (50, 22), (2048, 1408)])
@pytest.mark.parametrize("tokens", [1, 17, 150])
def test_int8_experts_kernel_gives_the_bf16_kernels_bits_on_the_same_weights(cpu_ext, hidden, inter, tokens):
    _avx2_experts(cpu_ext)
    g = torch.Generator().manual_seed(tokens + hidden)
    q, s = _int8_experts(g, hidden, inter, exact=True)
    w = [(qi.float() * si[..., None]).bfloat16() for qi, si in zip(q, s)]
    assert all(torch.equal(wi.float(), qi.float() * si[..., None]) for wi, qi, si in zip(w, q, s))  # exact in bf16
    x = torch.randn(tokens, hidden, generator=g).bfloat16()
    idx, weight = _routing(g, tokens)
    gate_up = torch.cat([w[0], w[1]], dim=1).contiguous()
    ref = cpu_ext.moe_experts_bf16(x, idx, weight, gate_up, w[2].contiguous(), False, 10**6)
    out = cpu_ext.moe_experts_int8(x, idx, weight, *q, *s)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)


@pytest.mark.parametrize("tokens", [9, 40, 150])
def test_int8_experts_match_the_int8_modules(cpu_ext, tokens):
    """Arbitrary scales: against moe_dispatch over Int8Linear experts (same roundings, other summation order)
    and a float64 reference on the dequantized weights."""
    from kimivl.decoder.mlp import DeepseekV3MLP
    from kimivl.ops.moe import fused_cpu_moe, grouped_int8_moe, moe_dispatch, moe_fused_max_tokens

    _avx2_experts(cpu_ext)
    g = torch.Generator().manual_seed(tokens)
    hidden, inter = 96, 40
    q, s = _int8_experts(g, hidden, inter)
    experts = []
    for e in range(8):
        mlp = DeepseekV3MLP(hidden, inter)
        for name, qi, si in zip(("gate_proj", "up_proj", "down_proj"), q, s):
            layer = Int8Linear(qi.shape[2], qi.shape[1])
            layer.weight, layer.weight_scale = qi[e].clone(), si[e][:, None].clone()
            setattr(mlp, name, layer)
        experts.append(mlp)
    x = torch.randn(tokens, hidden, generator=g).bfloat16()
    idx, weight = _routing(g, tokens)
    with torch.inference_mode():
        module = moe_dispatch(x, idx, weight, experts)
        out = grouped_int8_moe(x, idx, weight, *q, *s)
        # up to moe_fused_max_tokens() the decode-shaped pass takes them (moe_bf16w on int8 rows)
        fused = fused_cpu_moe(x, idx, weight, experts) if tokens <= moe_fused_max_tokens() else None
    assert out is not None
    deq = [qi.double() * si.double()[..., None] for qi, si in zip(q, s)]
    ref = torch.zeros(tokens, hidden, dtype=torch.float64)
    for t in range(tokens):
        for e, w in zip(idx[t].tolist(), weight[t].tolist()):
            xt = x[t].double()
            ref[t] += w * ((torch.nn.functional.silu(deq[0][e] @ xt) * (deq[1][e] @ xt)) @ deq[2][e].T)
    scale = ref.abs().max()
    err_module, err = (module.double() - ref).abs().max(), (out.double() - ref).abs().max()
    assert err <= err_module + 0.004 * scale, (err, err_module)
    assert err_module <= 0.02 * scale
    torch.testing.assert_close(out, module, atol=0.02 * scale.item(), rtol=0.02)
    if fused is not None:
        assert (fused.double() - ref).abs().max() <= err_module + 0.004 * scale
        torch.testing.assert_close(fused, module, atol=0.02 * scale.item(), rtol=0.02)


def test_int8_experts_kernel_errors_name_the_shapes(cpu_ext):
    _avx2_experts(cpu_ext)
    g = torch.Generator().manual_seed(0)
    q, s = _int8_experts(g, 32, 16)
    x = torch.randn(4, 32).bfloat16()
    idx, weight = _routing(g, 4)
    with pytest.raises(RuntimeError, match=r"one value per weight row \(128\), got \[8, 15\]"):
        cpu_ext.moe_experts_int8(x, idx, weight, *q, s[0], s[1][:, :15], s[2])
    with pytest.raises(RuntimeError, match=r"x has 31 features"):
        cpu_ext.moe_experts_int8(x[:, :31].contiguous(), idx, weight, *q, *s)
    with pytest.raises(RuntimeError, match="must be contiguous \\(E, N, K\\) int8"):
        cpu_ext.moe_experts_int8(x, idx, weight, q[0].float(), q[1], q[2], *s)
    with pytest.raises(RuntimeError, match="expert id 9 chosen for token 0 of a layer of 8 experts"):
        cpu_ext.moe_experts_int8(x, torch.full_like(idx, 9), weight, *q, *s)


def test_int8_prefill_takes_the_experts_kernel(golden_dir, monkeypatch):
    """A bf16 int8 model's prefill of more tokens than the decode-shaped expert pass takes (moe_fused_max_tokens)
    runs its routed experts in moe_experts_int8; the logits stay those of the per-expert modules (bf16 tolerance:
    summation order)."""
    from kimivl.ops.moe import moe_fused_max_tokens

    import kimivl.decoder.moe as moe_module
    from kimivl.ops import cpu_kernels

    ext = cpu_kernels.kernels()
    if ext is None or ext.experts_isa() != "avx2":
        pytest.skip("the int8 experts kernel runs on AVX2 builds without AVX512-BF16 only")
    model = KimiVLForConditionalGeneration.from_pretrained(golden_dir, dtype=torch.bfloat16, quantization="int8")
    tokens = moe_fused_max_tokens() + 40
    ids = torch.randint(0, 1000, (1, tokens), generator=torch.Generator().manual_seed(0))
    calls = []
    kernel = moe_module.grouped_int8_moe
    monkeypatch.setattr(moe_module, "grouped_int8_moe", lambda *a: calls.append(a[0].shape) or kernel(*a))
    with torch.inference_mode():
        fast = model(input_ids=ids).logits.float()
        assert calls and all(shape[0] == tokens for shape in calls)
        monkeypatch.setattr(moe_module, "grouped_int8_moe", lambda *a: None)
        slow = model(input_ids=ids).logits.float()
    torch.testing.assert_close(fast, slow, atol=0.05 * slow.abs().max().item(), rtol=0.05)
    assert (fast.argmax(-1) == slow.argmax(-1)).float().mean() >= 0.95
