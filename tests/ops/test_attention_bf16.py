"""The C++ ``attention_bf16`` kernel (backend ``avx512_bf16``): parity with a float64 reference at the accuracy of
torch's own bf16 SDPA, segment isolation, strided inputs, when ``auto`` picks it, and its error messages."""
from __future__ import annotations

import math
import types

import pytest
import torch

from kimivl.ops import cpu_kernels
from kimivl.ops.attention import cu_seqlens_from_lengths, resolve_backend, varlen_attention


def _kernel_or_skip() -> None:
    if "avx512_bf16" not in cpu_kernels.cpu_flags():
        pytest.skip("the attention_bf16 kernel needs a CPU with AVX512-BF16 (this one has none)")
    ext = cpu_kernels.kernels()
    if ext is None or not ext.bf16_isa():
        pytest.skip("kimivl's CPU kernels are not built here (no compiler, or KIMIVL_CPU_KERNELS=0)")


def _fused_qkv(seqlens: list[int], heads: int, dim: int, seed: int = 0,
               q_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as strided views of one (L, 3, H, D) bf16 tensor, as the vision tower hands them over."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(sum(seqlens), 3, heads, dim, generator=gen)
    qkv[:, 0] *= q_scale
    qkv = qkv.bfloat16()
    return qkv[:, 0], qkv[:, 1], qkv[:, 2]


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
    """float64 softmax(q k^T / sqrt(D)) v per segment, from the bf16 inputs."""
    outs, start = [], 0
    for n in seqlens:
        qs, ks, vs = (t[start:start + n].transpose(0, 1).double() for t in (q, k, v))
        probs = torch.softmax(qs @ ks.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        outs.append((probs @ vs).transpose(0, 1))
        start += n
    return torch.cat(outs)


def _kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return varlen_attention(q, k, v, cu_seqlens_from_lengths(torch.tensor(seqlens)), backend="avx512_bf16",
                                seqlens=seqlens)


# Segment lengths around the kernel's blocks: 6 / 4 query rows per register block, 48 queries per block, 64 keys
# per packed block, 512 keys per softmax step (so 1,100 takes three steps, the last one partial).
SEGMENTS = [[1], [4, 0, 7, 65], [48, 49, 64], [257, 3], [1100]]


@pytest.mark.parametrize("dim", [72, 64, 2, 80, 96, 128])
@pytest.mark.parametrize("seqlens", SEGMENTS, ids=lambda s: "-".join(map(str, s)))
def test_matches_reference_as_closely_as_torch_bf16_sdpa(dim: int, seqlens: list[int]) -> None:
    _kernel_or_skip()
    q, k, v = _fused_qkv(seqlens, heads=3, dim=dim)
    out = _kernel(q, k, v, seqlens)
    assert out.shape == q.shape and out.dtype == torch.bfloat16 and out.is_contiguous()
    ref = _reference(q, k, v, seqlens)
    with torch.inference_mode():
        sdpa = varlen_attention(q, k, v, cu_seqlens_from_lengths(torch.tensor(seqlens)), backend="sdpa")
    err, sdpa_err = (out.double() - ref).abs().max().item(), (sdpa.double() - ref).abs().max().item()
    # bf16 output rounding (|o| < ~2: 2^-8 at most) and the probabilities rounded to bf16, as torch's kernel does
    assert err <= 1.25 * sdpa_err + 2e-3, f"max error {err:.3g} against torch's bf16 SDPA's {sdpa_err:.3g}"
    torch.testing.assert_close(out.double(), ref, atol=1.6e-2, rtol=1e-2)


def test_large_scores_stay_finite_and_exact() -> None:
    """Scores up to ~±400: the online softmax's running max keeps every exp in range (no inf, no NaN)."""
    _kernel_or_skip()
    seqlens = [700, 33]
    q, k, v = _fused_qkv(seqlens, heads=2, dim=72, seed=3, q_scale=30.0)
    out = _kernel(q, k, v, seqlens)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), _reference(q, k, v, seqlens), atol=3e-2, rtol=2e-2)


def test_uniformly_negative_scores_ignore_the_padded_keys() -> None:
    """Every score ~-424 (k = -q; exp(-424) is 0 in float32): the packed blocks' padding keys score 0, and
    letting them into the running max would underflow every exp to 0 (0/0 rows). The answer is each segment's
    mean v."""
    _kernel_or_skip()
    seqlens = [70, 5]  # both end inside a block of 64 keys
    gen = torch.Generator().manual_seed(4)
    u = torch.randn(1, 2, 72, generator=gen)
    u = 60 * u / u.norm(dim=-1, keepdim=True)
    q = u.expand(75, 2, 72).bfloat16()
    k = (-u).expand(75, 2, 72).bfloat16()
    v = torch.randn(75, 2, 72, generator=gen).bfloat16()
    out = _kernel(q.contiguous(), k.contiguous(), v, seqlens)
    mean = torch.cat([v[:70].double().mean(0, keepdim=True).expand(70, 2, 72),
                      v[70:].double().mean(0, keepdim=True).expand(5, 2, 72)])
    torch.testing.assert_close(out.double(), mean, atol=1e-2, rtol=1e-2)


def test_strided_views_equal_contiguous_copies_and_segments_are_isolated() -> None:
    _kernel_or_skip()
    seqlens = [90, 300, 17]
    q, k, v = _fused_qkv(seqlens, heads=4, dim=72, seed=1)
    out = _kernel(q, k, v, seqlens)
    assert torch.equal(out, _kernel(q.contiguous(), k.contiguous(), v.contiguous(), seqlens))
    # another segment's keys and values changed: this segment's rows are bit-identical
    k2, v2 = k.clone(), v.clone()
    k2[90:390] += 1
    v2[90:390] *= -1
    out2 = _kernel(q, k2, v2, seqlens)
    assert torch.equal(out2[:90], out[:90]) and torch.equal(out2[390:], out[390:])
    assert not torch.equal(out2[90:390], out[90:390])
    # each segment alone gives the same rows as the packed call
    start = 0
    for n in seqlens:
        rows = slice(start, start + n)
        assert torch.equal(_kernel(q[rows], k[rows], v[rows], [n]), out[rows])
        start += n


def test_empty_input() -> None:
    _kernel_or_skip()
    q, k, v = _fused_qkv([0], heads=2, dim=72)
    assert _kernel(q, k, v, [0]).shape == (0, 2, 72)


def test_auto_takes_the_kernel_only_without_amx(monkeypatch: pytest.MonkeyPatch) -> None:
    _kernel_or_skip()
    q, k, v = _fused_qkv([20], heads=2, dim=72)
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))  # a Zen 4 / 5
    with torch.inference_mode():
        assert resolve_backend("auto", q, k, v) == "avx512_bf16"
        assert resolve_backend("auto", q.float(), k.float(), v.float()) == "sdpa"  # float32: torch's kernels
        assert resolve_backend("auto", q[..., :70].contiguous()) == "avx512_bf16"
    q_grad = q.detach().clone().requires_grad_()
    assert resolve_backend("auto", q_grad, k, v) == "sdpa"  # training: the kernel has no backward
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    with torch.inference_mode():
        assert resolve_backend("auto", q, k, v) == "sdpa"
    monkeypatch.delenv(cpu_kernels.ENV_SWITCH)
    built = cpu_kernels.kernels()
    with monkeypatch.context() as m:  # an extension whose compiler left the AVX512-BF16 code out
        m.setattr(cpu_kernels, "kernels", lambda build=True: types.SimpleNamespace(
            bf16_isa=lambda: "", attention_bf16=built.attention_bf16))
        with torch.inference_mode():
            assert resolve_backend("auto", q, k, v) == "sdpa"
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: frozenset({"avx512_bf16", "amx_bf16"}))  # a Xeon
    with torch.inference_mode():
        assert resolve_backend("auto", q, k, v) == "sdpa"


def test_forced_backend_names_what_it_needs() -> None:
    _kernel_or_skip()
    q, k, v = _fused_qkv([10, 6], heads=2, dim=72)
    cu = cu_seqlens_from_lengths(torch.tensor([10, 6]))
    with pytest.raises(ValueError, match=r"'avx512_bf16' needs inference"):
        varlen_attention(q.detach().clone().requires_grad_(), k, v, cu, backend="avx512_bf16")
    with torch.inference_mode():
        with pytest.raises(ValueError, match=r"needs bfloat16 CPU tensors; got .*torch.float32"):
            varlen_attention(q.float(), k.float(), v.float(), cu, backend="avx512_bf16")
        qo, ko, vo = _fused_qkv([10, 6], heads=2, dim=7)
        with pytest.raises(ValueError, match=r"an even head dim of at most 128; got 7"):
            varlen_attention(qo, ko, vo, cu, backend="avx512_bf16")


def test_kernel_checks_its_arguments() -> None:
    _kernel_or_skip()
    ext = cpu_kernels.kernels()
    q, k, v = _fused_qkv([10, 6], heads=2, dim=72)
    with pytest.raises(RuntimeError, match=r"segments of 15 tokens in all for 16 packed tokens"):
        ext.attention_bf16(q, k, v, [10, 5])
    with pytest.raises(RuntimeError, match=r"head dim 130 is not even and at most 128"):
        big = torch.zeros(4, 1, 130, dtype=torch.bfloat16)
        ext.attention_bf16(big, big, big, [4])
    with pytest.raises(RuntimeError, match=r"must be bfloat16 \(L, H, D\) CPU tensors of one shape"):
        ext.attention_bf16(q, k[:15], v, [16])
