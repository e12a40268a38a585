"""``Int8Linear``: a linear layer with int8 weights and one float32 scale per output row (weight-only int8, W8A16).

``q = round(w / s)`` clamped to [-127, 127] with ``s = max|w_row| / 127`` (:func:`quantize_weight`): the error of a
weight is at most s / 2, ~0.4 % of the row's largest weight. A decode step's few rows on the CPU take the C++
``linear_int8w`` kernel (int8 rows widened in registers, one read of the weights); anything else multiplies by the
dequantized weight. Which layers of a model are quantized, and the checkpoint format, are
:mod:`kimivl.quantization.int8`'s.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kimivl.ops import cpu_kernels
from kimivl.ops.linear import SMALL_M, float32_linear, upcast_weight

QMAX = 127


def quantize_weight(weight: torch.Tensor, name: str = "weight", work: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)`` with ``q`` int8 (out, in) and ``scale`` float32 (out, 1), ``q * scale`` ~= ``weight``.

    Rows of zeros get scale 1 (any scale gives q = 0). Non-finite weights are refused by name: a NaN would make the
    whole row's scale NaN. ``work``: a float32 buffer of at least ``weight.numel()`` elements on its device to
    compute in (else one is allocated)."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"{name}: int8 quantization needs a floating (out, in) weight, got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    # one float32 copy, worked on in place (a load quantizes the largest weights of a 30 GB model one at a time)
    if work is None:
        w = weight.detach().to(torch.float32, copy=True)
    else:
        w = work[: weight.numel()].view(weight.shape).copy_(weight.detach())
    low, high = w.aminmax(dim=1, keepdim=True)
    amax = torch.maximum(high, -low)
    if not bool(torch.isfinite(amax).all()):
        bad = int((~torch.isfinite(amax)).sum())
        raise ValueError(f"{name}: {bad} of {w.shape[0]} rows hold inf or NaN; they cannot be quantized")
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    q = w.div_(scale).round_().clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q * scale`` in ``dtype`` (products in float32, one rounding)."""
    return (q.float() * scale.float()).to(dtype)


class Int8Linear(nn.Module):
    """A linear layer with int8 weights (buffer ``weight``) and float32 per-row scales (buffer ``weight_scale``).

    The output has the input's dtype. A few rows on the CPU without autograd (a decode step) take the C++
    ``linear_int8w`` kernel, which streams the int8 weights and widens them in registers; anything else multiplies
    by the dequantized weight (gradients reach the input, never the weights, which are buffers: LoRA-style
    adapters can train on top)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, 1, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, name: str = "weight") -> Int8Linear:
        """The quantized copy of ``linear`` (on its device; the bias keeps its dtype)."""
        out = cls(linear.in_features, linear.out_features, bias=False, device="meta")
        q, scale = quantize_weight(linear.weight, name)
        out.weight, out.weight_scale = q, scale
        out.bias = None if linear.bias is None else linear.bias.detach().clone()
        return out

    def _apply(self, fn, recurse=True):
        # a dtype cast of the model (.to(torch.bfloat16), .half()) must not round the scales: they stay float32
        scale = self.weight_scale
        super()._apply(fn, recurse)
        if self.weight_scale.dtype != torch.float32:
            self.weight_scale = scale.to(device=self.weight_scale.device, dtype=torch.float32)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Int8Linear: input has {x.shape[-1]} features, the layer expects {self.in_features}")
        scale = self.weight_scale.view(-1)
        if x.device.type == "cpu" and self.weight.device.type == "cpu":
            rows = x.numel() // self.in_features if self.in_features else 0
            if cpu_kernels.inference_rows(x, rows, SMALL_M):
                ext = cpu_kernels.kernels()
                if ext is not None:
                    return ext.linear_int8w(x, self.weight, scale, self.bias)
            if x.dtype != torch.bfloat16 or not cpu_kernels.cpu_has_fast_bf16():
                # float32 products: torch's bf16 GEMM has no fast path without AVX512-BF16 (a large weight is
                # dequantized into a reused buffer: a fresh one is page-faulted in on every call)
                bias = None if self.bias is None else self.bias.float()
                w = upcast_weight(self.weight, x, self.weight_scale)
                return float32_linear(x.float(), w, bias).to(x.dtype)
        w = dequantize_weight(self.weight, self.weight_scale, x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"
