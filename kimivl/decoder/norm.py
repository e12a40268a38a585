"""RMSNorm of the DeepSeek-V3 decoder.

Spec: ``shared/reference/kimivl-spec.md`` §4 "RMSNorm". Official name: ``DeepseekV3RMSNorm`` (parameter
``weight``). Computed in float32, cast back to the input dtype, then multiplied by the weight, as the
official code does (the maths: :func:`kimivl.ops.rms_norm.rms_norm`). ``eps`` is always passed explicitly:
``rms_norm_eps`` for the layer norms, but 1e-6 for ``kv_a_layernorm`` / ``q_a_layernorm`` (spec §9 item 3).
"""
from __future__ import annotations

import torch
from torch import nn

from kimivl.ops.rms_norm import rms_norm


class DeepseekV3RMSNorm(nn.Module):
    """y = weight * (x / sqrt(mean(x^2) + eps)), the normalisation in float32."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., hidden_size) -> same shape and dtype."""
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
