"""Gated SiLU feed-forward of the DeepSeek-V3 decoder: dense layers, routed experts and shared experts.

Spec: ``shared/reference/kimivl-spec.md`` §4 "Dense FFN". Official name: ``DeepseekV3MLP`` with
``gate_proj``, ``up_proj``, ``down_proj`` (no biases). ``hidden_act`` is validated to be ``silu`` by the
config, so the activation is not looked up from a table.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kimivl.ops.linear import Linear
from kimivl.ops.moe import fused_cpu_mlp


class DeepseekV3MLP(nn.Module):
    """down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., hidden_size) -> (..., hidden_size)."""
        fused = fused_cpu_mlp(x, self)  # a decode step on the CPU: one C++ call (kimivl.ops.moe)
        if fused is not None:
            return fused
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
