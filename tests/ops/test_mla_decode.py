"""The fused C++ absorbed-MLA decode step (kimivl/ops/csrc/mla_decode.cpp) against a float64 reference and
against the PyTorch path of kimivl.ops.mla.absorbed_mla_attention."""
from __future__ import annotations

import pytest
import torch

from kimivl.ops import cpu_kernels
from kimivl.ops.mla import absorbed_mla_attention, split_kv_b_weight


@pytest.fixture(scope="module")
def ext(cpu_ext):
    return cpu_ext


def _inputs(b, h, t, nope, rope, r, v, kv_dtype, w_dtype, seed=0, spare_rows=5):
    g = torch.Generator().manual_seed(seed)
    q_nope, q_pe = torch.randn(b, h, nope, generator=g), torch.randn(b, h, rope, generator=g)
    cache = torch.randn(b, t + spare_rows, r + rope, generator=g).to(kv_dtype)  # a view of a longer buffer
    w_uk = (torch.randn(h, nope, r, generator=g) / nope ** 0.5).to(w_dtype)
    w_uv = (torch.randn(h, v, r, generator=g) / r ** 0.5).to(w_dtype)
    return q_nope, q_pe, cache[:, :t], w_uk, w_uv


def _reference(q_nope, q_pe, kv, w_uk, w_uv, scale, valid=None):
    """The absorbed step written out in float64 on the same (rounded) numbers."""
    q_nope, q_pe, kv, w_uk, w_uv = (x.double() for x in (q_nope, q_pe, kv, w_uk, w_uv))
    r = w_uk.shape[-1]
    q = torch.cat([torch.einsum("bhn,hnr->bhr", q_nope, w_uk), q_pe], -1) * scale
    scores = torch.einsum("bhd,btd->bht", q, kv)
    if valid is not None:
        scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    lat = torch.einsum("bht,btr->bhr", scores.softmax(-1), kv[..., :r])
    return torch.einsum("bhr,hvr->bhv", lat, w_uv)


# The real per-head shapes (16 heads: two 8-wide groups), 8 / 24 heads (one group alone, 16 + 8), 4 heads
# (no vector path), latent widths with and without the 16-wide tail, cache lengths around the 128-row chunk
# and the 4-row block.
SHAPES = [(1, 16, 300, 128, 64, 512, 128), (2, 8, 129, 16, 8, 48, 24), (1, 24, 7, 8, 8, 32, 8),
          (3, 4, 37, 32, 16, 64, 32), (1, 16, 1, 8, 4, 20, 6)]


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_float64(ext, shape, kv_dtype, w_dtype):
    q_nope, q_pe, kv, w_uk, w_uv = _inputs(*shape, kv_dtype, w_dtype)
    out = ext.mla_decode(q_nope, q_pe, kv, w_uk, w_uv, 0.125, None)
    assert out.dtype == torch.float32 and out.shape == (shape[0], shape[1], shape[-1])
    torch.testing.assert_close(out.double(), _reference(q_nope, q_pe, kv, w_uk, w_uv, 0.125), rtol=1e-4, atol=1e-5)


def test_bf16_queries_are_computed_in_float32_and_answered_in_bf16(ext):
    q_nope, q_pe, kv, w_uk, w_uv = _inputs(2, 16, 70, 32, 16, 64, 32, torch.float32, torch.bfloat16)
    q_nope, q_pe = q_nope.bfloat16(), q_pe.bfloat16()
    out = ext.mla_decode(q_nope, q_pe, kv, w_uk, w_uv, 0.1, None)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, ext.mla_decode(q_nope.float(), q_pe.float(), kv, w_uk, w_uv, 0.1, None).bfloat16())


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
def test_split_views_of_kv_b_proj_are_read_in_place(ext, w_dtype):
    # The model passes W_UK / W_UV as strided views of kv_b_proj.weight (per head: nope rows, then v rows);
    # the kernel reads them without a copy and must give exactly what contiguous copies give.
    h, nope, v, r = 16, 32, 24, 64
    q_nope, q_pe, kv, _, _ = _inputs(2, h, 150, nope, 16, r, v, torch.float32, w_dtype)
    weight = (torch.randn(h * (nope + v), r, generator=torch.Generator().manual_seed(3)) / r ** 0.5).to(w_dtype)
    w_uk, w_uv = split_kv_b_weight(weight, h, nope, v)
    assert not w_uk.is_contiguous() and not w_uv.is_contiguous()
    out = ext.mla_decode(q_nope, q_pe, kv, w_uk, w_uv, 0.1, None)
    assert torch.equal(out, ext.mla_decode(q_nope, q_pe, kv, w_uk.contiguous(), w_uv.contiguous(), 0.1, None))
    torch.testing.assert_close(out.double(), _reference(q_nope, q_pe, kv, w_uk, w_uv, 0.1), rtol=1e-4, atol=1e-5)
    # rows that are not contiguous themselves (a column slice) are copied, and still right
    wide = torch.randn(h, v, 2 * r, generator=torch.Generator().manual_seed(4)).to(w_dtype)[..., ::2]
    torch.testing.assert_close(ext.mla_decode(q_nope, q_pe, kv, w_uk, wide, 0.1, None).double(),
                               _reference(q_nope, q_pe, kv, w_uk, wide, 0.1), rtol=1e-4, atol=1e-5)


def test_masked_keys_are_ignored_and_a_fully_masked_sequence_gives_zeros(ext):
    q_nope, q_pe, kv, w_uk, w_uv = _inputs(3, 16, 400, 16, 8, 64, 16, torch.bfloat16, torch.float32)
    valid = torch.rand(3, 400, generator=torch.Generator().manual_seed(1)) > 0.5
    valid[1, :300] = False  # whole 128-row chunks without a visible key
    valid[2] = False
    out = ext.mla_decode(q_nope, q_pe, kv, w_uk, w_uv, 0.2, valid)
    want = _reference(q_nope[:2], q_pe[:2], kv[:2], w_uk, w_uv, 0.2, valid[:2])
    torch.testing.assert_close(out[:2].double(), want, rtol=1e-4, atol=1e-5)
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    # changing a masked key's values changes nothing
    kv2 = kv.clone()
    kv2[0, ~valid[0]] = 100.0
    torch.testing.assert_close(ext.mla_decode(q_nope, q_pe, kv2, w_uk, w_uv, 0.2, valid), out, rtol=0, atol=0)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
def test_absorbed_attention_gives_the_same_with_the_kernel_switched_off(ext, monkeypatch, kv_dtype):
    q_nope, q_pe, kv, w_uk, w_uv = _inputs(2, 16, 200, 32, 16, 64, 32, kv_dtype, torch.bfloat16)
    q_nope, q_pe = q_nope[:, :, None].bfloat16(), q_pe[:, :, None].bfloat16()  # (B, H, 1, .) as the model has
    mask = (torch.arange(200) >= torch.tensor([[0], [17]]))[:, None, None, :]  # left padding of row 1
    on = absorbed_mla_attention(q_nope, q_pe, kv, w_uk, w_uv, 0.1, mask)
    direct = ext.mla_decode(q_nope[:, :, 0].float(), q_pe[:, :, 0].float(), kv, w_uk, w_uv, 0.1, mask[:, 0, 0],
                            cpu_kernels.mla_decode_form(ext))
    assert torch.equal(on, direct.bfloat16().view(2, 1, -1))  # the decode step took the kernel
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    off = absorbed_mla_attention(q_nope, q_pe, kv, w_uk, w_uv, 0.1, mask)
    assert on.shape == off.shape == (2, 1, 16 * 32) and on.dtype == off.dtype == torch.bfloat16
    torch.testing.assert_close(on.float(), off.float(), rtol=2e-2, atol=2e-3)  # both rounded to bf16 at the end


def test_autograd_and_several_queries_take_the_pytorch_path(ext):
    q_nope, q_pe, kv, w_uk, w_uv = _inputs(1, 8, 20, 16, 8, 32, 16, torch.float32, torch.float32)
    q = q_nope[:, :, None].clone().requires_grad_()
    absorbed_mla_attention(q, q_pe[:, :, None], kv, w_uk, w_uv, 0.1).sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    two = absorbed_mla_attention(q_nope[:, :, None].expand(1, 8, 2, 16), q_pe[:, :, None].expand(1, 8, 2, 8), kv,
                                 w_uk, w_uv, 0.1)
    one = absorbed_mla_attention(q_nope[:, :, None], q_pe[:, :, None], kv, w_uk, w_uv, 0.1)
    torch.testing.assert_close(two[:, 0], one[:, 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("change, message", [
    (lambda a: {**a, "kv": a["kv"][..., :-1]}, "shapes do not agree"),
    (lambda a: {**a, "q_nope": a["q_nope"].double()}, "queries must both be float32 or both bfloat16, got Double"),
    (lambda a: {**a, "q_nope": a["q_nope"].bfloat16()}, "queries must both be float32 or both bfloat16"),
    (lambda a: {**a, "valid": torch.ones(1, 3, dtype=torch.bool)}, r"valid must be bool \(B, T\) = \(1, 20\)"),
    (lambda a: {**a, "kv": a["kv"].half()}, "cache must be float32 or bfloat16"),
    (lambda a: {**a, "kv": a["kv"].transpose(1, 2)}, "shapes do not agree|rows must be contiguous"),
])
def test_bad_inputs_name_the_problem(ext, change, message):
    q_nope, q_pe, kv, w_uk, w_uv = _inputs(1, 8, 20, 16, 8, 32, 16, torch.float32, torch.float32)
    args = change(dict(q_nope=q_nope, q_pe=q_pe, kv=kv, w_uk=w_uk, w_uv=w_uv, valid=None))
    with pytest.raises(RuntimeError, match=message):
        ext.mla_decode(args["q_nope"], args["q_pe"], args["kv"], args["w_uk"], args["w_uv"], 0.1, args["valid"])


def test_float32_weights_use_the_kernel_only_once_it_is_built(ext, monkeypatch):
    """A float32 model must not pause to compile in the middle of a chat; bf16 weights build it (as their
    linear layers do)."""
    q_nope, q_pe, kv, w_uk, w_uv = _inputs(1, 8, 50, 16, 8, 32, 16, torch.float32, torch.float32)
    q_nope, q_pe = q_nope[:, :, None], q_pe[:, :, None]
    assert cpu_kernels.is_built() and cpu_kernels.kernels(build=False) is ext
    built = absorbed_mla_attention(q_nope, q_pe, kv, w_uk, w_uv, 0.1)
    monkeypatch.setattr(cpu_kernels, "is_built", lambda: False)
    assert cpu_kernels.kernels(build=False) is None and cpu_kernels.kernels() is ext
    not_built = absorbed_mla_attention(q_nope, q_pe, kv, w_uk, w_uv, 0.1)  # the PyTorch products
    torch.testing.assert_close(not_built, built, rtol=1e-5, atol=1e-6)
    assert not torch.equal(not_built, built)  # (different summation order: the two paths really differ)


# --- the bf16 forms (bf16 cache and weights): vdpbf16ps (auto on AVX512-BF16 CPUs without AMX) and AMX tiles ------

def _form_or_skip(ext, form: str) -> int:
    """ext.MLA_VDPBF16 / ext.MLA_AMX, skipping where this build and CPU cannot run it."""
    if not ext.bf16_isa():
        pytest.skip("the bf16 forms need the extension compiled for a CPU with AVX512-BF16 (this one has none)")
    if form == "amx" and ext.bf16_isa() != "amx":
        pytest.skip("the AMX form needs a CPU with AMX that this process may use (this one has AVX512-BF16 only)")
    return ext.MLA_AMX if form == "amx" else ext.MLA_VDPBF16


def _rounded_reference(q_nope, q_pe, kv, w_uk, w_uv, scale, valid=None, chunk=128):
    """The dot form's arithmetic in float64: the scaled latent queries rounded to bf16, per 128-row chunk the
    exps against the chunk's max rounded to bf16 for the weighted latents (their sum unrounded), chunks merged
    as flash-decoding does."""
    q_nope, q_pe, kv, w_uk, w_uv = (x.double() for x in (q_nope, q_pe, kv, w_uk, w_uv))
    r = w_uk.shape[-1]
    q = (torch.cat([torch.einsum("bhn,hnr->bhr", q_nope, w_uk), q_pe], -1) * scale).bfloat16().double()
    scores = torch.einsum("bhd,btd->bht", q, kv)
    if valid is not None:
        scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    parts = []
    for t0 in range(0, kv.shape[1], chunk):
        s = scores[..., t0:t0 + chunk]
        m = s.amax(-1, keepdim=True)
        e = torch.where(torch.isinf(s), 0.0, (s - m.nan_to_num(neginf=0.0)).exp())
        parts.append((m, e.sum(-1, keepdim=True), torch.einsum("bht,btr->bhr", e.bfloat16().double(),
                                                                kv[:, t0:t0 + chunk, :r])))
    mx = torch.stack([m for m, _, _ in parts]).amax(0)
    f = [torch.where(torch.isinf(m), 0.0, (m - mx).exp()) for m, _, _ in parts]
    total = sum(fi * l for fi, (_, l, _) in zip(f, parts))
    lat = sum(fi * a for fi, (_, _, a) in zip(f, parts)) / total
    return torch.einsum("bhr,hvr->bhv", lat, w_uv)


# + the real shapes at 4,096 rows, 32 heads (two 16-lane groups), 5 heads (a partial group), one to three rows;
# rows of r + rope = 96 / 64 (a multiple of 32: the AMX form's tiles; the others fall back to vdpbf16ps there)
DOT_SHAPES = SHAPES + [(1, 16, 4096, 128, 64, 512, 128), (2, 32, 257, 16, 8, 64, 16), (1, 5, 131, 8, 8, 32, 8),
                       (1, 16, 1, 16, 8, 64, 16), (2, 16, 3, 16, 8, 64, 16), (2, 32, 257, 16, 32, 64, 16),
                       (1, 5, 131, 8, 32, 32, 8), (2, 16, 3, 16, 32, 64, 16), (1, 3, 50, 8, 32, 96, 8)]


@pytest.mark.parametrize("form", ["vdpbf16ps", "amx"])
@pytest.mark.parametrize("shape", DOT_SHAPES)
def test_bf16_forms_compute_the_bf16_products_they_describe(ext, monkeypatch, shape, form):
    code = _form_or_skip(ext, form)
    q_nope, q_pe, kv, w_uk, w_uv = _inputs(*shape, torch.bfloat16, torch.bfloat16)
    out = ext.mla_decode(q_nope, q_pe, kv, w_uk, w_uv, 0.125, None, code)
    float32_form = ext.mla_decode(q_nope, q_pe, kv, w_uk, w_uv, 0.125, None, ext.MLA_FLOAT32)
    if shape[-2] % 32:  # a latent width neither bf16 form takes: the float32 form answers
        assert torch.equal(out, float32_form)
        return
    if form == "amx" and (shape[-2] + shape[-3]) % 32:  # rows AMX tiles do not take: the float32 form answers
        assert torch.equal(out, float32_form)
        return
    if shape[2] == 1:  # one key: its probability is exactly 1 in both forms, the answer W_UV c exactly
        assert torch.equal(out, float32_form)
        return
    assert not torch.equal(out, float32_form)  # it ran
    # It does the roundings described: against them written out in float64, what is left (float32 sums, and a
    # float32 exp landing on the other side of a bf16 rounding than float64's: at 4,096 keys a few probabilities
    # move by one bf16 step) is a few % of what the roundings themselves move, on average and at worst.
    exact = _reference(q_nope, q_pe, kv, w_uk, w_uv, 0.125)
    rounded = _rounded_reference(q_nope, q_pe, kv, w_uk, w_uv, 0.125)
    rounding = (rounded - exact).abs()
    left = (out.double() - rounded).abs()
    assert left.mean() < 0.05 * rounding.mean() and left.max() < 0.25 * rounding.max(), (left.max(), rounding.max())
    # Against the exact answer: closer than the PyTorch path's bf16 products, which also round the scores, the
    # weighted latents and the output to bf16 (the official expanded attention rounds as much).
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    torch_bf16 = absorbed_mla_attention(q_nope[:, :, None].bfloat16(), q_pe[:, :, None].bfloat16(), kv, w_uk, w_uv,
                                        0.125)
    err = (out.double() - exact).abs().max().item()
    torch_err = (torch_bf16.view_as(out).double() - exact).abs().max().item()
    assert err <= torch_err, (err, torch_err)


@pytest.mark.parametrize("form", ["vdpbf16ps", "amx"])
def test_bf16_forms_mask_and_take_odd_chunks(ext, form):
    code = _form_or_skip(ext, form)
    q_nope, q_pe, kv, w_uk, w_uv = _inputs(3, 16, 401, 16, 32, 64, 16, torch.bfloat16, torch.bfloat16)
    valid = torch.rand(3, 401, generator=torch.Generator().manual_seed(1)) > 0.5
    valid[1, :300] = False  # whole 128-row chunks without a visible key
    valid[2] = False
    out = ext.mla_decode(q_nope, q_pe, kv, w_uk, w_uv, 0.2, valid, code)
    exact = _reference(q_nope[:2], q_pe[:2], kv[:2], w_uk, w_uv, 0.2, valid[:2])
    rounded = _rounded_reference(q_nope[:2], q_pe[:2], kv[:2], w_uk, w_uv, 0.2, valid[:2])
    assert (out[:2].double() - rounded).abs().max() < 0.25 * (rounded - exact).abs().max()
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    kv2 = kv.clone()
    kv2[0, ~valid[0]] = 100.0  # a masked key's values change nothing, bit for bit
    assert torch.equal(ext.mla_decode(q_nope, q_pe, kv2, w_uk, w_uv, 0.2, valid, code), out)


def test_amx_form_reads_no_row_past_the_cache(ext):
    # The AMX form loads whole tiles of 16 rows: the last rows of a cache whose length is not a multiple of 16 come
    # from a zero-padded copy. Rows just past the view (the longer buffer's spare rows) must not change anything.
    code = _form_or_skip(ext, "amx")
    q_nope, q_pe, _, w_uk, w_uv = _inputs(2, 16, 37, 16, 32, 64, 16, torch.bfloat16, torch.bfloat16)
    buffer = torch.randn(2, 37 + 16, 96, generator=torch.Generator().manual_seed(2)).bfloat16()
    kv = buffer[:, :37]
    out = ext.mla_decode(q_nope, q_pe, kv, w_uk, w_uv, 0.2, None, code)
    buffer[:, 37:] = float("nan")
    assert torch.equal(ext.mla_decode(q_nope, q_pe, kv, w_uk, w_uv, 0.2, None, code), out)
    assert not out.isnan().any()


@pytest.mark.parametrize("form", ["vdpbf16ps", "amx"])
def test_bf16_forms_read_strided_cache_rows_in_place(ext, form):
    # rows of 96 values at a stride of 128 (a column slice of a wider buffer): the same numbers as a dense copy
    code = _form_or_skip(ext, form)
    q_nope, q_pe, _, w_uk, w_uv = _inputs(2, 16, 301, 16, 32, 64, 16, torch.bfloat16, torch.bfloat16)
    wide = torch.randn(2, 301, 128, generator=torch.Generator().manual_seed(3)).bfloat16()
    kv = wide[..., :96]
    assert kv.stride(1) == 128
    out = ext.mla_decode(q_nope, q_pe, kv, w_uk, w_uv, 0.2, None, code)
    assert torch.equal(out, ext.mla_decode(q_nope, q_pe, kv.contiguous(), w_uk, w_uv, 0.2, None, code))
    assert not torch.equal(out, ext.mla_decode(q_nope, q_pe, kv, w_uk, w_uv, 0.2, None, ext.MLA_FLOAT32))


def test_forms_are_checked(ext):
    q_nope, q_pe, kv, w_uk, w_uv = _inputs(1, 4, 10, 8, 8, 32, 8, torch.bfloat16, torch.bfloat16)
    with pytest.raises(RuntimeError, match="form must be 0 .float32., 1 .vdpbf16ps. or 2 .AMX., got 7"):
        ext.mla_decode(q_nope, q_pe, kv, w_uk, w_uv, 0.1, None, 7)
    if ext.bf16_isa() != "amx":
        with pytest.raises(RuntimeError, match="the AMX form asked for, but this build or process cannot use AMX"):
            ext.mla_decode(q_nope, q_pe, kv, w_uk, w_uv, 0.1, None, ext.MLA_AMX)


@pytest.mark.parametrize("kv_dtype, w_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_bf16_forms_are_only_for_a_bf16_cache_with_bf16_weights(ext, kv_dtype, w_dtype):
    q_nope, q_pe, kv, w_uk, w_uv = _inputs(1, 16, 300, 32, 32, 64, 32, kv_dtype, w_dtype)
    float32_form = ext.mla_decode(q_nope, q_pe, kv, w_uk, w_uv, 0.1, None, ext.MLA_FLOAT32)
    forms = [ext.MLA_VDPBF16] + ([ext.MLA_AMX] if ext.bf16_isa() == "amx" else [])
    for form in forms:
        assert torch.equal(ext.mla_decode(q_nope, q_pe, kv, w_uk, w_uv, 0.1, None, form), float32_form)


def test_the_decode_step_takes_amx_then_vdpbf16ps_then_float32(ext, monkeypatch):
    _form_or_skip(ext, "vdpbf16ps")
    q_nope, q_pe, kv, w_uk, w_uv = _inputs(1, 16, 200, 32, 32, 64, 32, torch.bfloat16, torch.bfloat16)
    args = (q_nope[:, :, None].bfloat16(), q_pe[:, :, None].bfloat16(), kv, w_uk, w_uv, 0.1)
    direct = {form: ext.mla_decode(q_nope.bfloat16(), q_pe.bfloat16(), kv, w_uk, w_uv, 0.1, None, form).view(1, 1, -1)
              for form in (ext.MLA_FLOAT32, ext.MLA_VDPBF16)}
    amx = ext.bf16_isa() == "amx"  # the CPU's flags name AMX, and the build and the kernel grant it
    if amx:
        direct[ext.MLA_AMX] = ext.mla_decode(q_nope.bfloat16(), q_pe.bfloat16(), kv, w_uk, w_uv, 0.1, None,
                                             ext.MLA_AMX).view(1, 1, -1)
        float32_out = [ext.mla_decode(q_nope, q_pe, kv, w_uk, w_uv, 0.1, None, form)
                       for form in (ext.MLA_AMX, ext.MLA_VDPBF16)]
        assert not torch.equal(*float32_out)  # the forms really differ (in their sums' order)
    cases = (({"avx512f", "avx512_bf16"}, ext.MLA_VDPBF16),
             ({"avx512_bf16", "amx_bf16"}, ext.MLA_AMX if amx else ext.MLA_FLOAT32), ({"avx2"}, ext.MLA_FLOAT32))
    for flags, form in cases:
        monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert cpu_kernels.mla_decode_form(ext) == form, flags
        with torch.inference_mode():
            assert torch.equal(absorbed_mla_attention(*args), direct[form]), flags
