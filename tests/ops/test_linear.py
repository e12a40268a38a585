"""kimivl.ops.linear: bf16-weight linear layers on the CPU (C++ streaming kernel, float32 upcast) vs F.linear."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kimivl.ops import cpu_kernels
from kimivl.ops import linear as linear_module
from kimivl.ops.linear import (ONEDNN_GEMV_MIN, SMALL_M, Linear, _onednn_post_op_applies, float32_linear, gelu_,
                              linear, linear_gelu)


@pytest.fixture(scope="module")
def ext(cpu_ext):
    return cpu_ext


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    y = x.double() @ w.double().T
    return y + b.double() if b is not None else y


# Rows 1-8 (every register-blocking case), K with and without a tail of the 16-wide loop, N not a multiple of 4.
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("n,k", [(7, 16), (130, 37), (64, 2048), (2050, 300)])
def test_kernel_matches_float64_on_the_bf16_weights(ext, m, n, k):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g).bfloat16()
    x_before = x.clone()
    y = ext.linear_bf16w(x, w)
    assert torch.equal(x, x_before)  # the AVX-512 path reorders a copy of x's columns, never x itself
    assert y.dtype == torch.float32 and y.shape == (m, n)
    ref = _reference(x, w)
    # float32 accumulation of k products: relative error ~ sqrt(k) * 2^-24 of the row norms
    bound = 1e-6 * k ** 0.5 * (x.double().norm(dim=1, keepdim=True) * w.double().norm(dim=1)).clamp_min(1)
    assert ((y.double() - ref).abs() <= bound).all()


@pytest.mark.parametrize("bias", [False, True])
def test_kernel_takes_bf16_activations_of_any_shape_and_answers_in_their_dtype(ext, bias):
    # One call does what the Python route did around it: convert to float32, add the bias in float32, round.
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 96, generator=g).bfloat16()
    w = torch.randn(40, 96, generator=g).bfloat16()
    b = torch.randn(40, generator=g).bfloat16() if bias else None
    y = ext.linear_bf16w(x, w, b)
    want = ext.linear_bf16w(x.reshape(6, 96).float(), w)
    if b is not None:
        want = want + b.float()
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, 40)
    assert torch.equal(y, want.bfloat16().view(2, 3, 40))


def test_kernel_rejects_bad_input_with_the_shapes(ext):
    w = torch.randn(4, 8).bfloat16()
    with pytest.raises(RuntimeError, match="x has 9 features, w expects 8"):
        ext.linear_bf16w(torch.randn(2, 9), w)
    with pytest.raises(RuntimeError, match="w must be bfloat16"):
        ext.linear_bf16w(torch.randn(2, 8), w.float())
    with pytest.raises(RuntimeError, match=r"bias must be \(4\), got \[5\]"):
        ext.linear_bf16w(torch.randn(2, 8), w, torch.randn(5))


@pytest.mark.parametrize("rows", [1, SMALL_M, SMALL_M + 1, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_with_bf16_weights_equals_float32_maths_on_them(rows, bias):
    """Both routes (kernel for few rows, upcast GEMM for many) compute in float32 on the bf16 weights."""
    g = torch.Generator().manual_seed(rows)
    # (1, rows, 96): <= SMALL_M rows take the kernel; (2, rows, 96) above it takes the upcast GEMM
    x = torch.randn(1 if rows <= SMALL_M else 2, rows, 96, generator=g)
    w = torch.randn(40, 96, generator=g).bfloat16()
    b = torch.randn(40, generator=g).bfloat16() if bias else None
    with torch.no_grad():
        y = linear(x, w, b)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], 40)
    ref = _reference(x.reshape(-1, 96), w, b).view(*x.shape[:-1], 40)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_bf16_activations_come_back_in_bf16_and_close_to_float32():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 256, generator=g).bfloat16()
    w = torch.randn(128, 256, generator=g).bfloat16()
    with torch.no_grad():
        y = linear(x, w)
    assert y.dtype == torch.bfloat16
    ref = _reference(x.reshape(-1, 256), w).view(1, 3, 128)
    assert ((y.double() - ref).norm() / ref.norm()).item() < 4e-3  # one bf16 rounding of the output


def test_float32_weights_are_plain_f_linear_bit_for_bit(monkeypatch):
    """On Intel CPUs (and wherever oneDNN is not preferred), and for few rows of a small weight anywhere: torch's
    own float32 GEMM."""
    x, w, b = torch.randn(3, 5, 16), torch.randn(8, 16), torch.randn(8)
    monkeypatch.setattr(cpu_kernels, "onednn_float32_preferred", lambda: False)
    assert torch.equal(linear(x, w, b), F.linear(x, w, b))
    one, big = torch.randn(1, 256), torch.randn(ONEDNN_GEMV_MIN // 256, 256)
    assert torch.equal(linear(one, big), F.linear(one, big))
    monkeypatch.setattr(cpu_kernels, "onednn_float32_preferred", lambda: True)
    few = x[:1, :SMALL_M]
    assert torch.equal(linear(few, w, b), F.linear(few, w, b))


def test_a_large_float32_weight_takes_onednn_for_one_row_where_preferred(monkeypatch):
    """A decode step's GEMV of a large float32 weight: oneDNN on AMD CPUs (MKL's sgemv streams slower there), the
    same numbers as F.linear to float32 rounding; one weight row less and it is F.linear's, bit for bit."""
    monkeypatch.setattr(cpu_kernels, "onednn_float32_preferred", lambda: True)
    calls = _count_onednn_calls(monkeypatch)
    g = torch.Generator().manual_seed(5)
    x, w, b = torch.randn(1, 256, generator=g), torch.randn(ONEDNN_GEMV_MIN // 256, 256, generator=g), None
    with torch.inference_mode():
        y = linear(x, w, b)
        assert calls == ["none"]
        torch.testing.assert_close(y.double(), _reference(x, w, b), rtol=1e-5, atol=1e-4)
        small = w[1:].contiguous()
        assert torch.equal(linear(x, small), F.linear(x, small)) and calls == ["none"]
    linear(x.requires_grad_(), w)  # autograd: F.linear
    assert calls == ["none"]


def _count_onednn_calls(monkeypatch) -> list[str]:
    calls: list[str] = []
    pointwise = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(a[3]) or pointwise(*a))
    return calls


@pytest.mark.parametrize("bias", [False, True])
def test_float32_gemms_go_to_onednn_where_preferred_and_agree_with_f_linear(monkeypatch, bias):
    monkeypatch.setattr(cpu_kernels, "onednn_float32_preferred", lambda: True)
    calls = _count_onednn_calls(monkeypatch)
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(2, 37, 200, generator=g), torch.randn(130, 200, generator=g)
    b = torch.randn(130, generator=g) if bias else None
    with torch.inference_mode():
        y = linear(x, w, b)
    assert calls == ["none"] and y.shape == (2, 37, 130) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), _reference(x.reshape(-1, 200), w, b).view(2, 37, 130),
                               rtol=1e-5, atol=1e-4)
    with torch.inference_mode():  # a strided input: the same numbers as its contiguous copy
        assert torch.equal(linear(x.transpose(0, 1), w, b), linear(x.transpose(0, 1).contiguous(), w, b))
    del calls[1:]
    # bf16 weights with float32 activations: the upcast product takes the same route
    with torch.no_grad():
        yb = linear(x, w.bfloat16(), b)
    assert len(calls) == 2
    torch.testing.assert_close(yb.double(), _reference(x.reshape(-1, 200), w.bfloat16(), b).view(2, 37, 130),
                               rtol=1e-5, atol=1e-4)
    # autograd (oneDNN's call has no backward): F.linear, and the gradients are right
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    linear(xg, wg, b).sum().backward()
    assert len(calls) == 2
    torch.testing.assert_close(xg.grad, w.sum(0).expand_as(x))
    torch.testing.assert_close(wg.grad, x.reshape(-1, 200).sum(0).expand_as(w))


@pytest.mark.parametrize("vendor,preferred", [("AuthenticAMD", True), ("GenuineIntel", False), ("", False)])
def test_onednn_float32_is_preferred_on_amd_cpus_only(monkeypatch, vendor, preferred):
    monkeypatch.setattr(cpu_kernels, "_cpuinfo_vendor", lambda: vendor)
    cpu_kernels.onednn_float32_preferred.cache_clear()
    try:
        assert cpu_kernels.onednn_float32_preferred() is preferred
    finally:
        monkeypatch.undo()
        cpu_kernels.onednn_float32_preferred.cache_clear()


def test_large_bf16_weights_are_widened_into_one_reused_buffer(monkeypatch):
    """The float32 fallback widens a large bf16 weight into a buffer kept between calls (no fresh pages to fault
    in each time): results are bit for bit those of ``weight.float()``, and an earlier output never changes."""
    monkeypatch.setattr(cpu_kernels, "cpu_has_fast_bf16", lambda: False)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(20, 64, generator=g)
    w1, w2 = (torch.randn(n, 64, generator=g).bfloat16() for n in (48, 32))
    with torch.no_grad():
        expected = [float32_linear(x, w.float()) for w in (w1, w2)]
        monkeypatch.setattr(linear_module, "UPCAST_REUSE_MIN", 1)
        y1 = linear(x, w1)
        buffer = linear_module._scratch.buf
        y1_copy = y1.clone()
        y2 = linear(x, w2)
        assert linear_module._scratch.buf is buffer and buffer.numel() == 48 * 64
    assert torch.equal(y1, expected[0]) and torch.equal(y2, expected[1]) and torch.equal(y1, y1_copy)
    # under autograd the product keeps the widened weight for its backward pass: never the shared buffer
    xg = x.clone().requires_grad_()
    out = linear(xg, w1)
    linear(x, w2)  # would overwrite a shared buffer before the backward pass
    out.sum().backward()
    torch.testing.assert_close(xg.grad, w1.float().sum(0).expand_as(x))


def test_gradients_flow_through_bf16_weights():
    w = torch.randn(6, 10).bfloat16().requires_grad_()
    x = torch.randn(1, 10, requires_grad=True)
    linear(x, w).sum().backward()  # autograd: never the kernel
    assert x.grad is not None and w.grad is not None and w.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad, w.detach().float().sum(0, keepdim=True))


def test_switching_the_kernels_off_gives_the_same_result(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(1, 1, 64)
    w = torch.randn(32, 64).bfloat16()
    with torch.no_grad():
        on = linear(x, w)
        monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
        assert cpu_kernels.kernels() is None
        off = linear(x, w)
    # the same float32 products summed in another order: outputs of size ~8 differ in the last bits
    torch.testing.assert_close(on, off, rtol=1e-5, atol=1e-5)


def test_linear_module_is_an_nn_linear_with_the_same_keys():
    m = Linear(4, 3)
    assert isinstance(m, nn.Linear) and set(m.state_dict()) == {"weight", "bias"}
    x = torch.randn(2, 4)
    assert torch.equal(m(x), F.linear(x, m.weight, m.bias))
    assert cpu_kernels.cpu_has_fast_bf16() in (True, False)


def _gelu_layer(bias: bool = True) -> Linear:
    torch.manual_seed(3)
    layer = Linear(96, 200, bias=bias)
    with torch.no_grad():
        layer.weight.normal_(0, 0.3)
        if bias:
            layer.bias.normal_(0, 0.5)
    return layer.bfloat16()


@pytest.mark.skipif(not cpu_kernels.cpu_has_fast_bf16(),
                    reason="the oneDNN GELU post-op is used only where torch's bf16 GEMM is oneDNN's "
                           "(AVX512-BF16 / AMX)")
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_gelu_post_op_is_as_accurate_as_two_steps(approximate, bias):
    layer = _gelu_layer(bias)
    x = torch.randn(300, 96).bfloat16()
    with torch.inference_mode():
        assert _onednn_post_op_applies(x, layer.weight, layer.bias)
        fused = linear_gelu(layer, x, approximate)
        two_steps = F.gelu(layer(x), approximate=approximate)
    exact = F.gelu(F.linear(x.double(), layer.weight.double(), None if layer.bias is None else layer.bias.double()),
                   approximate=approximate)
    assert fused.dtype == torch.bfloat16 and fused.shape == (300, 200)
    err_fused = (fused.double() - exact).norm() / exact.norm()
    err_two = (two_steps.double() - exact).norm() / exact.norm()
    # one bf16 rounding instead of two: never worse than the two-step form (measured ~0.7x its error)
    assert err_fused <= err_two * 1.05 and err_fused < 4e-3, (err_fused, err_two)
    # the post-op's algorithm names are the same GELU variants as F.gelu's (checked where it is exact: float32)
    x32, w32 = x.float()[:20], layer.weight.float()
    torch.testing.assert_close(torch.ops.mkldnn._linear_pointwise(x32, w32, None, "gelu", [], approximate),
                               F.gelu(F.linear(x32, w32), approximate=approximate), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not cpu_kernels.cpu_has_fast_bf16(),
                    reason="the bias goes into oneDNN's GEMM only where torch's bf16 GEMM is oneDNN's "
                           "(AVX512-BF16 / AMX)")
def test_bias_inside_onednn_gemm_is_bit_identical_to_f_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = _gelu_layer()
    x = torch.randn(2, 150, 96).bfloat16()
    calls = []
    pointwise = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(a[3]) or pointwise(*a))
    with torch.inference_mode():
        out = layer(x)
        assert calls == ["none"]  # it took the fused-bias call
        assert torch.equal(out, F.linear(x, layer.weight, layer.bias))
        # a strided 3-D input: the same as F.linear on a contiguous copy (F.linear on the strided view itself takes
        # a path that rounds the product before adding the bias: twice the error)
        xt = x.transpose(0, 1)
        assert torch.equal(layer(xt), F.linear(xt.contiguous(), layer.weight, layer.bias))
        assert torch.equal(linear(x, layer.weight), F.linear(x, layer.weight))  # no bias: F.linear
    assert calls == ["none", "none"]
    with torch.no_grad():  # not inference mode, but no gradient either: fused too
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    x_grad = x.detach().clone().requires_grad_()
    out = layer(x_grad)  # autograd: F.linear
    assert out.requires_grad and len(calls) == 3


def test_linear_gelu_keeps_the_two_step_form_for_autograd_float32_few_rows_and_wrapped_layers():
    layer = _gelu_layer()
    x = torch.randn(40, 96).bfloat16()
    with torch.inference_mode():
        assert not _onednn_post_op_applies(x[:SMALL_M], layer.weight, layer.bias)  # a decode step's rows
        assert not _onednn_post_op_applies(x.float(), layer.weight, layer.bias)
    x32, layer32 = x.float().requires_grad_(), _gelu_layer().float()
    out = linear_gelu(layer32, x32, "tanh")
    torch.testing.assert_close(out, F.gelu(F.linear(x32, layer32.weight, layer32.bias), approximate="tanh"),
                               rtol=0, atol=0)
    out.sum().backward()
    assert x32.grad is not None and layer32.weight.grad is not None
    seen = []
    handle = layer.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    with torch.inference_mode():
        hooked = linear_gelu(layer, x, "tanh")
        torch.testing.assert_close(hooked, gelu_(layer(x), "tanh"), rtol=0, atol=0)
    handle.remove()
    assert seen and seen[0] == (40, 200)  # the layer itself ran: its hook saw the call
