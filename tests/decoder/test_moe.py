"""MoE: grouped dispatch vs a naive per-token reference (forward and grads), golden routing, training path."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kimivl.configuration import DeepseekV3Config, KimiVLConfig
from kimivl.decoder import DeepseekV3ForCausalLM, DeepseekV3MLP, DeepseekV3MoE, MoEGate
from kimivl.ops.linear import SMALL_M
from kimivl.ops.moe import moe_dispatch

ATOL = RTOL = 1e-4  # float32 activations vs the official implementation (golden README)


def _experts(n: int, hidden: int, width: int, seed: int) -> torch.nn.ModuleList:
    torch.manual_seed(seed)
    return torch.nn.ModuleList(DeepseekV3MLP(hidden, width) for _ in range(n))


def _naive(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, experts) -> torch.Tensor:
    """One token and one slot at a time."""
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros(x.shape[-1], dtype=torch.float32)
        for j in range(idx.shape[1]):
            acc = acc + w[t, j] * experts[int(idx[t, j])](x[t:t + 1])[0].float()
        rows.append(acc.to(x.dtype))
    return torch.stack(rows)


@pytest.mark.parametrize("tokens,k", [(7, 2), (1, 3), (20, 4)])
def test_grouped_dispatch_matches_naive_forward_and_grads(tokens: int, k: int) -> None:
    g = torch.Generator().manual_seed(tokens)
    n_exp, hidden = 8, 16
    experts = _experts(n_exp, hidden, 12, seed=tokens)
    x = torch.randn(tokens, hidden, generator=g, requires_grad=True)
    # distinct experts per token; with few tokens several experts stay inactive
    idx = torch.stack([torch.randperm(n_exp, generator=g)[:k] for _ in range(tokens)])
    w = torch.rand(tokens, k, generator=g, requires_grad=True)
    upstream = torch.randn(tokens, hidden, generator=g)

    out = moe_dispatch(x, idx, w, experts)
    (out * upstream).sum().backward()
    grads = [x.grad, w.grad] + [p.grad for p in experts.parameters()]
    for p in [x, w, *experts.parameters()]:
        p.grad = None
    ref = _naive(x, idx, w, experts)
    (ref * upstream).sum().backward()
    ref_grads = [x.grad, w.grad] + [p.grad for p in experts.parameters()]

    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, ref_grads):
        if want is None:  # an expert that received no token
            assert got is None
        else:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_dispatch_all_tokens_on_one_expert_and_bf16() -> None:
    experts = _experts(4, 8, 6, seed=0).to(torch.bfloat16)
    x = torch.randn(5, 8).to(torch.bfloat16)
    idx = torch.full((5, 1), 2)
    w = torch.full((5, 1), 0.5)
    out = moe_dispatch(x, idx, w, experts)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, (experts[2](x).float() * 0.5).to(torch.bfloat16))


@pytest.fixture(scope="module")
def golden_model(golden_dir: Path, golden_weights: dict[str, torch.Tensor]) -> DeepseekV3ForCausalLM:
    cfg = KimiVLConfig.from_json_file(golden_dir / "config.json").text_config
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(cfg)
    prefix = "language_model."
    sd = {k[len(prefix):]: v for k, v in golden_weights.items() if k.startswith(prefix)}
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


def test_gate_outputs_match_golden_routing(golden_model: DeepseekV3ForCausalLM,
                                           golden: dict[str, torch.Tensor]) -> None:
    captured: dict[int, tuple[torch.Tensor, ...]] = {}
    hooks = []
    for i, layer in enumerate(golden_model.model.layers):
        if isinstance(layer.mlp, DeepseekV3MoE):
            hooks.append(layer.mlp.gate.register_forward_hook(
                lambda _m, _inp, out, i=i: captured.__setitem__(i, out)))
    try:
        with torch.no_grad():
            golden_model(inputs_embeds=golden["prompt.hidden_states.0"])
    finally:
        for h in hooks:
            h.remove()
    assert sorted(captured) == [1, 2]
    for i, (topk_idx, topk_weight, scores) in captured.items():
        ref_idx = golden[f"prompt.routing.layer{i}.topk_idx"]
        ref_w = golden[f"prompt.routing.layer{i}.topk_weight"]
        # topk(sorted=False) order is unspecified: compare per-token sets, weights in the same order
        order, ref_order = topk_idx.argsort(-1), ref_idx.argsort(-1)
        assert torch.equal(topk_idx.gather(1, order), ref_idx.gather(1, ref_order)), f"layer {i} experts differ"
        torch.testing.assert_close(topk_weight.gather(1, order), ref_w.gather(1, ref_order), atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(scores, golden[f"prompt.routing.layer{i}.scores"], atol=ATOL, rtol=RTOL)


def test_moe_layer_trains_gate_but_not_bias(golden_dir: Path) -> None:
    cfg = KimiVLConfig.from_json_file(golden_dir / "config.json").text_config
    torch.manual_seed(0)
    moe = DeepseekV3MoE(cfg).train()
    with torch.no_grad():
        moe.gate.e_score_correction_bias.normal_(0, 0.1)
    x = torch.randn(2, 9, cfg.hidden_size, requires_grad=True)
    y = moe(x)
    (y * torch.randn_like(y)).sum().backward()
    assert isinstance(moe.gate, MoEGate)
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0
    assert moe.gate.e_score_correction_bias.grad is None
    assert not moe.gate.e_score_correction_bias.requires_grad
    assert moe.shared_experts is not None and moe.shared_experts.down_proj.weight.grad is not None
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_moe_output_is_routed_plus_unscaled_shared(golden_dir: Path) -> None:
    cfg = KimiVLConfig.from_json_file(golden_dir / "config.json").text_config
    torch.manual_seed(1)
    moe = DeepseekV3MoE(cfg).eval()
    x = torch.randn(1, 6, cfg.hidden_size)
    with torch.no_grad():
        idx, w, _ = moe.gate(x.view(-1, cfg.hidden_size))
        routed = _naive(x.view(-1, cfg.hidden_size), idx, w, moe.experts).view_as(x)
        torch.testing.assert_close(moe(x), routed + moe.shared_experts(x), atol=1e-6, rtol=1e-6)


# --- the fused CPU pass (kimivl.ops.moe.fused_cpu_moe / fused_cpu_mlp, C++ moe_bf16w) -----------------------
def _bf16_moe(seed: int = 0, shared: int = 1, hidden: int = 64, inter: int = 40) -> DeepseekV3MoE:
    cfg = DeepseekV3Config.from_dict({
        "hidden_size": hidden, "moe_intermediate_size": inter, "n_routed_experts": 8, "num_experts_per_tok": 3,
        "n_shared_experts": shared, "topk_method": "noaux_tc", "scoring_func": "sigmoid", "n_group": 1,
        "topk_group": 1, "norm_topk_prob": True, "routed_scaling_factor": 2.0, "num_attention_heads": 4,
        "vocab_size": 32})
    torch.manual_seed(seed)
    moe = DeepseekV3MoE(cfg)
    for p in moe.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.15)
    return moe.to(torch.bfloat16).eval()


def _module_path(monkeypatch) -> None:
    """Experts and MLPs called as modules run their three projections (no fused C++ MLP pass)."""
    import kimivl.decoder.mlp as mlp_module

    monkeypatch.setattr(mlp_module, "fused_cpu_mlp", lambda *args: None)


def _mlp64(m, x: torch.Tensor) -> torch.Tensor:
    """A gated-SiLU MLP in float64 on its (bf16) weights."""
    h = torch.nn.functional.silu(x @ m.gate_proj.weight.double().T) * (x @ m.up_proj.weight.double().T)
    return h @ m.down_proj.weight.double().T


@pytest.mark.parametrize("shared", [0, 1])
@pytest.mark.parametrize("tokens", [1, 3, 8, 40])
def test_fused_cpu_moe_matches_the_module_path(cpu_ext, monkeypatch, tokens: int, shared: int) -> None:
    from kimivl.ops.moe import fused_cpu_moe, moe_fused_max_tokens

    moe = _bf16_moe(shared=shared)
    x = torch.randn(1, tokens, 64).bfloat16()
    with torch.no_grad():
        idx, weight, _ = moe.gate(x.view(-1, 64))
        # the fused pass takes up to 128 tokens where torch has no fast bf16 GEMM, up to 8 where it has one
        applies = tokens <= moe_fused_max_tokens()
        assert (fused_cpu_moe(x.view(-1, 64), idx, weight, moe.experts, moe.shared_experts) is not None) == applies
        fused = moe(x)
        _module_path(monkeypatch)
        per_expert = moe_dispatch(x.view(-1, 64), idx, weight, moe.experts).view_as(x)
        if moe.shared_experts is not None:
            per_expert = per_expert + moe.shared_experts(x)
        ref = torch.zeros(tokens, 64, dtype=torch.float64)
        for t in range(tokens):
            xt = x[0, t].double()
            for e, w in zip(idx[t].tolist(), weight[t].tolist()):
                ref[t] += w * _mlp64(moe.experts[e], xt)
            if moe.shared_experts is not None:
                ref[t] += _mlp64(moe.shared_experts, xt)
    assert fused.dtype == torch.bfloat16 and fused.shape == x.shape
    scale = ref.abs().max()
    # the fused pass keeps the hidden activations in float32: at least as close to float64 as the module path
    err_fused = (fused[0].double() - ref).abs().max()
    err_module = (per_expert[0].double() - ref).abs().max()
    assert err_fused <= 0.01 * scale and err_fused <= err_module + 0.004 * scale, (err_fused, err_module)


def test_fused_cpu_moe_rounds_like_the_module_path_given_the_same_expert_outputs(cpu_ext, monkeypatch) -> None:
    # Experts with one hidden unit of exactly 512 (silu(128) = 128 in float32, times 4) and outputs 512 * w
    # (exact in bf16) isolate the combine step: weighted sum in float32 in slot order, rounded to bf16, the
    # shared output added and rounded. Bit for bit.
    from kimivl.ops.moe import fused_cpu_moe, moe_fused_max_tokens

    moe = _bf16_moe(shared=1)
    with torch.no_grad():
        for m in [*moe.experts, moe.shared_experts]:
            for proj in (m.gate_proj, m.up_proj, m.down_proj):
                proj.weight.zero_()
        x = torch.zeros(2, 64).bfloat16()
        x[:, 0] = 32.0
        g = torch.Generator().manual_seed(5)
        for m in [*moe.experts, moe.shared_experts]:
            m.gate_proj.weight[0, 0], m.up_proj.weight[0, 0] = 4.0, 0.125
            m.down_proj.weight[:, 0] = torch.randn(64, generator=g).bfloat16()
        idx = torch.tensor([[0, 5, 2], [7, 1, 3]])
        weight = torch.rand(2, 3, generator=g) * 2
        fused = fused_cpu_moe(x, idx, weight, moe.experts, moe.shared_experts)
        _module_path(monkeypatch)
        module = moe_dispatch(x, idx, weight, moe.experts) + moe.shared_experts(x)
    assert torch.equal(fused, module)


def test_fused_cpu_mlp_is_the_dense_mlp(cpu_ext) -> None:
    from kimivl.decoder.mlp import DeepseekV3MLP
    from kimivl.ops.moe import fused_cpu_mlp

    torch.manual_seed(0)
    mlp = DeepseekV3MLP(64, 96)
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.15)
    mlp = mlp.bfloat16().eval()
    x = torch.randn(2, 3, 64).bfloat16()
    with torch.no_grad():
        y = fused_cpu_mlp(x, mlp)
        assert y is not None and y.shape == x.shape and y.dtype == torch.bfloat16
        assert torch.equal(mlp(x), y)  # the module takes the fused path itself
        ref = _mlp64(mlp, x.double())
        assert (y.double() - ref).abs().max() <= 0.01 * ref.abs().max()
        assert fused_cpu_mlp(torch.randn(9, 64).bfloat16(), mlp) is None  # > SMALL_M rows: GEMMs


def test_fused_cpu_moe_applies_only_to_small_inference_batches_of_plain_bf16_experts(cpu_ext) -> None:
    from kimivl.ops.moe import fused_cpu_moe, moe_fused_max_tokens

    moe = _bf16_moe()
    x = torch.randn(2, 64).bfloat16()
    with torch.no_grad():
        idx, weight, _ = moe.gate(x)
        assert fused_cpu_moe(x, idx, weight, moe.experts, moe.shared_experts) is not None
        big = torch.randn(moe_fused_max_tokens() + 1, 64).bfloat16()
        idx_big, weight_big, _ = moe.gate(big)
        assert fused_cpu_moe(big, idx_big, weight_big, moe.experts) is None  # a prefill: per-expert GEMMs
        assert fused_cpu_moe(big[:-1], idx_big[:-1], weight_big[:-1], moe.experts) is not None
        moe32 = _bf16_moe().float()
        assert fused_cpu_moe(x.float(), idx, weight, moe32.experts) is None  # float32 weights
    assert fused_cpu_moe(x, idx, weight, moe.experts) is None  # autograd on (the weights require grad)
    for p in moe.parameters():
        p.requires_grad_(False)
    moe.experts[idx[1, 2].item()].down_proj.weight.requires_grad_(True)  # one trainable chosen expert
    assert fused_cpu_moe(x, idx, weight, moe.experts) is None
    moe.experts[idx[1, 2].item()].down_proj.weight.requires_grad_(False)
    assert fused_cpu_moe(x, idx, weight, moe.experts) is not None  # all frozen: inference even with grad on
    with torch.no_grad():
        chosen = idx[0, 0].item()
        moe.experts[chosen].gate_proj = torch.nn.Linear(64, 40, bias=False).bfloat16()  # a wrapped/replaced projection
        assert fused_cpu_moe(x, idx, weight, moe.experts) is None
        torch.testing.assert_close(moe(x), moe_dispatch(x, idx, weight, moe.experts) + moe.shared_experts(x))
        with pytest.raises(ValueError, match="expert ids 0..8 chosen for a layer of 8 experts"):
            fused_cpu_moe(x, torch.tensor([[0, 8, 1], [1, 2, 3]]), weight, _bf16_moe().experts)


def test_moe_bf16w_names_bad_input(cpu_ext) -> None:
    moe = _bf16_moe()
    x = torch.randn(2, 64).bfloat16()
    idx, weight = torch.tensor([[0, 1, 2], [1, 2, 3]]), torch.rand(2, 3)
    ws = [[m.gate_proj.weight for m in moe.experts[:4]], [m.up_proj.weight for m in moe.experts[:4]],
          [m.down_proj.weight for m in moe.experts[:4]]]
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="expert 3 is chosen but not among the 3 ids"):
            cpu_ext.moe_bf16w(x, idx, weight, [0, 1, 2], *(w[:3] for w in ws), 0)
        with pytest.raises(RuntimeError, match="4 routed ids \\+ 1 shared MLPs but 4 gate"):
            cpu_ext.moe_bf16w(x, idx, weight, [0, 1, 2, 3], *ws, 1)
        with pytest.raises(RuntimeError, match="topk_idx \\(T, k\\) int64"):
            cpu_ext.moe_bf16w(x, idx[:1], weight, [0, 1, 2, 3], *ws, 0)


def test_the_fused_moe_limit_follows_the_cpus_bf16_gemm(monkeypatch) -> None:
    from kimivl.ops import cpu_kernels
    from kimivl.ops import moe as moe_ops

    monkeypatch.setattr(cpu_kernels, "cpu_has_fast_bf16", lambda: False)
    assert moe_ops.moe_fused_max_tokens() == moe_ops.MOE_FUSED_MAX_TOKENS == 128  # vs float32 GEMMs on upcasts
    monkeypatch.setattr(cpu_kernels, "cpu_has_fast_bf16", lambda: True)
    assert moe_ops.moe_fused_max_tokens() == SMALL_M  # torch's bf16 GEMMs beyond decode shapes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_inference_runs_gate_and_up_as_one_matmul(dtype: torch.dtype) -> None:
    """In inference mode on the CPU each expert multiplies its adjacent gate and up rows at once; the layer's
    output equals the per-expert module path up to the GEMM's blocking (float32: 1e-6; bf16: rounding)."""
    moe = _bf16_moe(shared=1).to(dtype)
    x = torch.randn(1, 40, 64, generator=torch.Generator().manual_seed(5)).to(dtype)
    with torch.no_grad():  # not inference mode: the module path, and no stacking (FSDP / DeepSpeed safe)
        assert moe._cpu_stack(x) is None and "_stacked" not in moe.__dict__
        per_expert = moe(x)
    with torch.inference_mode():
        experts = moe._cpu_stack(x.view(-1, 64)).experts
        assert experts is not None and len(experts) == 8
        e = moe.experts[2]
        one = experts[2](x[0, :5])  # 5 rows: the streaming kernel for bf16, F.linear for float32
        fused = moe(x)
    want = e.down_proj(torch.nn.functional.silu(e.gate_proj(x[0, :5])) * e.up_proj(x[0, :5]))
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(one, want, **tol)
    torch.testing.assert_close(fused, per_expert, **tol)
    assert moe._cpu_stack(torch.zeros(2, 64, device="meta")) is None  # off the CPU: not this path


def test_an_optimizer_built_before_stacking_keeps_training_the_experts() -> None:
    """Stacking (on the first inference-mode forward on the CPU, e.g. a generate() between training steps)
    moves the experts' weights into the stack without replacing their Parameter objects."""
    moe = _bf16_moe(shared=1).float()
    params = {name: p for name, p in moe.named_parameters()}
    opt = torch.optim.SGD([p for p in moe.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(1, 12, 64, generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        moe(x)
    assert "_stacked" in moe.__dict__ and dict(moe.named_parameters()) == params  # same objects
    before = moe.experts[3].up_proj.weight.detach().clone()
    moe(x).square().sum().backward()
    opt.step()
    assert moe.experts[3].up_proj.weight.grad is not None
    assert not torch.equal(moe.experts[3].up_proj.weight.detach(), before)  # the optimizer's step reached it
    gate, up, _ = moe.stacked_experts()  # and the stack is that same memory
    assert torch.equal(up[3], moe.experts[3].up_proj.weight.detach())


# --- the grouped CPU kernel for prefills (kimivl.ops.moe.grouped_cpu_moe, C++ moe_experts_bf16) -------------
def _isas(ext) -> list[str]:
    isa = ext.experts_isa()
    return {"amx": ["amx", "avx512_bf16"], "avx512_bf16": ["avx512_bf16"], "avx2": ["avx2"]}.get(isa, [])


def _stack(moe: DeepseekV3MoE) -> tuple[torch.Tensor, torch.Tensor]:
    gate_up = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in moe.experts])
    return gate_up.contiguous(), torch.stack([e.down_proj.weight for e in moe.experts]).contiguous()


# (64, 32): AMX tiles apply; (48, 20): hidden 48 leaves a 16-column tail of the 16-token vectors' gather and
# an expert width that is not a multiple of 32 (the vdpbf16ps kernel only); (2080, 32): the gate / up products
# in two K blocks of the vdpbf16ps kernel (2048 + 32 columns)
@pytest.mark.parametrize("hidden,inter", [(64, 32), (48, 20), (96, 64), (2080, 32)])
@pytest.mark.parametrize("tokens", [1, 17, 40, 150])
def test_grouped_cpu_moe_matches_the_module_path(cpu_ext, monkeypatch, hidden: int, inter: int, tokens: int) -> None:
    isas = _isas(cpu_ext)
    if not isas:
        pytest.skip("this build has no grouped experts kernel for this CPU (experts_isa() = ''; an x86 CPU has "
                    "at least the AVX2 one)")
    moe = _bf16_moe(hidden=hidden, inter=inter)
    gate_up, down = _stack(moe)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(tokens)).bfloat16()
    _module_path(monkeypatch)
    with torch.no_grad():
        idx, weight, _ = moe.gate(x)
        module = moe_dispatch(x, idx, weight, moe.experts)
        ref = torch.zeros(tokens, hidden, dtype=torch.float64)
        for t in range(tokens):
            for e, w in zip(idx[t].tolist(), weight[t].tolist()):
                ref[t] += w * _mlp64(moe.experts[e], x[t].double())
        scale = ref.abs().max()
        err_module = (module.double() - ref).abs().max()
        for isa in isas:
            if isa == "amx" and (hidden % 32 or inter % 32):
                continue
            y = cpu_ext.moe_experts_bf16(x, idx, weight, gate_up, down, isa == "amx", 10**6)
            assert y.dtype == torch.bfloat16 and y.shape == x.shape
            # the same roundings as the module path; only the products' summation order differs
            err = (y.double() - ref).abs().max()
            assert err <= err_module + 0.004 * scale, (isa, err, err_module)
            torch.testing.assert_close(y, module, atol=0.02 * scale.item(), rtol=0.02)
        assert err_module <= 0.02 * scale  # bf16's own rounding of outputs, weights and hidden activations


@pytest.mark.parametrize("hidden,inter", [(96, 64), (2080, 32)])
def test_grouped_cpu_moe_gives_a_token_the_same_bits_whatever_its_experts_other_rows(cpu_ext, hidden: int,
                                                                                    inter: int) -> None:
    # Each token is a lane of the kernels' 16-token vectors (zero lanes pad the last one), so its output cannot
    # depend on how many rows its experts got (row blocks, token chunks, padding): every count below, past the
    # vdpbf16ps kernel's 64-token chunks, against the first rows of one 160-token call. (2080: two K blocks.)
    isas = _isas(cpu_ext)
    if not isas:
        pytest.skip("this build has no grouped experts kernel for this CPU (experts_isa() = '')")
    moe = _bf16_moe(hidden=hidden, inter=inter)
    gate_up, down = _stack(moe)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(160, hidden, generator=g).bfloat16()
    idx = torch.tensor([[2, 5]]).expand(160, 2).contiguous()  # every token on the same two experts
    weight = torch.rand(160, 2, generator=g)
    for isa in isas:
        if isa == "amx" and (hidden % 32 or inter % 32):
            continue
        whole = cpu_ext.moe_experts_bf16(x, idx, weight, gate_up, down, isa == "amx", 10**6)
        for n in (1, 7, 8, 9, 16, 17, 24, 25, 40, 56, 57, 64, 72, 88, 100):
            part = cpu_ext.moe_experts_bf16(x[:n], idx[:n], weight[:n], gate_up, down, isa == "amx", 10**6)
            assert torch.equal(part, whole[:n]), (isa, n)


def test_grouped_cpu_moe_rounds_like_the_module_path_given_the_same_expert_outputs(cpu_ext, monkeypatch) -> None:
    # One hidden unit of exactly 512 per expert (see the fused test above): the expert outputs are exact, so this
    # isolates the weighted sum over slots in float32, slot order, one rounding. Bit for bit.
    isas = _isas(cpu_ext)
    if not isas:
        pytest.skip("this build has no grouped experts kernel for this CPU (experts_isa() = '')")
    moe = _bf16_moe(hidden=64, inter=32)
    with torch.no_grad():
        for m in moe.experts:
            for proj in (m.gate_proj, m.up_proj, m.down_proj):
                proj.weight.zero_()
        g = torch.Generator().manual_seed(5)
        for m in moe.experts:
            m.gate_proj.weight[0, 0], m.up_proj.weight[0, 0] = 4.0, 0.125
            m.down_proj.weight[:, 0] = torch.randn(64, generator=g).bfloat16()
        x = torch.zeros(20, 64).bfloat16()
        x[:, 0] = 32.0
        idx = torch.rand(20, 8, generator=g).argsort(-1)[:, :3]
        weight = torch.rand(20, 3, generator=g) * 2
        gate_up, down = _stack(moe)
        _module_path(monkeypatch)
        module = moe_dispatch(x, idx, weight, moe.experts)
        for isa in isas:
            assert torch.equal(cpu_ext.moe_experts_bf16(x, idx, weight, gate_up, down, isa == "amx", 10**6), module)


def test_grouped_cpu_moe_applies_to_inference_prefills_only(cpu_ext, monkeypatch) -> None:
    import kimivl.ops.moe as moe_ops

    if not _isas(cpu_ext):
        pytest.skip("this build has no grouped experts kernel for this CPU (experts_isa() = '')")
    moe = _bf16_moe(hidden=64, inter=32)
    x = torch.randn(1, 160, 64, generator=torch.Generator().manual_seed(3)).bfloat16()  # > MOE_FUSED_MAX_TOKENS
    calls = []
    real = moe_ops.grouped_cpu_moe

    def spy(*args):
        calls.append(real(*args))
        return calls[-1]

    import kimivl.decoder.moe as moe_module
    monkeypatch.setattr(moe_module, "grouped_cpu_moe", spy)
    with torch.no_grad():
        module = moe(x)  # not inference mode: no stacking, the module path (FSDP / DeepSpeed safe)
    assert calls == []
    with torch.inference_mode():
        grouped = moe(x)
    assert len(calls) == 1 and calls[0] is not None
    torch.testing.assert_close(grouped, module, atol=0.05, rtol=0.02)
    gate_up, down = moe.__dict__["_cpu_stacked"].gate_up, moe.stacked_experts()[2]
    with torch.inference_mode():
        x2 = x.view(160, 64)
        idx, weight, _ = moe.gate(x2)
        counts = torch.bincount(idx.reshape(-1), minlength=8)
        # experts wider than max_rows run as ATen GEMMs inside the call: where torch's bf16 GEMM has a hardware
        # path (AVX512-BF16 / AMX), the module path's very ops and roundings (for experts of more than SMALL_M rows;
        # fewer take the module path's streaming kernel). (The AVX2 path never asks for them: every expert runs in
        # its kernel; the module path computes there in float32 on upcast weights.)
        assert counts.min() > SMALL_M, counts
        per_expert = moe_dispatch(x2, idx, weight, moe._cpu_stack(x2).experts)
        if cpu_ext.bf16_isa():
            assert torch.equal(cpu_ext.moe_experts_bf16(x2, idx, weight, gate_up, down, False, 0), per_expert)
        mixed = cpu_ext.moe_experts_bf16(x2, idx, weight, gate_up, down, False, int(counts.median()))
        torch.testing.assert_close(mixed, per_expert, atol=0.05, rtol=0.02)
        # float32 activations, or autograd through them: not this kernel
        assert moe_ops.grouped_cpu_moe(x2.float(), idx, weight, gate_up, down) is None
    x_grad = x2.clone().requires_grad_()
    assert moe_ops.grouped_cpu_moe(x_grad, idx, weight, gate_up, down) is None


def test_moe_experts_bf16_names_bad_input(cpu_ext) -> None:
    if not _isas(cpu_ext):
        pytest.skip("this build has no grouped experts kernel for this CPU (experts_isa() = '')")
    moe = _bf16_moe(hidden=48, inter=20)
    gate_up, down = _stack(moe)
    x = torch.randn(4, 48).bfloat16()
    idx = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 9], [0, 1, 2]])
    w = torch.rand(4, 3)
    with pytest.raises(RuntimeError, match="expert id 9 chosen for token 2 of a layer of 8 experts"):
        cpu_ext.moe_experts_bf16(x, idx, w, gate_up, down, False, 100)
    with pytest.raises(RuntimeError, match=r"x has 64 features; gate_up \[8, 40, 48\] and down \[8, 48, 20\]"):
        cpu_ext.moe_experts_bf16(torch.randn(4, 64).bfloat16(), idx.clamp(max=7), w, gate_up, down, False, 100)
    with pytest.raises(RuntimeError, match=r"topk_idx \(T, k\) int64 and topk_weight \(T, k\) float32 with T = 4"):
        cpu_ext.moe_experts_bf16(x, idx.clamp(max=7)[:3], w[:3], gate_up, down, False, 100)
    if cpu_ext.bf16_isa() == "amx":
        with pytest.raises(RuntimeError, match="AMX tiles need hidden size 48 and expert width 20 in multiples of 32"):
            cpu_ext.moe_experts_bf16(x, idx.clamp(max=7), w, gate_up, down, True, 100)
