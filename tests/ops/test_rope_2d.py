"""Vision 2-D RoPE: exact channel layout, norm preservation, relative positions, dtype handling."""
from __future__ import annotations

import math

import pytest
import torch

from kimivl.ops.rope_2d import (
    VISION_ROPE_THETA,
    apply_rope_2d,
    rope_2d_cos_sin,
    rope_2d_frequencies,
    rope_2d_rotation,
    rotate_pairs,
)
from kimivl.ops.vision_grid import grid_positions


def _rotate(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    return apply_rope_2d(x, *rope_2d_cos_sin(rows, cols, x.shape[-1]))


def test_frequencies_formula() -> None:
    freqs = rope_2d_frequencies(72)
    assert freqs.shape == (18,) and freqs.dtype == torch.float32
    expected = torch.tensor([VISION_ROPE_THETA ** (-4 * i / 72) for i in range(18)], dtype=torch.float64)
    torch.testing.assert_close(freqs.double(), expected, atol=0, rtol=1e-6)
    with pytest.raises(ValueError, match="divisible by 4, got 6"):
        rope_2d_frequencies(6)


def test_channel_layout_matches_formula() -> None:
    """Pair 2i rotates by col*f_i, pair 2i+1 by row*f_i (width on even pairs), pairs = channels (2j, 2j+1)."""
    dim, theta = 16, VISION_ROPE_THETA
    rows = torch.tensor([0, 3, 5, 2])
    cols = torch.tensor([0, 1, 4, 7])
    x = torch.randn(4, 2, dim, dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    out = _rotate(x, rows, cols)
    expected = torch.empty(4, 2, dim, dtype=torch.float64)
    for n in range(4):
        for j in range(dim // 2):
            f = theta ** (-4 * (j // 2) / dim)
            angle = (cols[n] if j % 2 == 0 else rows[n]).item() * f
            c, s = math.cos(angle), math.sin(angle)
            re, im = x[n, :, 2 * j].double(), x[n, :, 2 * j + 1].double()
            expected[n, :, 2 * j] = re * c - im * s
            expected[n, :, 2 * j + 1] = re * s + im * c
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_matches_complex_multiplication() -> None:
    """Independent check of the real arithmetic against complex numbers (test-only use of complex)."""
    dim = 72
    rows, cols = grid_positions(torch.tensor([[6, 9], [4, 2]]))
    x = torch.randn(rows.numel(), 3, dim, generator=torch.Generator().manual_seed(1))
    freqs = rope_2d_frequencies(dim).double()
    angles = torch.stack([cols.double()[:, None] * freqs, rows.double()[:, None] * freqs], dim=-1).flatten(1)
    rot = torch.polar(torch.ones_like(angles), angles)[:, None, :]
    expected = torch.view_as_real(torch.view_as_complex(x.double().unflatten(-1, (-1, 2))) * rot).flatten(-2)
    torch.testing.assert_close(_rotate(x, rows, cols).double(), expected, atol=2e-5, rtol=1e-5)


def test_norm_preserved_per_pair() -> None:
    rows = torch.randint(0, 511, (50,), generator=torch.Generator().manual_seed(2))
    cols = torch.randint(0, 511, (50,), generator=torch.Generator().manual_seed(3))
    x = torch.randn(50, 4, 32, generator=torch.Generator().manual_seed(4))
    out = _rotate(x, rows, cols)
    torch.testing.assert_close(out.unflatten(-1, (-1, 2)).norm(dim=-1), x.unflatten(-1, (-1, 2)).norm(dim=-1),
                               atol=1e-5, rtol=1e-5)


def test_origin_is_identity() -> None:
    x = torch.randn(3, 2, 8)
    zeros = torch.zeros(3, dtype=torch.long)
    torch.testing.assert_close(_rotate(x, zeros, zeros), x, atol=0, rtol=0)


def test_scores_depend_only_on_relative_position() -> None:
    """<R(p) q, R(p') k> == <R(p + d) q, R(p' + d) k> for any 2-D shift d."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 1, 24, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 1, 24, generator=gen, dtype=torch.float64)

    def score(pq: tuple[int, int], pk: tuple[int, int]) -> torch.Tensor:
        rq = _rotate(q, torch.tensor([pq[0]]), torch.tensor([pq[1]]))
        rk = _rotate(k, torch.tensor([pk[0]]), torch.tensor([pk[1]]))
        return (rq * rk).sum()

    base = score((2, 7), (5, 1))
    for dr, dc in [(0, 3), (4, 0), (11, 9)]:
        torch.testing.assert_close(score((2 + dr, 7 + dc), (5 + dr, 1 + dc)), base, atol=1e-5, rtol=1e-5)
    # Swapping the roles of row and column changes the score: the two axes are distinct.
    assert not torch.allclose(score((7, 2), (1, 5)), base, atol=1e-3)


def test_low_precision_input_is_rotated_in_float32() -> None:
    x = torch.randn(6, 2, 16, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    rows, cols = torch.arange(6) * 40, torch.arange(6) * 70
    out = _rotate(x, rows, cols)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, _rotate(x.float(), rows, cols).to(torch.bfloat16), atol=0, rtol=0)
    cos, sin = rope_2d_cos_sin(rows, cols, 16)
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == (6, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotate_q_and_k_together_from_fused_qkv(dtype: torch.dtype) -> None:
    """rotate_pairs on the strided (L, 2, H, Dh) q/k view of a fused qkv equals rotating q and k one by one."""
    rows, cols = grid_positions(torch.tensor([[3, 5], [2, 2]]))
    qkv = torch.randn(rows.numel(), 3, 4, 72, generator=torch.Generator().manual_seed(7)).to(dtype)
    cos, sin = rope_2d_cos_sin(rows, cols, 72)
    both = rotate_pairs(qkv[:, :2], *rope_2d_rotation(cos, sin))
    assert both.shape == (rows.numel(), 2, 4, 72) and both.dtype == dtype and both.is_contiguous()
    torch.testing.assert_close(both[:, 0], apply_rope_2d(qkv[:, 0].contiguous(), cos, sin), atol=0, rtol=0)
    torch.testing.assert_close(both[:, 1], apply_rope_2d(qkv[:, 1].contiguous(), cos, sin), atol=0, rtol=0)


def test_rotation_factors_layout() -> None:
    cos, sin = torch.tensor([[0.1, 0.2]]), torch.tensor([[0.3, 0.4]])
    rot_cos, rot_sin = rope_2d_rotation(cos, sin)
    assert rot_cos.tolist() == [[pytest.approx(0.1), pytest.approx(0.1), pytest.approx(0.2), pytest.approx(0.2)]]
    assert rot_sin.tolist() == [[pytest.approx(-0.3), pytest.approx(0.3), pytest.approx(-0.4), pytest.approx(0.4)]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_kernel_is_bit_identical_to_the_pytorch_form(cpu_ext, monkeypatch, dtype: torch.dtype) -> None:
    """The one-pass C++ rotation (inference on the CPU) gives the PyTorch form's numbers bit for bit, on the
    strided q/k view of a fused qkv and on a plain (L, H, Dh) tensor; autograd keeps the PyTorch form."""
    from kimivl.ops import cpu_kernels

    rows, cols = grid_positions(torch.tensor([[9, 7], [4, 6], [1, 1]]))
    qkv = (torch.randn(rows.numel(), 3, 5, 72, generator=torch.Generator().manual_seed(8)) * 30).to(dtype)
    rot = rope_2d_rotation(*rope_2d_cos_sin(rows * 37, cols * 53, 72))  # large angles: every rounding matters
    fused = {name: rotate_pairs(x, *rot) for name, x in (("qk", qkv[:, :2]), ("q", qkv[:, 0]))}
    direct = cpu_ext.rope_pairs(qkv[:, :2].flatten(1, 2), *rot)
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    assert cpu_kernels.kernels() is None
    for name, x in (("qk", qkv[:, :2]), ("q", qkv[:, 0])):
        reference = rotate_pairs(x, *rot)
        assert fused[name].shape == reference.shape and fused[name].is_contiguous()
        torch.testing.assert_close(fused[name], reference, atol=0, rtol=0)
    torch.testing.assert_close(direct.view(-1, 2, 5, 72), rotate_pairs(qkv[:, :2], *rot), atol=0, rtol=0)
    monkeypatch.delenv(cpu_kernels.ENV_SWITCH)
    x = qkv[:, 0].float().requires_grad_()
    rotate_pairs(x, *rot).sum().backward()  # the PyTorch form, differentiable
    assert x.grad is not None and x.grad.shape == x.shape


def test_cpu_kernel_names_bad_shapes(cpu_ext) -> None:
    rot = torch.zeros(4, 8), torch.zeros(4, 8)
    with pytest.raises(RuntimeError, match=r"rot_cos / rot_sin must be \(4, 6\)"):
        cpu_ext.rope_pairs(torch.zeros(4, 2, 6), *rot)
    with pytest.raises(RuntimeError, match="D even"):
        cpu_ext.rope_pairs(torch.zeros(4, 2, 7), torch.zeros(4, 7), torch.zeros(4, 7))
