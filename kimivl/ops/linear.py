"""``linear`` / ``Linear``: ``F.linear`` that stays fast for bfloat16 weights on any CPU.

Why: bf16 is the default dtype of the real checkpoints, but on a CPU without AVX512-BF16 (:func:`kimivl.ops.cpu_kernels.cpu_has_fast_bf16`
is False) torch's bf16 matmul has no fast path (~0.4 GFLOP/s for GEMMs,
7-11 GB/s for GEMVs). So, for a bf16 weight on the CPU:
- few rows (<= ``SMALL_M``, a decode step, an expert's share of one token) and no autograd: the C++
  weight-streaming kernel of :mod:`kimivl.ops.cpu_kernels` (float32 accumulation), when it is built;
- otherwise, on a CPU without a bf16 fast path, or for non-bf16 activations: float32 GEMM on an upcast copy
  of the weight (the GEMM is compute-bound at these sizes; large weights are widened into a reused buffer, as a
  fresh allocation's page faults cost several times the copy);
- otherwise ``F.linear`` unchanged.
The output has the input's dtype, as ``F.linear``'s. Float32 GEMMs (float32 weights, and the upcast products
above) are :func:`float32_linear`: oneDNN's on AMD CPUs, else ``F.linear``; everything on a GPU is ``F.linear``. Where
torch's bf16 GEMM is oneDNN's, a bias is added inside oneDNN's GEMM (bit-identical; no pass copying it into
the output first).
:func:`linear_gelu` is a linear layer followed by GELU (the vision MLP, the projector), with the GELU taken
into oneDNN's GEMM as a post-op where torch's bf16 GEMM is oneDNN's.
"""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from kimivl.ops import cpu_kernels

SMALL_M: int = 8  # rows up to which the streaming kernel beats a GEMM (measured: docs/performance.md)
# float32 weights of at least this many elements take oneDNN's product for any number of rows where it is
# preferred (float32_linear); below it its ~60 us per call outweighs MKL's slower GEMV
ONEDNN_GEMV_MIN: int = 1 << 20


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, routed as the module docstring says for bf16 weights on the CPU."""
    if weight.device.type != "cpu" or x.device.type != "cpu":
        return F.linear(x, weight, bias)
    if weight.dtype != torch.bfloat16:
        return float32_linear(x, weight, bias) if weight.dtype == torch.float32 else F.linear(x, weight, bias)
    k = weight.shape[-1]
    rows = x.numel() // k if k else 0
    if x.shape[-1] == k and cpu_kernels.inference_rows(x, rows, SMALL_M, weight, bias):
        ext = cpu_kernels.kernels()
        if ext is not None:  # one call: the float32 conversion, bias and output rounding happen in C++
            return ext.linear_bf16w(x, weight, bias)
    if not cpu_kernels.cpu_has_fast_bf16() or x.dtype != torch.bfloat16:  # (F.linear refuses mixed dtypes)
        b = bias.float() if bias is not None else None
        return float32_linear(x.float(), upcast_weight(weight, x), b).to(x.dtype)
    if bias is not None and _onednn_post_op_applies(x, weight, bias):
        # the bias inside oneDNN's GEMM: F.linear's addmm first copies the bias into every output row, a pass
        # over the output (MoonViT's qkv 90 -> 79 ms, wo 29 -> 23 ms per 6,660 patches); bit for bit F.linear's
        # result on a contiguous input (the bias added to the float32 accumulators, one rounding)
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def float32_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` for float32 CPU tensors, through oneDNN's GEMM where :func:`~kimivl.ops.cpu_kernels.
    onednn_float32_preferred` (AMD CPUs) without autograd: for more than ``SMALL_M`` rows, and for fewer (a decode
    step's GEMV) when the weight has at least ``ONEDNN_GEMV_MIN`` elements.

    Why: torch's float32 ``linear`` is MKL's sgemm / sgemv, which run slower code on AMD CPUs than on Intel ones. On
    a Zen 3 (AVX2, 2 threads) oneDNN's float32 GEMM is 1.2-1.35x MKL's at a prefill's 512 rows and 1.7-2.0x at a MoE
    expert's ~48 rows, on a Zen 5 2.2x (performance notes §1.2); for one row it streams a weight from memory at
    1.2-1.5x MKL's rate (1,408-11,264 x 2,048), but costs ~60 us a call, more than MKL's whole product for weights
    of less than ~1M elements (docs/performance.md). Small weights and Intel CPUs keep ``F.linear``."""
    if (x.dtype != torch.float32 or (bias is not None and bias.dtype != torch.float32)
            or (x.numel() // max(weight.shape[-1], 1) <= SMALL_M and weight.numel() < ONEDNN_GEMV_MIN)
            or not cpu_kernels.onednn_float32_preferred() or not _without_autograd(x, weight, bias)):
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


# Weights of at least this many elements are widened into a reused float32 buffer (per thread) rather than a new
# tensor: a fresh allocation above glibc's mmap threshold (32 MB at most) is page-faulted in on every call, 48 ms
# for the dense MLP's 11264 x 2048 against 7 ms into a buffer already mapped (Zen 3, docs/performance.md).
UPCAST_REUSE_MIN: int = 1 << 20
_scratch = threading.local()


def upcast_weight(weight: torch.Tensor, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``weight.float()`` (``* scale``: an int8 weight's per-row scales, float32) for a product with ``x``; without
    autograd through either (which would save the weight for the backward pass), a large weight lands in this
    thread's reused buffer, which the caller must be done with before its next call (the float32 GEMM fallbacks of
    :func:`linear` and :class:`~kimivl.ops.int8_linear.Int8Linear`)."""
    if weight.numel() < UPCAST_REUSE_MIN or not _without_autograd(weight, x):
        return weight.float() if scale is None else weight.float() * scale
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < weight.numel():
        # outside inference mode: a buffer made inside it could not be written outside later
        with torch.inference_mode(False):
            buf = _scratch.buf = torch.empty(weight.numel(), dtype=torch.float32)
    out = buf[:weight.numel()].view(weight.shape)
    # one pass: the int8 values widen exactly, then one float32 product per weight (dequantize_weight's bits)
    return out.copy_(weight) if scale is None else torch.mul(weight, scale, out=out)


def _without_autograd(*tensors: torch.Tensor | None) -> bool:
    """No gradient is recorded through any of ``tensors`` (None entries skipped): the oneDNN calls have no backward,
    and a product that records one keeps its operands for it."""
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state-dict keys) whose forward is :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def gelu_(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU written into ``x`` (a fresh activation) when no gradient is recorded for it, else out of place.

    Saves allocating and touching a second (L, 4304) buffer per layer in inference.
    """
    if x.requires_grad:
        return F.gelu(x, approximate=approximate)
    return torch.ops.aten.gelu_(x, approximate=approximate)


def linear_gelu(layer: nn.Module, x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``gelu(layer(x), approximate)``; for bf16 inference on a CPU whose bf16 GEMM is oneDNN's
    (:func:`~kimivl.ops.cpu_kernels.cpu_has_fast_bf16`), one oneDNN call with GELU as the GEMM's post-op.

    The post-op applies GELU to the float32 accumulators before the bf16 rounding (one rounding instead of two)
    and saves a pass over the (rows, out_features) activation: MoonViT's fc0 for a 6,660-patch batch, 112 ->
    72 ms median on a 2-core Xeon with AMX (docs/performance.md). Anything else - autograd, float32, few rows
    (the decode-step kernel's shape), a wrapped layer (e.g. LoRA) or one with hooks - is ``gelu_(layer(x))``.
    """
    if (type(layer) is Linear and not (layer._forward_hooks or layer._forward_pre_hooks)
            and _onednn_post_op_applies(x, layer.weight, layer.bias)):
        return torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, "gelu", [], approximate)
    return gelu_(layer(x), approximate)


def _onednn_post_op_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if x.device.type != "cpu" or x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16:
        return False
    if bias is not None and bias.dtype != torch.bfloat16:
        return False
    if not _without_autograd(x, weight, bias):
        return False
    if x.numel() // max(weight.shape[-1], 1) <= SMALL_M or not cpu_kernels.cpu_has_fast_bf16():
        return False
    return hasattr(torch.ops.mkldnn, "_linear_pointwise")
