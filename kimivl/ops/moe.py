"""Grouped expert dispatch for a top-k MoE layer, as a pure function of tokens, routing and experts.

Spec: ``shared/reference/kimivl-spec.md`` §4 "MoE" item 4; cost model in
``shared/reference/performance-notes.md`` §2.2. Official name: ``DeepseekV3MoE.moe_infer``.

Tokens are sorted by expert id once, each *active* expert runs one matmul chain on its contiguous slice,
and the outputs are put back in (token, slot) order, weighted in float32 and summed over the k slots in
slot order (the official summation order). One ``bincount(...).tolist()`` per call is the only host sync.
Deliberate deviation: the same code path serves inference and autograd (the official ``moe_infer`` is
``@torch.no_grad()``); experts are passed as callables so wrapped experts (e.g. LoRA) keep working.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from kimivl.ops import cpu_kernels
from kimivl.ops.linear import SMALL_M, Linear

RunExperts = Callable[[list[int], list[torch.Tensor]], list[torch.Tensor]]


def moe_dispatch(x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor,
                 experts: Sequence[Callable[[torch.Tensor], torch.Tensor]],
                 run_experts: RunExperts | None = None) -> torch.Tensor:
    """Weighted sum of the chosen experts' outputs per token.

    x: (T, D). topk_idx: (T, k) int64 in [0, len(experts)). topk_weight: (T, k), float32 in practice.
    experts: E callables mapping (n, D) -> (n, D). Returns (T, D) in ``x.dtype``:
    ``out[t] = sum_j topk_weight[t, j] * experts[topk_idx[t, j]](x[t])`` accumulated in the weights' dtype.
    run_experts: optional ``(expert ids, their input rows) -> their outputs`` that runs all active experts
    at once (:func:`fused_cpu_experts`); by default each expert is called on its rows.
    """
    t, k = topk_idx.shape
    flat_idx = topk_idx.reshape(-1)
    order = flat_idx.argsort(stable=True)  # (T*k,) positions in (token, slot) order, grouped by expert
    counts = torch.bincount(flat_idx, minlength=len(experts)).tolist()  # the one host sync
    assert len(counts) == len(experts), f"expert id out of range: {len(counts)} ids for {len(experts)} experts"
    sorted_x = x.index_select(0, order // k)  # (T*k, D): each token once per slot, grouped by expert

    ids = [e for e, n in enumerate(counts) if n]
    inputs = list(sorted_x.split([counts[e] for e in ids])) if ids else []
    outputs = run_experts(ids, inputs) if run_experts is not None else [experts[e](xs) for e, xs in zip(ids, inputs)]
    if not outputs:
        return x.new_zeros(t, x.shape[-1])
    sorted_y = torch.cat(outputs, dim=0)

    # Undo the sort: row `order[i]` of (token, slot) order receives sorted row i.
    y = sorted_y.new_empty(sorted_y.shape).index_copy(0, order, sorted_y).view(t, k, -1)
    y = (y.to(topk_weight.dtype) * topk_weight.unsqueeze(-1)).sum(dim=1)
    return y.to(x.dtype)


def fused_cpu_experts(x: torch.Tensor, experts: Sequence[torch.nn.Module]) -> RunExperts | None:
    """A ``run_experts`` for :func:`moe_dispatch` that runs all chosen experts in two parallel C++ passes
    (``experts_bf16w`` of :mod:`kimivl.ops.cpu_kernels`: every gate/up row, then every down row, split
    evenly over the threads instead of matrix by matrix, no per-expert Python), or None where it does not
    apply: off the CPU, more than :data:`kimivl.ops.linear.SMALL_M` tokens, autograd, experts that are not
    plain bf16 gated-SiLU MLPs (e.g. LoRA-wrapped), or the extension unavailable. The hidden activations
    stay in float32 (the per-expert path rounds them to the input's dtype between the projections)."""
    if x.device.type != "cpu" or x.shape[0] > SMALL_M:
        return None
    projections = [getattr(experts[0], name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    if not all(type(p) is Linear and p.weight.dtype == torch.bfloat16 for p in projections):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or any(p.weight.requires_grad for p in projections)):
        return None
    ext = cpu_kernels.kernels()
    if ext is None:
        return None

    def run(ids: list[int], inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        chosen = [experts[e] for e in ids]
        if any(type(m.gate_proj) is not Linear or type(m.up_proj) is not Linear or type(m.down_proj) is not Linear
               for m in chosen):
            return [m(xs) for m, xs in zip(chosen, inputs)]
        ys = ext.experts_bf16w([xs.float() for xs in inputs], [m.gate_proj.weight for m in chosen],
                               [m.up_proj.weight for m in chosen], [m.down_proj.weight for m in chosen])
        return [y.to(x.dtype) for y in ys]

    return run
