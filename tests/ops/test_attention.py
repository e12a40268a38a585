"""varlen_attention: backends agree, segments are isolated, no (L, L) tensor is ever built."""
from __future__ import annotations

import importlib.util
import math
import sys
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from kimivl.ops.attention import cu_seqlens_from_lengths, resolve_backend, varlen_attention
from tensor_recorder import TensorRecorder

# Packed multi-image layout with repeated lengths (exercises the equal-length batching) and a
# lone odd length.
SEQLENS = [12, 5, 12, 30, 5, 12]


def _qkv(seqlens: list[int], heads: int = 3, dim: int = 16, dtype: torch.dtype = torch.float32,
         seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    total = sum(seqlens)
    q, k, v = (torch.randn(total, heads, dim, generator=gen).to(dtype) for _ in range(3))
    return q, k, v, cu_seqlens_from_lengths(torch.tensor(seqlens))


def _dense_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
    """Test-only float64 reference with an explicit block-diagonal mask (fine at this size)."""
    seg = torch.repeat_interleave(torch.arange(len(seqlens)), torch.tensor(seqlens))
    mask = seg[:, None] == seg[None, :]
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) / math.sqrt(q.shape[-1])
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v.double())


def test_cu_seqlens_from_lengths() -> None:
    cu = cu_seqlens_from_lengths(torch.tensor([3, 4, 1]))
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 3, 7, 8]
    assert cu_seqlens_from_lengths(torch.tensor([], dtype=torch.long)).tolist() == [0]


@pytest.mark.parametrize("backend", ["sdpa", "eager", "auto"])
def test_matches_masked_reference(backend: str) -> None:
    q, k, v, cu = _qkv(SEQLENS)
    out = varlen_attention(q, k, v, cu, backend=backend)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), _dense_reference(q, k, v, SEQLENS), atol=1e-5, rtol=1e-5)


def test_sdpa_equals_eager_packed() -> None:
    q, k, v, cu = _qkv(SEQLENS, seed=1)
    torch.testing.assert_close(varlen_attention(q, k, v, cu, backend="sdpa"),
                               varlen_attention(q, k, v, cu, backend="eager"), atol=1e-5, rtol=1e-5)


def test_sdpa_equals_eager_bfloat16() -> None:
    q, k, v, cu = _qkv(SEQLENS, dtype=torch.bfloat16, seed=2)
    sdpa = varlen_attention(q, k, v, cu, backend="sdpa")
    eager = varlen_attention(q, k, v, cu, backend="eager")
    assert sdpa.dtype == eager.dtype == torch.bfloat16
    torch.testing.assert_close(sdpa.float(), eager.float(), atol=2e-2, rtol=2e-2)  # bf16 rounding


def test_seqlens_argument_matches_derived() -> None:
    q, k, v, cu = _qkv(SEQLENS)
    torch.testing.assert_close(varlen_attention(q, k, v, cu, backend="sdpa", seqlens=SEQLENS),
                               varlen_attention(q, k, v, cu, backend="sdpa"), atol=0, rtol=0)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_block_isolation(backend: str) -> None:
    """Perturbing segment j changes nothing outside segment j."""
    q, k, v, cu = _qkv(SEQLENS, seed=3)
    base = varlen_attention(q, k, v, cu, backend=backend)
    bounds = cu.tolist()
    j = 3
    lo, hi = bounds[j], bounds[j + 1]
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[lo:hi] += 5.0 * torch.randn_like(t[lo:hi])
    out = varlen_attention(q2, k2, v2, cu, backend=backend)
    outside = torch.ones(q.shape[0], dtype=torch.bool)
    outside[lo:hi] = False
    torch.testing.assert_close(out[outside], base[outside], atol=1e-6, rtol=0)
    assert (out[lo:hi] - base[lo:hi]).abs().max() > 1e-2


def test_gradients_match_eager() -> None:
    q, k, v, cu = _qkv(SEQLENS, seed=4)
    weight = torch.randn_like(q)
    grads = []
    for backend in ("sdpa", "eager"):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        (varlen_attention(*leaves, cu, backend=backend) * weight).sum().backward()
        grads.append([t.grad for t in leaves])
    for g_sdpa, g_eager in zip(*grads):
        torch.testing.assert_close(g_sdpa, g_eager, atol=1e-5, rtol=1e-5)


def test_empty_and_single_segment() -> None:
    q, k, v, cu = _qkv([0])
    assert varlen_attention(q, k, v, cu, backend="sdpa").shape == (0, 3, 16)
    q, k, v, cu = _qkv([7])
    torch.testing.assert_close(varlen_attention(q, k, v, cu, backend="sdpa").double(),
                               _dense_reference(q, k, v, [7]), atol=1e-5, rtol=1e-5)


def test_auto_on_cpu_is_sdpa() -> None:
    q, _, _, _ = _qkv([4])
    assert resolve_backend("auto", q) == "sdpa"


def test_unknown_backend_and_bad_segments() -> None:
    q, k, v, cu = _qkv(SEQLENS)
    with pytest.raises(ValueError, match="unknown attention backend 'xformers'"):
        varlen_attention(q, k, v, cu, backend="xformers")
    with pytest.raises(ValueError, match=r"sum 75\) do not tile the 76"):
        varlen_attention(q, k, v, cu_seqlens_from_lengths(torch.tensor([*SEQLENS[:-1], 11])), backend="sdpa")


def test_forced_flash_without_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # makes `import flash_attn` raise ImportError
    q, k, v, cu = _qkv([4, 4])
    with pytest.raises(ImportError, match=r"kimivl\[flash\]"):
        varlen_attention(q, k, v, cu, backend="flash")
    assert resolve_backend("auto", q) == "sdpa"


def test_flash_matches_sdpa_and_eager() -> None:
    pytest.importorskip("flash_attn", reason="flash-attn not installed (the `flash` extra)")
    if not torch.cuda.is_available():
        pytest.skip("flash-attn needs a CUDA device")
    q, k, v, cu = (t.cuda() for t in _qkv(SEQLENS, dtype=torch.bfloat16, seed=5))
    flash = varlen_attention(q, k, v, cu, backend="flash").float()
    torch.testing.assert_close(flash, varlen_attention(q, k, v, cu, backend="sdpa").float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(flash, varlen_attention(q, k, v, cu, backend="eager").float(), atol=2e-2, rtol=2e-2)


class _OpRecorder(TorchDispatchMode):
    """Records the name of every aten op run while active."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_memory_scales_with_largest_segment(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Many small images: nothing of size ~L^2 appears, and SDPA never receives a mask."""
    seqlens = [16] * 15 + [24]  # L = 264, largest segment 24
    heads, dim = 2, 8
    q, k, v, cu = _qkv(seqlens, heads=heads, dim=dim)
    total, largest = sum(seqlens), max(seqlens)

    sdpa_calls: list[tuple[tuple[int, ...], tuple[int, ...], bool]] = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        has_mask = (len(args) > 0 and args[0] is not None) or kwargs.get("attn_mask") is not None
        sdpa_calls.append((tuple(query.shape), tuple(key.shape), has_mask))
        return real_sdpa(query, key, value, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    recorder = TensorRecorder()
    with recorder:
        varlen_attention(q, k, v, cu, backend=backend)

    # The largest legitimate tensors are the packed q/k/v/out themselves (L*H*Dh = 4224 << L^2 = 69696).
    assert recorder.max_numel <= total * heads * dim
    assert not any(s[-2:] == (total, total) for s in recorder.shapes)
    if backend == "sdpa":
        assert sdpa_calls, "the sdpa backend did not call torch SDPA"
        for q_shape, k_shape, has_mask in sdpa_calls:
            assert not has_mask
            batch, _, q_len, _ = q_shape
            # Score memory per call is bounded by the largest segment's, never by L^2.
            assert batch * q_len * k_shape[-2] <= largest * largest


def test_equal_length_runs_are_strided_views_not_gathers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Consecutive equal lengths share one SDPA call (no index/gather copies); q, k, v may be strided views."""
    seqlens = [4, 4, 4, 12, 4, 4]
    fused = torch.randn(sum(seqlens), 3, 2, 8, generator=torch.Generator().manual_seed(6))
    q, k, v = fused.unbind(1)  # strided views of one fused tensor, as the vision tower passes them
    cu = cu_seqlens_from_lengths(torch.tensor(seqlens))
    batches: list[int] = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(query: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        batches.append(query.shape[0])
        return real_sdpa(query, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    ops = _OpRecorder()
    with ops:
        out = varlen_attention(q, k, v, cu, backend="sdpa")
    assert batches == [3, 1, 2]  # runs (4 x 3), (12 x 1), (4 x 2)
    assert not [name for name in ops.names if "index" in name or "gather" in name], ops.names
    torch.testing.assert_close(out.double(), _dense_reference(q, k, v, seqlens), atol=1e-5, rtol=1e-5)
    assert out.is_contiguous()


def test_torch_varlen_matches_sdpa_and_eager() -> None:
    """PyTorch's own flash varlen kernel (the 'varlen' backend, no extra package) on the same packed input."""
    if not torch.cuda.is_available():
        pytest.skip("the varlen backend needs a CUDA device")
    pytest.importorskip("torch.nn.attention.varlen", reason=f"torch {torch.__version__} has no varlen_attn")
    q, k, v, cu = (t.cuda() for t in _qkv(SEQLENS, dtype=torch.bfloat16, seed=6))
    got = varlen_attention(q, k, v, cu, backend="varlen").float()
    torch.testing.assert_close(got, varlen_attention(q, k, v, cu, backend="eager").float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got, varlen_attention(q, k, v, cu, backend="sdpa").float(), atol=2e-2, rtol=2e-2)
    if importlib.util.find_spec("flash_attn") is None:
        assert resolve_backend("auto", q) == "sdpa"  # measured faster on the benchmark batch


def test_varlen_backend_names_what_it_needs() -> None:
    q, k, v, cu = _qkv([4, 4])  # CPU float32
    with pytest.raises((ValueError, ImportError), match=r"varlen"):
        varlen_attention(q, k, v, cu, backend="varlen")
    assert resolve_backend("auto", q) == "sdpa"
