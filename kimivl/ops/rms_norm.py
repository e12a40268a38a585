"""RMSNorm as a pure function: ``weight * (x / sqrt(mean(x^2) + eps))`` with DeepSeek-V3's roundings.

Spec: ``shared/reference/kimivl-spec.md`` §4 "RMSNorm". Normalised in float32, cast back to the input dtype,
then multiplied by the weight (output in the promoted dtype), as the official ``DeepseekV3RMSNorm`` does.

A decode step normalises a single row per sequence, where the PyTorch form's eight tensor ops cost more in
dispatch than in arithmetic. So on the CPU, without autograd and for up to
:data:`kimivl.ops.linear.SMALL_M` rows, it is one call into the C++ kernel ``rms_norm`` of
:mod:`kimivl.ops.cpu_kernels` (the mean square summed in float64; same roundings otherwise). As for the other
kernels, bf16 inputs build the extension on first use and float32 ones use it only once it is built.
On a GPU the normalisation is ``F.rms_norm`` (one fused kernel where torch has one): a captured decode step is
bound by its kernel count (docs/performance.md, "GPU").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kimivl.ops import cpu_kernels
from kimivl.ops.linear import SMALL_M


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: (..., D); weight: (D,). Returns (..., D) in ``promote_types(x.dtype, weight.dtype)``."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if weight.dtype in cpu_kernels.KERNEL_DTYPES and cpu_kernels.inference_rows(x, rows, SMALL_M, weight):
        ext = cpu_kernels.kernels(build=torch.bfloat16 in (x.dtype, weight.dtype))
        if ext is not None:
            return ext.rms_norm(x, weight, eps)
    x32 = x.float()
    if x.is_cuda:
        return weight * F.rms_norm(x32, (x.shape[-1],), eps=eps).to(x.dtype)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)
