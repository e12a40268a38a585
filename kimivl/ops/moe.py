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


def moe_dispatch(x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor,
                 experts: Sequence[Callable[[torch.Tensor], torch.Tensor]]) -> torch.Tensor:
    """Weighted sum of the chosen experts' outputs per token.

    x: (T, D). topk_idx: (T, k) int64 in [0, len(experts)). topk_weight: (T, k), float32 in practice.
    experts: E callables mapping (n, D) -> (n, D). Returns (T, D) in ``x.dtype``:
    ``out[t] = sum_j topk_weight[t, j] * experts[topk_idx[t, j]](x[t])`` accumulated in the weights' dtype.
    """
    t, k = topk_idx.shape
    flat_idx = topk_idx.reshape(-1)
    order = flat_idx.argsort(stable=True)  # (T*k,) positions in (token, slot) order, grouped by expert
    counts = torch.bincount(flat_idx, minlength=len(experts)).tolist()  # the one host sync
    assert len(counts) == len(experts), f"expert id out of range: {len(counts)} ids for {len(experts)} experts"
    sorted_x = x.index_select(0, order // k)  # (T*k, D): each token once per slot, grouped by expert

    outputs = []
    start = 0
    for expert, n in zip(experts, counts):
        if n:
            outputs.append(expert(sorted_x[start:start + n]))
            start += n
    if not outputs:
        return x.new_zeros(t, x.shape[-1])
    sorted_y = torch.cat(outputs, dim=0)

    # Undo the sort: row `order[i]` of (token, slot) order receives sorted row i.
    y = sorted_y.new_empty(sorted_y.shape).index_copy(0, order, sorted_y).view(t, k, -1)
    y = (y.to(topk_weight.dtype) * topk_weight.unsqueeze(-1)).sum(dim=1)
    return y.to(x.dtype)
