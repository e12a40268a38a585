"""Top-k expert routing of the DeepSeek-V3 MoE gate, as a pure function.

Spec: ``shared/reference/kimivl-spec.md`` §4 "MoE" items 1-3 and 6, §9 items 5, 6 and 11. Official name:
``MoEGate.forward`` of the DeepSeek-V3 remote code (``noaux_tc``); ``greedy`` and
``group_limited_greedy`` follow the DeepSeek-V2 gate.

Deliberate deviations:
- Works in training mode and is differentiable: expert *selection* is computed from detached scores
  (the bias is never trained by gradient), the *weights* keep their gradient to the gate logits.
  The official ``noaux_tc`` gate asserts ``not self.training``.
- Experts of dropped groups are masked with ``-inf`` (DeepSeek's inference code, transformers 5) rather than
  the remote code's ``0.0``; they differ only if a kept expert's biased score is negative.
- ``routed_scaling_factor`` is applied after the optional normalisation for every method (the V3 rule);
  DeepSeek-V2 applied it only when not normalising.
- A decode step's few bf16 rows on the CPU route through :func:`route_cpu_rows` (the C++ extension's plain loops,
  the same rules): the dozen tensor ops below cost ~1 % of a decode step there. Every decode path takes it, so
  they agree bit for bit; against this function its scores and weights differ in the last bits, and it lists the
  chosen experts best first.
"""
from __future__ import annotations

import torch

from kimivl.ops import cpu_kernels
from kimivl.ops.linear import SMALL_M

TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
SCORING_FUNCS = ("sigmoid", "softmax")


def _keep_top_groups(choice: torch.Tensor, group_scores: torch.Tensor, topk_group: int) -> torch.Tensor:
    """Set the choice scores of experts outside the ``topk_group`` best groups to -inf.

    choice: (T, E); group_scores: (T, G). Returns (T, E).
    """
    t, n_group = group_scores.shape
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False).indices  # (T, topk_group)
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
    keep = keep.unsqueeze(-1).expand(t, n_group, choice.shape[-1] // n_group).reshape(t, -1)
    return choice.masked_fill(~keep, float("-inf"))


def route(logits: torch.Tensor, bias: torch.Tensor | None, *, top_k: int, n_group: int, topk_group: int,
          topk_method: str, scoring_func: str, norm_topk_prob: bool,
          routed_scaling_factor: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pick ``top_k`` experts per token and their mixing weights.

    logits: (T, E) float32 gate logits. bias: (E,) ``e_score_correction_bias`` (``noaux_tc`` only) or None.
    Returns ``topk_idx`` (T, k) int64, ``topk_weight`` (T, k) float32 and ``scores`` (T, E) float32 (unbiased
    sigmoid/softmax of the logits). Expert order within a row is unspecified (``topk(sorted=False)``).

    - ``noaux_tc``: choice = scores + bias; a group's score is the sum of its top-2 choice scores; keep the
      ``topk_group`` best groups; top-k by choice among them. Weights are the *unbiased* scores.
    - ``group_limited_greedy``: a group's score is its max score; same group limit; top-k by score.
    - ``greedy``: top-k by score.
    Weights are normalised to sum 1 (+1e-20) when ``norm_topk_prob`` and ``top_k > 1``, then multiplied by
    ``routed_scaling_factor``.
    """
    if topk_method not in TOPK_METHODS:
        raise ValueError(f"topk_method = {topk_method!r}: must be one of {TOPK_METHODS}")
    if scoring_func not in SCORING_FUNCS:
        raise ValueError(f"scoring_func = {scoring_func!r}: must be one of {SCORING_FUNCS}")
    t, n_experts = logits.shape
    if n_experts % n_group != 0 or not 1 <= topk_group <= n_group:
        raise ValueError(f"{n_experts} experts cannot form {n_group} groups with topk_group={topk_group}")

    logits = logits.float()
    scores = logits.sigmoid() if scoring_func == "sigmoid" else logits.softmax(dim=-1)

    # Selection never carries gradient: only the weights below do.
    choice = scores.detach()
    if topk_method == "noaux_tc" and bias is not None:
        choice = choice + bias.detach().float()
    if topk_method != "greedy" and n_group > 1:
        grouped = choice.view(t, n_group, n_experts // n_group)
        if topk_method == "noaux_tc":
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)
        else:
            group_scores = grouped.amax(dim=-1)
        choice = _keep_top_groups(choice, group_scores, topk_group)
    topk_idx = torch.topk(choice, k=top_k, dim=-1, sorted=False).indices

    topk_weight = scores.gather(1, topk_idx)
    if norm_topk_prob and top_k > 1:
        topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
    topk_weight = topk_weight * routed_scaling_factor
    return topk_idx, topk_weight, scores


def route_cpu_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, top_k: int, n_group: int,
                   topk_group: int, topk_method: str, scoring_func: str, norm_topk_prob: bool,
                   routed_scaling_factor: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """:func:`route` of ``F.linear(x.float(), weight.float())`` in one C++ call (``route`` of
    :mod:`kimivl.ops.cpu_kernels`), or None where it does not apply.

    Applies to a decode step's rows: x (T, D) bf16 on the CPU with ``0 < T <= SMALL_M``, no autograd through x,
    weight or bias, a contiguous bf16 or float32 weight, a known method and scoring function, and the extension
    built. Returns ``topk_idx`` (best first), ``topk_weight`` and ``scores`` as :func:`route` does.
    """
    if (x.dtype != torch.bfloat16 or x.dim() != 2 or topk_method not in TOPK_METHODS
            or scoring_func not in SCORING_FUNCS or weight.device.type != "cpu"
            or weight.dtype not in (torch.bfloat16, torch.float32) or not weight.is_contiguous()
            or not cpu_kernels.inference_rows(x, x.shape[0], SMALL_M, weight, bias)):
        return None
    ext = cpu_kernels.kernels()
    if ext is None:
        return None
    return ext.route(x, weight.detach(), None if bias is None else bias.detach(), top_k, n_group, topk_group,
                     TOPK_METHODS.index(topk_method), scoring_func == "softmax", norm_topk_prob,
                     float(routed_scaling_factor))
