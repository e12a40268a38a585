"""MoE routing: noaux_tc against a scalar reference, bias/selection/weights properties, group limits, grads."""
from __future__ import annotations

import pytest
import torch

from kimivl.ops.routing import route

RSF = 2.446


def _route(logits: torch.Tensor, bias: torch.Tensor | None, **overrides: object):
    kwargs = dict(top_k=2, n_group=1, topk_group=1, topk_method="noaux_tc", scoring_func="sigmoid",
                  norm_topk_prob=True, routed_scaling_factor=RSF)
    kwargs.update(overrides)
    return route(logits, bias, **kwargs)


def _noaux_tc_reference(logits: torch.Tensor, bias: torch.Tensor, k: int, n_group: int, topk_group: int):
    """Token by token with Python lists: the DeepSeek-V3 rule as the spec words it (§4 MoE 1-3)."""
    t, e = logits.shape
    per_group = e // n_group
    idx, weights = [], []
    for row, b in zip(logits.double().sigmoid().tolist(), [bias.double().tolist()] * t):
        choice = [s + c for s, c in zip(row, b)]
        groups = [sorted(choice[g * per_group:(g + 1) * per_group], reverse=True) for g in range(n_group)]
        group_score = [sum(gs[:2]) for gs in groups]
        kept = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
        allowed = [j for j in range(e) if j // per_group in kept]
        chosen = sorted(allowed, key=lambda j: -choice[j])[:k]
        total = sum(row[j] for j in chosen)
        idx.append(sorted(chosen))
        weights.append({j: row[j] / total * RSF for j in chosen})
    return idx, weights


def _sorted(idx: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = idx.argsort(dim=-1)
    return idx.gather(1, order), weight.gather(1, order)


@pytest.mark.parametrize("n_group,topk_group,k", [(1, 1, 2), (4, 2, 3), (8, 3, 6)])
def test_noaux_tc_matches_scalar_reference(n_group: int, topk_group: int, k: int) -> None:
    g = torch.Generator().manual_seed(n_group)
    logits = torch.randn(64, 16, generator=g)
    bias = torch.randn(16, generator=g) * 0.3
    topk_idx, topk_weight, scores = _route(logits, bias, top_k=k, n_group=n_group, topk_group=topk_group)
    assert topk_idx.dtype == torch.int64 and topk_weight.dtype == torch.float32 and topk_idx.shape == (64, k)
    torch.testing.assert_close(scores, logits.sigmoid())
    ref_idx, ref_w = _noaux_tc_reference(logits, bias, k, n_group, topk_group)
    idx, w = _sorted(topk_idx, topk_weight)
    assert idx.tolist() == ref_idx
    expected_w = torch.tensor([[ref_w[t][j] for j in row] for t, row in enumerate(ref_idx)])
    torch.testing.assert_close(w, expected_w, atol=1e-6, rtol=1e-6)


def test_bias_changes_selection_but_never_weights() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    no_bias_idx, no_bias_w, scores = _route(logits, torch.zeros(4))
    assert sorted(no_bias_idx[0].tolist()) == [0, 1]
    bias = torch.tensor([0.0, -1.0, 0.0, 0.9])  # pushes expert 3 past expert 1
    idx, w, scores_b = _route(logits, bias)
    assert sorted(idx[0].tolist()) == [0, 3]
    torch.testing.assert_close(scores_b, scores)  # scores are unbiased
    s = logits.sigmoid()[0]
    expected = {0: s[0] / (s[0] + s[3]) * RSF, 3: s[3] / (s[0] + s[3]) * RSF}
    for j, wj in zip(idx[0].tolist(), w[0]):
        torch.testing.assert_close(wj, expected[j])


def test_weights_sum_to_scaling_factor_only_when_normalised() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(32, 8, generator=g)
    bias = torch.randn(8, generator=g) * 0.1
    _, w, _ = _route(logits, bias, top_k=3)
    torch.testing.assert_close(w.sum(-1), torch.full((32,), RSF))
    idx, w_raw, scores = _route(logits, bias, top_k=3, norm_topk_prob=False)
    torch.testing.assert_close(w_raw, scores.gather(1, idx) * RSF)
    idx1, w1, scores1 = _route(logits, bias, top_k=1)  # top-1 is never normalised
    torch.testing.assert_close(w1, scores1.gather(1, idx1) * RSF)


@pytest.mark.parametrize("method", ["noaux_tc", "group_limited_greedy"])
def test_group_limit_respected(method: str) -> None:
    g = torch.Generator().manual_seed(4)
    e, n_group, topk_group, k = 32, 8, 2, 5
    logits = torch.randn(100, e, generator=g)
    bias = torch.randn(e, generator=g) * 0.2
    idx, _, scores = _route(logits, bias, top_k=k, n_group=n_group, topk_group=topk_group, topk_method=method,
                            scoring_func="sigmoid" if method == "noaux_tc" else "softmax")
    groups_used = idx // (e // n_group)
    for t in range(idx.shape[0]):
        assert len(set(groups_used[t].tolist())) <= topk_group
    # the kept groups are the best by the method's group score
    choice = (scores + bias if method == "noaux_tc" else scores).view(100, n_group, -1)
    group_score = choice.topk(2, -1).values.sum(-1) if method == "noaux_tc" else choice.amax(-1)
    best = group_score.topk(topk_group, -1).indices
    for t in range(idx.shape[0]):
        assert set(groups_used[t].tolist()) <= set(best[t].tolist())


def test_greedy_is_softmax_topk() -> None:
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(20, 10, generator=g)
    idx, w, scores = _route(logits, None, top_k=3, topk_method="greedy", scoring_func="softmax",
                            norm_topk_prob=False, routed_scaling_factor=1.0)
    torch.testing.assert_close(scores, logits.softmax(-1))
    ref = logits.topk(3, -1)
    assert idx.sort(-1).values.tolist() == ref.indices.sort(-1).values.tolist()
    torch.testing.assert_close(w.sort(-1).values, scores.gather(1, ref.indices).sort(-1).values)


def test_no_gradient_through_selection_gradient_through_weights() -> None:
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(16, 8, generator=g, requires_grad=True)
    bias = (torch.randn(8, generator=g) * 0.1).requires_grad_()
    coeff = torch.randn(16, 2, generator=g)
    idx, w, _ = _route(logits, bias)
    assert not idx.requires_grad
    (w * coeff).sum().backward()
    assert bias.grad is None  # the bias only chooses experts
    assert logits.grad is not None and logits.grad.abs().sum() > 0

    # Same gradient as differentiating the weight formula with the selection held fixed.
    fixed = logits.detach().clone().requires_grad_()
    s = fixed.sigmoid().gather(1, idx)
    ((s / s.sum(-1, keepdim=True) * RSF) * coeff).sum().backward()
    torch.testing.assert_close(logits.grad, fixed.grad)
    # Only the chosen experts' logits receive gradient.
    unchosen = torch.ones_like(logits, dtype=torch.bool).scatter_(1, idx, False)
    assert (logits.grad[unchosen] == 0).all()


def test_rejects_unknown_method_and_bad_groups() -> None:
    logits = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="topk_method = 'sinkhorn'"):
        _route(logits, None, topk_method="sinkhorn")
    with pytest.raises(ValueError, match="8 experts cannot form 3 groups"):
        _route(logits, None, n_group=3)


def _reference64(logits: torch.Tensor, bias: torch.Tensor | None, *, top_k: int, n_group: int, topk_group: int,
                 topk_method: str, scoring_func: str, norm_topk_prob: bool, routed_scaling_factor: float):
    """The routing rules in float64, row by row: (chosen sets, {expert: weight} per row, scores, margin per row: the
    smallest gap at a decision, between the k-th and next choice and between the last kept and next group)."""
    logits = logits.double()
    scores = logits.sigmoid() if scoring_func == "sigmoid" else logits.softmax(-1)
    e = logits.shape[1]
    per = e // n_group
    chosen, weights, margins = [], [], []
    for s in scores.tolist():
        choice = [v + (b if topk_method == "noaux_tc" and bias is not None else 0.0)
                  for v, b in zip(s, bias.tolist() if bias is not None else [0.0] * e)]
        margin = float("inf")
        allowed = list(range(e))
        if topk_method != "greedy" and n_group > 1:
            groups = [sorted(choice[g * per:(g + 1) * per], reverse=True) for g in range(n_group)]
            score = [sum(gs[:2]) if topk_method == "noaux_tc" else gs[0] for gs in groups]
            ranked = sorted(range(n_group), key=lambda g: -score[g])
            if topk_group < n_group:
                margin = score[ranked[topk_group - 1]] - score[ranked[topk_group]]
            allowed = [j for j in allowed if j // per in ranked[:topk_group]]
        ranked = sorted(allowed, key=lambda j: -choice[j])
        if top_k < len(ranked):
            margin = min(margin, choice[ranked[top_k - 1]] - choice[ranked[top_k]])
        picked = ranked[:top_k]
        total = sum(s[j] for j in picked) if norm_topk_prob and top_k > 1 else 1.0
        chosen.append(sorted(picked))
        weights.append({j: s[j] / total * routed_scaling_factor for j in picked})
        margins.append(margin)
    return chosen, weights, scores, margins


CPU_ROUTES = {  # name: (settings, bias)
    "noaux_tc": (dict(top_k=6, n_group=1, topk_group=1, topk_method="noaux_tc", scoring_func="sigmoid"), True),
    "noaux_tc_groups": (dict(top_k=6, n_group=8, topk_group=3, topk_method="noaux_tc", scoring_func="sigmoid"), True),
    "group_limited_softmax": (dict(top_k=4, n_group=4, topk_group=2, topk_method="group_limited_greedy",
                                   scoring_func="softmax"), False),
    "greedy_unnormalised": (dict(top_k=2, n_group=1, topk_group=1, topk_method="greedy", scoring_func="softmax",
                                 norm_topk_prob=False), False),
    "top1": (dict(top_k=1, n_group=1, topk_group=1, topk_method="noaux_tc", scoring_func="sigmoid"), True),
}


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", list(CPU_ROUTES))
def test_cpu_route_follows_the_rules(cpu_ext, case: str, weight_dtype: torch.dtype) -> None:
    """The C++ route of a decode step's rows (route_cpu_rows) against the rules in float64 and against route():
    the same experts wherever the data leaves a margin (its logits sum in another order, so a near-tie may go
    either way), weights and scores to float32 precision, the experts listed best first."""
    from kimivl.ops.routing import route_cpu_rows

    settings, with_bias = CPU_ROUTES[case]
    settings = {"norm_topk_prob": True, "routed_scaling_factor": RSF, **settings}
    g = torch.Generator().manual_seed(11)
    e, d = 64, 256
    weight = (torch.randn(e, d, generator=g) * 0.1).to(weight_dtype)
    bias = torch.randn(e, generator=g) * 0.05 if with_bias else None
    checked = rows = 0
    for call in range(12):
        x = torch.randn(1 + call % 8, d, generator=g).bfloat16()  # 1 to 8 rows, SMALL_M at most
        with torch.inference_mode():
            idx, w, scores = route_cpu_rows(x, weight, bias, **settings)
        logits64 = x.double() @ weight.double().T
        chosen, ref_w, ref_scores, margins = _reference64(logits64, bias, **settings)
        py_idx, py_w, py_scores = route(logits64.float(), bias, **settings)
        assert idx.dtype == torch.int64 and idx.shape == (x.shape[0], settings["top_k"]) and w.dtype == torch.float32
        torch.testing.assert_close(scores.double(), ref_scores, rtol=2e-6, atol=1e-7)
        torch.testing.assert_close(scores, py_scores, rtol=2e-6, atol=1e-7)
        rows += x.shape[0]
        for t in range(x.shape[0]):
            if margins[t] < 1e-5:
                continue
            checked += 1
            assert sorted(idx[t].tolist()) == chosen[t] == sorted(py_idx[t].tolist())
            expected = torch.tensor([ref_w[t][j] for j in idx[t].tolist()], dtype=torch.float64)
            torch.testing.assert_close(w[t].double(), expected, rtol=2e-6, atol=1e-7)
            # best first: by the choice score (the biased one for noaux_tc)
            key = scores[t] + (bias if with_bias and settings["topk_method"] == "noaux_tc" else 0)
            assert key[idx[t]].tolist() == sorted(key[idx[t]].tolist(), reverse=True)
    assert checked >= 0.9 * rows, (checked, rows)  # the data is not all near-ties


def test_cpu_route_applies_to_decode_rows_only(cpu_ext) -> None:
    from kimivl.ops.routing import route_cpu_rows

    settings = dict(top_k=2, n_group=1, topk_group=1, topk_method="noaux_tc", scoring_func="sigmoid",
                    norm_topk_prob=True, routed_scaling_factor=RSF)
    weight = torch.randn(8, 32).bfloat16()
    x = torch.randn(3, 32).bfloat16()
    with torch.no_grad():
        assert route_cpu_rows(x, weight, None, **settings) is not None
        assert route_cpu_rows(torch.randn(9, 32).bfloat16(), weight, None, **settings) is None  # > SMALL_M rows
        assert route_cpu_rows(x.float(), weight, None, **settings) is None  # float32 models keep route()
        assert route_cpu_rows(x, weight.t().contiguous().t(), None, **settings) is None  # rows not contiguous
    # with autograd through the weight: route(), whose weights carry gradient
    assert route_cpu_rows(x, weight.clone().requires_grad_(), None, **settings) is None


def test_cpu_route_names_bad_input(cpu_ext) -> None:
    weight = torch.randn(8, 32).bfloat16()
    with pytest.raises(RuntimeError, match=r"x must be a float32 or bfloat16 \(T, 32\)"):
        cpu_ext.route(torch.randn(2, 16).bfloat16(), weight, None, 2, 1, 1, 0, False, True, 1.0)
    with pytest.raises(RuntimeError, match="top_k 9 of 8 experts in 1 groups"):
        cpu_ext.route(torch.randn(2, 32).bfloat16(), weight, None, 9, 1, 1, 0, False, True, 1.0)
    with pytest.raises(RuntimeError, match=r"bias must be float32 \(8\)"):
        cpu_ext.route(torch.randn(2, 32).bfloat16(), weight, torch.zeros(7), 2, 1, 1, 0, False, True, 1.0)
    with pytest.raises(RuntimeError, match="router weight must be a contiguous float32 or bfloat16"):
        cpu_ext.route(torch.randn(2, 32).bfloat16(), weight.half(), None, 2, 1, 1, 0, False, True, 1.0)
