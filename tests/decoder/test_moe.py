"""MoE: grouped dispatch vs a naive per-token reference (forward and grads), golden routing, training path."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kimivl.configuration import DeepseekV3Config, KimiVLConfig
from kimivl.decoder import DeepseekV3ForCausalLM, DeepseekV3MLP, DeepseekV3MoE, MoEGate
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


# --- the fused CPU expert pass (kimivl.ops.moe.fused_cpu_experts, C++ experts_bf16w) --------------------------
def _bf16_moe(seed: int = 0) -> DeepseekV3MoE:
    cfg = DeepseekV3Config.from_dict({
        "hidden_size": 64, "moe_intermediate_size": 40, "n_routed_experts": 8, "num_experts_per_tok": 3,
        "n_shared_experts": 1, "topk_method": "noaux_tc", "scoring_func": "sigmoid", "n_group": 1, "topk_group": 1,
        "norm_topk_prob": True, "routed_scaling_factor": 2.0, "num_attention_heads": 4, "vocab_size": 32})
    torch.manual_seed(seed)
    moe = DeepseekV3MoE(cfg)
    for p in moe.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.15)
    return moe.to(torch.bfloat16).eval()


@pytest.mark.parametrize("tokens", [1, 3, 8])
def test_fused_cpu_experts_match_the_per_expert_path(cpu_ext, tokens: int) -> None:
    from kimivl.ops.moe import fused_cpu_experts

    moe = _bf16_moe()
    x = torch.randn(tokens, 64).bfloat16()
    with torch.no_grad():
        run = fused_cpu_experts(x, moe.experts)
        assert run is not None
        idx, weight, _ = moe.gate(x)
        fused = moe_dispatch(x, idx, weight, moe.experts, run)
        per_expert = moe_dispatch(x, idx, weight, moe.experts)
        # float64 reference on the same bf16 weights
        ref = torch.zeros(tokens, 64, dtype=torch.float64)
        for t in range(tokens):
            for e, w in zip(idx[t].tolist(), weight[t].tolist()):
                m = moe.experts[e]
                h = torch.nn.functional.silu(x[t].double() @ m.gate_proj.weight.double().T) * \
                    (x[t].double() @ m.up_proj.weight.double().T)
                ref[t] += w * (h @ m.down_proj.weight.double().T)
    assert fused.dtype == torch.bfloat16 and fused.shape == (tokens, 64)
    scale = ref.abs().max()
    # the fused pass keeps the hidden activations in float32: closer to float64 than the per-expert path
    err_fused, err_per_expert = (fused.double() - ref).abs().max(), (per_expert.double() - ref).abs().max()
    assert err_fused <= 0.01 * scale and err_fused <= err_per_expert + 0.004 * scale, (err_fused, err_per_expert)


def test_fused_cpu_experts_apply_only_to_small_inference_batches_of_plain_bf16_experts(cpu_ext) -> None:
    from kimivl.ops.moe import fused_cpu_experts

    moe = _bf16_moe()
    x = torch.randn(2, 64).bfloat16()
    with torch.no_grad():
        assert fused_cpu_experts(x, moe.experts) is not None
        assert fused_cpu_experts(torch.randn(9, 64).bfloat16(), moe.experts) is None  # > SMALL_M tokens: GEMMs
        assert fused_cpu_experts(x, moe.float().experts) is None  # float32 weights
    moe = _bf16_moe()
    assert fused_cpu_experts(x, moe.experts) is None  # autograd on (the weights require grad)
    with torch.no_grad():
        moe.experts[0].gate_proj = torch.nn.Linear(64, 40, bias=False).bfloat16()  # a wrapped/replaced projection
        assert fused_cpu_experts(x, moe.experts) is None
        moe.experts[0].gate_proj, wrapped = moe.experts[1].gate_proj, moe.experts[2]
        moe.experts[2].up_proj = torch.nn.Linear(64, 40, bias=False).bfloat16()  # only a chosen expert is wrapped
        run = fused_cpu_experts(x, moe.experts)
        outs = run([1, 2], [x[:1], x[1:]])
        torch.testing.assert_close(outs[1], wrapped(x[1:]))  # that expert ran as a module
