"""The fused CPU decode step of a bf16 decoder (kimivl.decoder.cpu_decode: the whole step in one C++ call,
``model_step``, and each layer's C++ mla_block / moe_block / mlp_block, ``layer_step``) against the module path
they replace: the same logits and cache bits, and the cases they must leave to the modules."""
from __future__ import annotations

import pytest
import torch

import kimivl.decoder.cpu_decode as cpu_decode
import kimivl.decoder.model as model_module
from kimivl.configuration import DeepseekV3Config
from kimivl.decoder import DeepseekV3ForCausalLM
from kimivl.decoder.cache import MLACache, latent_cache_dtype
from kimivl.decoder.cpu_decode import PLAN
from kimivl.generation import decode_step, prefill
from kimivl.ops import cpu_kernels


def _model(seed: int = 0, **overrides) -> DeepseekV3ForCausalLM:
    """A 4-layer bf16 decoder (layer 0 dense, MoE after) with a router that spreads tokens over the experts."""
    cfg = dict(vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
               num_attention_heads=4, kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=16, qk_nope_head_dim=16,
               v_head_dim=16, n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1, first_k_dense_replace=1,
               topk_method="noaux_tc", scoring_func="sigmoid", n_group=4, topk_group=2, norm_topk_prob=True,
               routed_scaling_factor=2.5, rms_norm_eps=1e-5, rope_theta=10000.0)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(DeepseekV3Config.from_dict(cfg))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(std=0.5)
            elif name.endswith("e_score_correction_bias"):
                p.normal_(std=0.1)
            elif p.dim() == 1:  # norms: not all ones, so a skipped or misplaced norm shows
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(std=0.08)
    return model.to(torch.bfloat16).eval()


def _decode(model, monkeypatch, *, fused: bool | str, steps: int = 6, padded: bool = True):
    """Greedy steps after a left-padded 2-row prompt: (stacked step logits, the cache's data). fused: True (the
    one-call step where it applies, else the layer blocks), "layers" (the layer blocks only) or False (modules)."""
    with monkeypatch.context() as m:
        if fused is not True:
            m.setattr(cpu_decode, "model_step", lambda *args: None)
        if not fused:
            m.setattr(model_module, "layer_step", lambda *args: None)
        ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(1))
        mask = torch.ones(2, 9, dtype=torch.long)
        if padded:
            mask[1, :4] = 0
        cache = MLACache.from_config(model.config, 2, 9 + steps, dtype=latent_cache_dtype(torch.bfloat16, "cpu"))
        logits = []
        with torch.inference_mode():
            step = prefill(model, ids, cache, mask)
            for _ in range(steps):
                mask = torch.cat((mask, torch.ones(2, 1, dtype=torch.long)), dim=1)
                step = decode_step(model, step.argmax(-1), cache, mask if padded else None)
                logits.append(step)
        return torch.stack(logits), cache.data.clone()


def _plans(model) -> list[bool | None]:
    """Per layer: whether its plan serves the fused step (None: no plan was made)."""
    plans = [layer.__dict__.get(PLAN) for layer in model.model.layers]
    return [None if p is None else p.args is not None for p in plans]


@pytest.mark.parametrize("overrides", [
    {},  # Moonlight / Kimi-VL: noaux_tc, sigmoid (with expert groups here)
    {"q_lora_rank": 24},  # DeepSeek-V3's low-rank queries
    {"topk_method": "group_limited_greedy", "scoring_func": "softmax", "n_shared_experts": 0},
    {"topk_method": "greedy", "n_group": 1, "topk_group": 1, "norm_topk_prob": False},
    # YaRN: RoPE's cos / sin scaled (by 1 + 0.1 ln 4 here), the step's own table must scale them alike
    {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "mscale": 1.0,
                      "mscale_all_dim": 0.0}},
], ids=["noaux_tc", "q_lora", "group_limited_softmax_no_shared", "greedy", "yarn"])
def test_fused_decode_step_is_bit_identical_to_the_module_path(cpu_ext, monkeypatch, overrides) -> None:
    model = _model(**overrides)
    served = []
    step = cpu_decode.model_step
    monkeypatch.setattr(cpu_decode, "model_step", lambda *args: served.append(step(*args)) or served[-1])
    whole_logits, whole_cache = _decode(model, monkeypatch, fused=True)
    assert len(served) == 6 and all(s is not None for s in served)  # every step was the one C++ call
    layer_logits, layer_cache = _decode(model, monkeypatch, fused="layers")
    assert _plans(model) == [True] * 4  # every layer took the C++ blocks
    module_logits, module_cache = _decode(model, monkeypatch, fused=False)
    assert torch.equal(whole_logits, module_logits) and torch.equal(layer_logits, module_logits)
    assert torch.equal(whole_cache, module_cache) and torch.equal(layer_cache, module_cache)
    fused_logits = whole_logits
    # and the comparison is not vacuous: rows and steps differ
    assert not torch.equal(fused_logits[:, 0], fused_logits[:, 1])


@pytest.mark.parametrize("form", ["vdpbf16ps", "amx"])
def test_both_paths_take_the_bf16_forms_alike(cpu_ext, monkeypatch, form) -> None:
    """With a bf16 form of the MLA decode step (vdpbf16ps on AVX512-BF16 CPUs without AMX such as the acceptance
    Zen 5, AMX tiles on CPUs with AMX) mla_block and the module path take the same form: still the same bits, and not
    the float32 form's. Rows of r + rope = 64 (whole AMX tiles)."""
    if not cpu_ext.bf16_isa():
        pytest.skip("the bf16 forms need the extension compiled for a CPU with AVX512-BF16 (this one has none)")
    if form == "amx" and cpu_ext.bf16_isa() != "amx":
        pytest.skip("the AMX form needs a CPU with AMX that this process may use (this one has AVX512-BF16 only)")
    model = _model(seed=2, qk_rope_head_dim=32)
    code = cpu_ext.MLA_AMX if form == "amx" else cpu_ext.MLA_VDPBF16
    monkeypatch.setattr(cpu_kernels, "mla_decode_form", lambda ext: ext.MLA_FLOAT32)
    float32_form, _ = _decode(model, monkeypatch, fused=True)
    monkeypatch.setattr(cpu_kernels, "mla_decode_form", lambda ext: code)
    fused_logits, fused_cache = _decode(model, monkeypatch, fused=True)
    layer_logits, layer_cache = _decode(model, monkeypatch, fused="layers")
    module_logits, module_cache = _decode(model, monkeypatch, fused=False)
    assert torch.equal(fused_logits, module_logits) and torch.equal(fused_cache, module_cache)
    assert torch.equal(layer_logits, module_logits) and torch.equal(layer_cache, module_cache)
    assert not torch.equal(fused_logits, float32_form)
    torch.testing.assert_close(fused_logits.float(), float32_form.float(), rtol=0.05, atol=0.05)


def test_fused_decode_step_without_padding_and_through_generate(cpu_ext, monkeypatch) -> None:
    from kimivl.generation import generate

    model = _model(seed=3)
    a, _ = _decode(model, monkeypatch, fused=True, padded=False)
    b, _ = _decode(model, monkeypatch, fused=False, padded=False)
    assert torch.equal(a, b)
    ids = torch.randint(3, 96, (1, 7), generator=torch.Generator().manual_seed(5))
    fused = generate(model, ids, max_new_tokens=8, do_sample=False)
    with monkeypatch.context() as m:
        m.setattr(cpu_decode, "model_step", lambda *args: None)
        m.setattr(model_module, "layer_step", lambda *args: None)
        plain = generate(model, ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(fused, plain) and fused.shape == (1, 15)
    assert model.__dict__[PLAN].args is not None  # generate took the one-call step


def test_layers_the_fused_step_cannot_serve_run_their_modules(cpu_ext, monkeypatch) -> None:
    model = _model(seed=4)
    # a projection and an expert's projection replaced by plain nn.Linear copies (as an adapter library wraps them)
    layer1, layer2 = model.model.layers[1], model.model.layers[2]
    for parent, name in ((layer1.self_attn, "o_proj"), (layer2.mlp.experts[3], "up_proj")):
        old = getattr(parent, name)
        plain = torch.nn.Linear(old.in_features, old.out_features, bias=False).to(torch.bfloat16)
        with torch.no_grad():
            plain.weight.copy_(old.weight)
        setattr(parent, name, plain)
    logits, _ = _decode(model, monkeypatch, fused=True)
    assert _plans(model) == [True, False, True, True]
    assert layer2.mlp.__dict__[PLAN].args is None  # layer 2: its MoE module's plan says no
    assert model.__dict__[PLAN].args is None  # so the whole step is not one call either
    module, _ = _decode(model, monkeypatch, fused=False)
    assert torch.equal(logits, module)


def test_a_weight_stored_transposed_leaves_its_layer_to_the_modules(cpu_ext, monkeypatch) -> None:
    # the C++ blocks read weights through row pointers: a strided view (here o_proj's weight as the transpose of
    # its transpose) must send its layer to the modules, not into a kernel or an error
    model = _model(seed=8)
    attn = model.model.layers[1].self_attn
    attn.o_proj.weight = torch.nn.Parameter(attn.o_proj.weight.detach().t().contiguous().t())
    assert not attn.o_proj.weight.is_contiguous()
    logits, cache = _decode(model, monkeypatch, fused=True)
    assert _plans(model) == [True, False, True, True] and model.__dict__[PLAN].args is None
    module, module_cache = _decode(model, monkeypatch, fused=False)
    assert torch.equal(logits, module) and torch.equal(cache, module_cache)


def test_the_plan_follows_replaced_and_reloaded_weights(cpu_ext, monkeypatch) -> None:
    model = _model(seed=5)
    _decode(model, monkeypatch, fused=True)
    other = _model(seed=6)
    # in-place copy (load_state_dict) and replaced parameter objects (assign=True) must both be seen
    model.load_state_dict(other.state_dict())
    assert torch.equal(_decode(model, monkeypatch, fused=True)[0], _decode(other, monkeypatch, fused=False)[0])
    third = _model(seed=7)
    model.load_state_dict(third.state_dict(), assign=True)
    assert torch.equal(_decode(model, monkeypatch, fused=True)[0], _decode(third, monkeypatch, fused=False)[0])
    # .to() round trip: the plan's stacked experts and router copy are dropped with the old storage
    model.float().bfloat16()
    assert all(PLAN not in layer.__dict__ for layer in model.model.layers) and PLAN not in model.__dict__
    assert torch.equal(_decode(model, monkeypatch, fused=True)[0], _decode(third, monkeypatch, fused=False)[0])
    # a replaced module (the final norm) and a replaced layer are seen by the whole step's plan
    plan = model.__dict__[PLAN]
    model.model.norm = type(model.model.norm)(64, eps=1e-5).to(torch.bfloat16)
    third.model.norm = model.model.norm
    assert torch.equal(_decode(model, monkeypatch, fused=True)[0], _decode(third, monkeypatch, fused=False)[0])
    assert model.__dict__[PLAN] is not plan and model.__dict__[PLAN].args is not None
    model.model.layers[2] = third.model.layers[2]
    assert torch.equal(_decode(model, monkeypatch, fused=True)[0], _decode(third, monkeypatch, fused=False)[0])


def test_the_whole_step_leaves_hooks_bad_ids_and_float32_to_the_modules(cpu_ext, monkeypatch) -> None:
    """A forward hook on any module the one call would skip, an id outside the vocabulary (the module path's
    error), a full cache and a float32 model are the modules' business; the one call serves again after."""
    from kimivl.errors import KimiVLInputError

    model = _model(seed=10)
    expected, _ = _decode(model, monkeypatch, fused=False)
    seen = []
    handle = model.model.layers[2].register_forward_hook(lambda module, args, out: seen.append(out.shape))
    hooked, _ = _decode(model, monkeypatch, fused=True)
    assert torch.equal(hooked, expected) and seen == [(2, 9, 64)] + [(2, 1, 64)] * 6  # prefill, every step
    handle.remove()
    cache = MLACache.from_config(model.config, 1, 3, dtype=torch.bfloat16)
    with torch.inference_mode():
        prefill(model, torch.tensor([[5, 6]]), cache)
        assert cpu_decode.model_step(model, torch.tensor([[7]]), cache) is not None  # serves again
        assert cache.length == 3
        with pytest.raises(KimiVLInputError, match="cannot take 1 more"):  # full: the model's own error
            decode_step(model, torch.tensor([8]), cache)
        cache.length = 2
        with pytest.raises(KimiVLInputError, match="contains 96, outside the vocabulary"):
            decode_step(model, torch.tensor([96]), cache)
        assert cache.length == 2  # nothing was committed
        assert cpu_decode.model_step(model, torch.tensor([[7]], dtype=torch.int32), cache) is None
    with torch.no_grad(), monkeypatch.context() as m:
        # a float32 model: the plan says no and the modules answer, without building the extension for it (a
        # first build takes minutes: a float32 model's first decode step must not wait for it)
        m.setattr(cpu_kernels, "kernels", lambda build=True: pytest.fail("built the extension") if build else None)
        model.float()
        cache32 = MLACache.from_config(model.config, 1, 3, dtype=torch.float32)
        prefill(model, torch.tensor([[5, 6]]), cache32)
        assert cpu_decode.model_step(model, torch.tensor([[7]]), cache32) is None
        assert model.__dict__[PLAN].args is None
        assert decode_step(model, torch.tensor([7]), cache32).shape == (1, 96)


def test_after_fused_decoding_the_model_still_trains_and_saves(cpu_ext, monkeypatch, tmp_path) -> None:
    from safetensors.torch import load_file

    from kimivl.checkpoint import save_weights

    model = _model(seed=8)
    _decode(model, monkeypatch, fused=True)  # stacks the experts inside inference mode
    moe = model.model.layers[1].mlp
    assert moe.__dict__.get("_stacked") is not None
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_weights(model.state_dict(), tmp_path)
    saved = {}
    for f in sorted(tmp_path.glob("*.safetensors")):
        saved.update(load_file(str(f)))
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in state)
    model.train()
    ids = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(2))
    loss = model(input_ids=ids).logits.float().logsumexp(-1).mean()
    loss.backward()  # inference tensors among the parameters would raise here
    assert any(e.gate_proj.weight.grad is not None and e.gate_proj.weight.grad.abs().sum() > 0 for e in moe.experts)
    assert model.model.layers[1].self_attn.q_proj.weight.grad is not None


@pytest.mark.parametrize("tokens", [1, 3, 8])
def test_a_moe_module_called_alone_routes_in_cpp_with_the_same_bits(cpu_ext, monkeypatch, tokens: int) -> None:
    import kimivl.decoder.moe as moe_module

    moe = _model(seed=9).model.layers[1].mlp
    x = torch.randn(2, tokens, 64, generator=torch.Generator().manual_seed(tokens)).bfloat16()
    with torch.no_grad():
        fused = moe(x[:1]) if tokens == 8 else moe(x)  # at most SMALL_M = 8 rows
        with monkeypatch.context() as m:
            m.setattr(moe_module, "moe_step", lambda *args: None)
            module = moe(x[:1]) if tokens == 8 else moe(x)
    assert moe.__dict__[PLAN].args is not None
    assert fused.shape == module.shape and torch.equal(fused, module)
    with torch.no_grad():  # beyond SMALL_M rows and under autograd: the module path
        assert moe_module.moe_step(moe, torch.randn(1, 9, 64).bfloat16()) is None
    assert moe_module.moe_step(moe, x) is None


def test_the_one_call_step_lets_other_python_threads_run(cpu_ext) -> None:
    """DecoderStep.step (like the extension's other tensor functions) releases Python's lock while it computes, as
    torch's operators do: a chat server's event loop keeps running while its worker thread decodes. Measured as how
    far a Python loop here gets while another thread runs decode steps (a 50 MB dense layer: the steps are almost
    all C++), against the loop alone; holding the lock through the call would leave it a few percent."""
    import threading
    import time

    model = _model(seed=11, hidden_size=1024, intermediate_size=8192, num_hidden_layers=2)
    cache = MLACache.from_config(model.config, 1, 8, dtype=torch.bfloat16)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core decodes, the other runs the loop
    try:
        with torch.inference_mode():
            prefill(model, torch.tensor([[5, 6]]), cache)

        def steps(seconds: float) -> None:
            end = time.perf_counter() + seconds
            with torch.inference_mode():
                while time.perf_counter() < end:
                    cache.length = 2
                    assert cpu_decode.model_step(model, torch.tensor([[7]]), cache) is not None

        def loop(seconds: float) -> int:
            n, end = 0, time.perf_counter() + seconds
            while time.perf_counter() < end:
                n += 1
            return n

        steps(0.05)  # the plan is built outside the timed part
        alone = loop(0.4)
        worker = threading.Thread(target=steps, args=(0.5,))
        worker.start()
        shared = loop(0.4)
        worker.join()
    finally:
        torch.set_num_threads(threads)
    assert shared > 0.3 * alone, (shared, alone)


@pytest.mark.parametrize("overrides", [{}, {"q_lora_rank": 24}], ids=["q_proj", "q_lora"])
def test_int8_decode_step_is_bit_identical_to_the_module_path(cpu_ext, monkeypatch, overrides) -> None:
    """A decoder quantized to int8 (kimivl.quantization): the one-call step, the layer blocks and the modules read
    the int8 rows with the same kernel and roundings; the experts' int8 weights are stacked once for the step."""
    from kimivl.quantization import Int8Linear, quantize_model

    reference = _model(**overrides)
    model = quantize_model(_model(**overrides))
    assert isinstance(model.model.layers[1].mlp.experts[0].up_proj, Int8Linear)
    served = []
    step = cpu_decode.model_step
    monkeypatch.setattr(cpu_decode, "model_step", lambda *args: served.append(step(*args)) or served[-1])
    whole_logits, whole_cache = _decode(model, monkeypatch, fused=True)
    assert len(served) == 6 and all(s is not None for s in served)
    assert "_stacked_int8" in model.model.layers[1].mlp.__dict__
    layer_logits, layer_cache = _decode(model, monkeypatch, fused="layers")
    assert _plans(model) == [True] * 4
    module_logits, module_cache = _decode(model, monkeypatch, fused=False)
    assert torch.equal(whole_logits, module_logits) and torch.equal(layer_logits, module_logits)
    assert torch.equal(whole_cache, module_cache) and torch.equal(layer_cache, module_cache)
    # the quantized model stays near the bf16 one it came from, and nearer the bf16 model holding its dequantized
    # weights (compared on a prompt's last logits: greedy decodes part at the first near-tie)
    from kimivl.quantization import dequantize_weight, quantize_weight
    from kimivl.quantization.int8 import quantizable

    dequantized = _model(**overrides)
    with torch.no_grad():
        for _, layer in quantizable(dequantized):
            layer.weight.copy_(dequantize_weight(*quantize_weight(layer.weight)).bfloat16())
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ours, near, far = (m(ids).logits[:, -1].float() for m in (model, dequantized, reference))
    assert (ours - near).abs().max() <= 0.05 and (ours - far).abs().max() <= 0.1 * far.abs().max()
