"""Variable-length (packed, block-diagonal) non-causal attention for the vision tower.

Spec: ``shared/reference/kimivl-spec.md`` §3.3 and §3.7. Official names: ``multihead_attention``
(flash-attn varlen), ``sdpa_attention`` and ``eager_attention`` of ``modeling_kimi_vl.py``.
Backends: ``flash`` (the flash-attn package), ``varlen`` (PyTorch's own flash varlen kernel,
``torch.nn.attention.varlen.varlen_attn``: CUDA, no extra package), ``avx512_bf16`` (kimivl's C++ kernel for
bf16 inference on CPUs with AVX512-BF16, every image and head in one call), ``sdpa`` (one unmasked SDPA per
image) and ``eager`` (float32 reference); ``auto`` takes flash where it applies, avx512_bf16 on CPUs that have
AVX512-BF16 but no AMX, else sdpa.
Deliberate deviations: the official sdpa path builds one dense (L, L) boolean mask and the
official eager path *adds* that mask (+1) instead of masking, so packed images attend to each
other. Here no backend builds an (L, L) tensor and every backend attends strictly per segment.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from kimivl.ops import cpu_kernels

BACKENDS: tuple[str, ...] = ("auto", "flash", "varlen", "avx512_bf16", "sdpa", "eager")


def cu_seqlens_from_lengths(seqlens: torch.Tensor) -> torch.Tensor:
    """Cumulative segment boundaries.

    seqlens: (N,) integer lengths -> (N+1,) int32 ``[0, l0, l0+l1, ...]`` on the same device.
    """
    out = torch.zeros(seqlens.numel() + 1, dtype=torch.int32, device=seqlens.device)
    out[1:] = torch.cumsum(seqlens.reshape(-1), dim=0)
    return out


def cu_seqlens_from_grid(grid_hws: torch.Tensor) -> torch.Tensor:
    """Segments of packed images: grid_hws (N, 2) (h, w) -> (N+1,) int32 ``[0, h0*w0, h0*w0 + h1*w1, ...]``."""
    grid = grid_hws.long()
    return cu_seqlens_from_lengths(grid[:, 0] * grid[:, 1])


def flash_varlen_fn() -> Callable[..., torch.Tensor]:
    """flash-attn's ``flash_attn_varlen_func``; ImportError with the install line where flash-attn is missing."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as e:
        raise ImportError(
            "attention backend 'flash' needs the flash-attn package: pip install 'kimivl[flash]' "
            "(or use backend='sdpa')"
        ) from e
    return flash_attn_varlen_func


def _flash_usable(q: torch.Tensor) -> bool:
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    try:
        flash_varlen_fn()
    except ImportError:
        return False
    return True


def _torch_varlen_fn() -> Callable[..., torch.Tensor] | None:
    """PyTorch's flash varlen attention (``torch.nn.attention.varlen.varlen_attn``, torch >= 2.9), or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _cpu_kernel_problem(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the ``avx512_bf16`` kernel cannot take these tensors, or None when it can (the CPU aside)."""
    if any(t.device.type != "cpu" or t.dtype != torch.bfloat16 for t in (q, k, v)):
        return f"bfloat16 CPU tensors; got q, k, v as {[f'{t.dtype} on {t.device}' for t in (q, k, v)]}"
    if q.shape[-1] % 2 or q.shape[-1] > 128:
        return f"an even head dim of at most 128; got {q.shape[-1]}"
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return "inference (it has no backward); run under torch.no_grad() / inference_mode() or pick 'sdpa'"
    return None


def _cpu_kernel_preferred(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether ``auto`` takes the ``avx512_bf16`` kernel: bf16 inference on a CPU with AVX512-BF16 and without AMX.
    There torch's flash CPU kernel runs at ~1/5 of the bf16 GEMM rate (~100 against ~510 GFLOP/s per core on a
    Zen 5, performance notes §1); on AMX CPUs it runs on AMX tiles through oneDNN, 3x this kernel's rate on the
    Xeon of docs/performance.md, so SDPA stays the choice there. Building the extension on first use (about a
    minute, once) is worth it here: attention is most of a large image's time on such a CPU."""
    if not cpu_kernels.vdpbf16_preferred() or not cpu_kernels.enabled():
        return False
    if _cpu_kernel_problem(q, k, v) is not None:
        return False
    ext = cpu_kernels.kernels()
    return ext is not None and ext.bf16_isa() != ""  # (a compiler without AVX512-BF16 leaves it out)


def resolve_backend(backend: str, q: torch.Tensor, k: torch.Tensor | None = None,
                    v: torch.Tensor | None = None) -> str:
    """``"auto"`` -> ``"flash"`` when flash-attn is importable and q is a CUDA fp16/bf16 tensor, ``"avx512_bf16"``
    for bf16 inference on a CPU with AVX512-BF16 and no AMX (k and v default to q), else ``"sdpa"``.

    ``"varlen"`` is not chosen automatically: on an H100 it and the per-image SDPA calls (which batch runs of
    equal lengths) traded places on the benchmark's mixed 6-image batch, 6.1-7.4 ms against 5.5-7.5 ms over
    four runs (docs/performance.md), and SDPA needs no torch >= 2.9 API."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        if _flash_usable(q):
            return "flash"
        if _cpu_kernel_preferred(q, q if k is None else k, q if v is None else v):
            return "avx512_bf16"
        return "sdpa"
    return backend


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    backend: str = "auto",
    seqlens: Sequence[int] | None = None,
) -> torch.Tensor:
    """Non-causal attention restricted to each segment of a packed sequence.

    q, k, v: (L, H, Dh); cu_seqlens: (N+1,) int32 segment boundaries with ``cu_seqlens[-1] == L``.
    Returns (L, H, Dh) in q's dtype; scale 1/sqrt(Dh). ``seqlens`` are the N segment lengths as
    Python ints when the caller already has them (saves one device->host copy per call).
    """
    if q.ndim != 3 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must all be (L, H, Dh); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    lengths = [int(n) for n in (seqlens if seqlens is not None else torch.diff(cu_seqlens).tolist())]
    if sum(lengths) != q.shape[0] or len(lengths) != cu_seqlens.numel() - 1:
        raise ValueError(f"segments of lengths {lengths} (sum {sum(lengths)}) do not tile the {q.shape[0]} "
                         f"packed tokens / {cu_seqlens.numel() - 1} segments of cu_seqlens")
    chosen = resolve_backend(backend, q, k, v)
    if chosen == "avx512_bf16":
        return _cpu_kernel_attention(q, k, v, lengths)
    if chosen == "flash":
        return _flash_attention(q, k, v, cu_seqlens, max(lengths, default=0))
    if chosen == "varlen":
        return _torch_varlen_attention(q, k, v, cu_seqlens, max(lengths, default=0))
    if chosen == "sdpa":
        return _sdpa_attention(q, k, v, lengths)
    return _eager_attention(q, k, v, lengths)


def _flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int) -> torch.Tensor:
    fn = flash_varlen_fn()
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"attention backend 'flash' needs CUDA float16/bfloat16 tensors; got {q.dtype} on {q.device}")
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    return fn(q, k, v, cu, cu, max_seqlen, max_seqlen, causal=False)


def _torch_varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                            max_seqlen: int) -> torch.Tensor:
    fn = _torch_varlen_fn()
    if fn is None:
        raise ImportError(f"attention backend 'varlen' needs torch >= 2.9 (torch.nn.attention.varlen); this is torch "
                          f"{torch.__version__} (use backend='sdpa')")
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"attention backend 'varlen' needs CUDA float16/bfloat16 tensors; got {q.dtype} on {q.device}")
    if q.shape[0] == 0:
        return q.new_empty(q.shape)
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    # q, k, v may be strided views of one fused qkv tensor; the kernel wants a unit last-dim stride
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return fn(q, k, v, cu, cu, max_seqlen, max_seqlen, scale=q.shape[-1] ** -0.5)


def _cpu_kernel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Every segment and head in one call of the C++ ``attention_bf16`` (:mod:`kimivl.ops.cpu_kernels`); q, k, v
    may be strided views of a fused qkv (rows are read in place). Its numerics are those of a bf16 flash kernel:
    float32 scores and accumulators, the probabilities rounded to bf16 for the product with v."""
    problem = _cpu_kernel_problem(q, k, v)
    if problem is not None:
        raise ValueError(f"attention backend 'avx512_bf16' needs {problem}")
    ext = cpu_kernels.kernels()
    if ext is None or not ext.bf16_isa():
        raise RuntimeError("attention backend 'avx512_bf16' needs kimivl's CPU kernels built for a CPU with "
                           f"AVX512-BF16 (flags here: avx512_bf16={'avx512_bf16' in cpu_kernels.cpu_flags()}, "
                           f"extension built: {ext is not None}); use backend='sdpa'")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return ext.attention_bf16(q, k, v, lengths)


def _sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """SDPA without a mask, one call per image, or per run of consecutive equal-length images.

    On CPU a per-image loop is the right varlen strategy: it does exactly the useful work, while
    one SDPA over a dense block-diagonal (L, L) mask wastes (sum n)^2 / sum n^2 of it and takes
    torch's slower masked path. Segments are strided views of q, k, v (no gather copies, q/k/v
    may be views into a fused qkv tensor); a run of equal lengths (video frames, tiles) becomes
    one (b, H, n, Dh) batch, capped so that b * n^2 <= max_len^2: even if SDPA falls back to its
    math kernel, score memory is bounded by the largest single segment, never by L^2.
    """
    total, heads, dim = q.shape
    if total == 0:
        return q.new_empty(0, heads, dim)
    if len(lengths) == 1:  # one image: no output assembly needed
        return _sdpa_batch(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0))[0].reshape(total, heads, dim)
    max_len = max(lengths)
    out = q.new_empty(total, heads, dim)
    start = 0
    for n, count in _equal_runs(lengths):
        per_call = max(1, (max_len * max_len) // (n * n)) if n else count
        for first in range(0, count, per_call):
            b = min(per_call, count - first)
            rows = slice(start, start + b * n)
            if n:
                o = _sdpa_batch(q[rows].unflatten(0, (b, n)), k[rows].unflatten(0, (b, n)),
                                v[rows].unflatten(0, (b, n)))
                out[rows] = o.flatten(0, 1)
            start += b * n
    return out


def _equal_runs(lengths: Sequence[int]) -> list[tuple[int, int]]:
    """Consecutive runs of equal segment lengths: [12, 12, 5, 12] -> [(12, 2), (5, 1), (12, 1)]."""
    runs: list[tuple[int, int]] = []
    for n in lengths:
        if runs and runs[-1][0] == n:
            runs[-1] = (n, runs[-1][1] + 1)
        else:
            runs.append((n, 1))
    return runs


def _sdpa_batch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, l, H, Dh) -> (B, l, H, Dh) unmasked SDPA (lets torch pick a fused kernel; strided inputs are fine)."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return o.transpose(1, 2)


def _eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Reference: softmax(q k^T / sqrt(Dh)) v per segment, all in float32 (float64 stays float64), cast back."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    compute = torch.promote_types(q.dtype, torch.float32)
    outs = []
    start = 0
    for n in lengths:
        qs, ks, vs = (t[start:start + n].transpose(0, 1).to(compute) for t in (q, k, v))  # (H, n, Dh)
        probs = torch.softmax((qs @ ks.transpose(-2, -1)) * scale, dim=-1)
        outs.append((probs @ vs).transpose(0, 1))
        start += n
    if not outs:
        return torch.empty_like(q)
    return torch.cat(outs, dim=0).to(q.dtype)
