"""1-D MLA RoPE: interleaved-pair formula, norm / relative-position properties, YaRN against formulas."""
from __future__ import annotations

import math

import pytest
import torch

from kimivl.ops.rope import apply_rope, rope_cos_sin, rope_inv_freq, yarn_softmax_scale_factor

THETA = 800000.0
YARN_V3 = {  # the rope_scaling block of DeepSeek-V3's config.json
    "type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
    "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
}


def _rotate(x: torch.Tensor, positions: torch.Tensor, dim: int, theta: float,
            rope_scaling: dict | None = None) -> torch.Tensor:
    cos, sin = rope_cos_sin(positions, dim, theta, rope_scaling)
    return apply_rope(x, cos, sin)


def test_interleaved_pairs_rotate_as_complex_numbers() -> None:
    g = torch.Generator().manual_seed(0)
    b, h, s, d = 2, 3, 7, 8
    x = torch.randn(b, h, s, d, generator=g, dtype=torch.float64)
    pos = torch.randint(0, 1000, (b, s), generator=g)
    out = _rotate(x.float(), pos, d, THETA).double()

    # Pair (2i, 2i+1) is the complex number x[2i] + 1j x[2i+1], turned by pos * theta^(-2i/d).
    z = torch.complex(x[..., 0::2], x[..., 1::2])
    angle = pos[:, None, :, None].double() * THETA ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    rotated = z * torch.polar(torch.ones_like(angle), angle)
    # Output layout is de-interleaved: all real parts (even channels), then all imaginary parts.
    expected = torch.cat((rotated.real, rotated.imag), dim=-1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_position_zero_only_deinterleaves() -> None:
    x = torch.arange(8.0).view(1, 1, 1, 8)
    out = _rotate(x, torch.zeros(1, 1, dtype=torch.long), 8, THETA)
    assert out.flatten().tolist() == [0.0, 2.0, 4.0, 6.0, 1.0, 3.0, 5.0, 7.0]


@pytest.mark.parametrize("rope_scaling", [None, {"type": "yarn", "factor": 8, "mscale": 1.0, "mscale_all_dim": 1.0}])
def test_rotation_preserves_norm(rope_scaling: dict | None) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 9, 16, generator=g)
    pos = torch.randint(0, 50000, (2, 9), generator=g)
    out = _rotate(x, pos, 16, THETA, rope_scaling)
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), atol=1e-4, rtol=1e-5)


def test_scores_depend_only_on_relative_position() -> None:
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 1, 1, 16, generator=g, dtype=torch.float64).float()
    k = torch.randn(1, 1, 1, 16, generator=g, dtype=torch.float64).float()

    def score(m: int, n: int) -> torch.Tensor:
        qm = _rotate(q, torch.tensor([[m]]), 16, 10000.0)
        kn = _rotate(k, torch.tensor([[n]]), 16, 10000.0)
        return (qm * kn).sum()

    for m, n in [(5, 2), (9, 9), (3, 11)]:
        for shift in (1, 17, 300):
            torch.testing.assert_close(score(m + shift, n + shift), score(m, n), atol=2e-5, rtol=1e-5)


def test_cos_sin_tables_match_formula_and_dtype() -> None:
    pos = torch.tensor([[0, 3, 10], [4, 5, 6]])
    cos, sin = rope_cos_sin(pos, 8, THETA, dtype=torch.bfloat16)
    assert cos.shape == sin.shape == (2, 3, 8) and cos.dtype == torch.bfloat16
    inv = THETA ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    ang = pos[..., None].double() * inv
    torch.testing.assert_close(cos.double(), torch.cat((ang.cos(), ang.cos()), -1), atol=1e-2, rtol=0)
    torch.testing.assert_close(sin.double(), torch.cat((ang.sin(), ang.sin()), -1), atol=1e-2, rtol=0)


def _yarn_reference(dim: int, theta: float, p: dict) -> tuple[list[float], float]:
    """YaRN as written in the DeepSeek-V3 paper/config docs, scalar by scalar."""
    factor, orig = p["factor"], p.get("original_max_position_embeddings", 4096)

    def corr_dim(rot: float) -> float:
        return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(theta))

    def mscale(m: float) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    low = max(math.floor(corr_dim(p.get("beta_fast", 32))), 0)
    high = min(math.ceil(corr_dim(p.get("beta_slow", 1))), dim - 1)
    out = []
    for i in range(dim // 2):
        base = theta ** (-2 * i / dim)
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)  # 0: keep frequency, 1: divide by factor
        out.append(base * (1 - ramp) + base / factor * ramp)
    return out, mscale(p.get("mscale", 1)) / mscale(p.get("mscale_all_dim", 0))


@pytest.mark.parametrize("params", [
    YARN_V3,
    {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512},  # mscale_all_dim 0: cos/sin scaled
])
def test_yarn_frequencies_and_magnitude_match_formula(params: dict) -> None:
    dim, theta = 64, 10000.0
    inv_freq, scale = rope_inv_freq(dim, theta, params)
    ref_inv, ref_scale = _yarn_reference(dim, theta, params)
    torch.testing.assert_close(inv_freq.double(), torch.tensor(ref_inv, dtype=torch.float64), atol=0, rtol=1e-6)
    assert scale == pytest.approx(ref_scale, rel=1e-12)
    # the high-frequency pairs are untouched, the lowest one is interpolated by exactly `factor`
    assert inv_freq[0] == 1.0
    assert inv_freq[-1].item() == pytest.approx(theta ** (-(dim - 2) / dim) / params["factor"], rel=1e-6)

    pos = torch.tensor([[0, 1, 4095, 100000]])
    cos, sin = rope_cos_sin(pos, dim, theta, params)
    ang = pos[..., None].double() * torch.tensor(ref_inv, dtype=torch.float64)
    torch.testing.assert_close(cos[..., : dim // 2].double(), ang.cos() * ref_scale, atol=5e-3, rtol=0)
    torch.testing.assert_close(sin[..., dim // 2:].double(), ang.sin() * ref_scale, atol=5e-3, rtol=0)


def test_yarn_softmax_scale_factor() -> None:
    assert yarn_softmax_scale_factor(None) == 1.0
    assert yarn_softmax_scale_factor({"type": "yarn", "factor": 40}) == 1.0  # no mscale_all_dim
    expected = (0.1 * 1.0 * math.log(40) + 1.0) ** 2  # spec §4 item 6
    assert yarn_softmax_scale_factor(YARN_V3) == pytest.approx(expected, rel=1e-12)
    assert rope_inv_freq(64, THETA, None)[1] == 1.0
    assert rope_inv_freq(64, 10000.0, YARN_V3)[1] == pytest.approx(1.0)  # mscale == mscale_all_dim


def test_yarn_matches_transformers() -> None:
    transformers = pytest.importorskip("transformers", reason="transformers is an optional independent reference")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = dict(YARN_V3, rope_type="yarn", rope_theta=10000.0)
    cfg = transformers.DeepseekV3Config(rope_parameters=params, qk_rope_head_dim=64)
    ref_inv, ref_attention_factor = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
    inv_freq, scale = rope_inv_freq(64, 10000.0, YARN_V3)
    torch.testing.assert_close(inv_freq, ref_inv.float(), atol=0, rtol=1e-6)
    assert scale == pytest.approx(ref_attention_factor)


# --- the C++ decode-step kernel (kimivl/ops/csrc/rope.cpp) ------------------------------------------------------
def _pytorch_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, monkeypatch) -> torch.Tensor:
    monkeypatch.setenv("KIMIVL_CPU_KERNELS", "0")
    try:
        return apply_rope(x, cos, sin)
    finally:
        monkeypatch.delenv("KIMIVL_CPU_KERNELS")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 16, 1, 64), (2, 1, 1, 64), (3, 4, 2, 8)])
def test_rope_kernel_equals_the_pytorch_ops_bit_for_bit(cpu_ext, monkeypatch, dtype, shape) -> None:
    b, h, s, d = shape
    g = torch.Generator().manual_seed(d * s + h)
    x = (torch.randn(shape, generator=g) * 4).to(dtype)
    pos = torch.randint(0, 5000, (b, s), generator=g)
    cos, sin = rope_cos_sin(pos, d, 50000.0, dtype=dtype)
    with torch.no_grad():
        fast = apply_rope(x, cos, sin)
    assert torch.equal(fast, cpu_ext.rope_rotate(x, cos, sin))  # the kernel ran
    assert torch.equal(fast, _pytorch_rope(x, cos, sin, monkeypatch))  # same products and sums, same roundings


def test_rope_kernel_applies_only_to_few_rows_without_autograd(cpu_ext, monkeypatch) -> None:
    from kimivl.ops.rope import _kernel_applies

    x = torch.randn(1, 4, 1, 8)
    cos, sin = rope_cos_sin(torch.tensor([[3]]), 8, 10000.0)
    assert _kernel_applies(x, cos, sin)
    assert not _kernel_applies(x.requires_grad_(), cos, sin)  # training keeps the differentiable ops
    many = torch.randn(1, 4, 9, 8)
    cos9, sin9 = rope_cos_sin(torch.arange(9)[None], 8, 10000.0)
    assert not _kernel_applies(many, cos9, sin9)  # a prefill: the vectorised PyTorch ops
    assert not _kernel_applies(x.detach().bfloat16(), cos, sin)  # mixed dtypes


def test_rope_kernel_names_bad_input(cpu_ext) -> None:
    with pytest.raises(RuntimeError, match=r"x \(B, H, S, D\) with D even"):
        cpu_ext.rope_rotate(torch.randn(1, 2, 1, 7), torch.randn(1, 1, 7), torch.randn(1, 1, 7))
    with pytest.raises(RuntimeError, match="share one dtype"):
        cpu_ext.rope_rotate(torch.randn(1, 2, 1, 8), torch.randn(1, 1, 8).bfloat16(), torch.randn(1, 1, 8))
