"""kimivl.ops.rms_norm: the DeepSeek-V3 RMSNorm, PyTorch form and the C++ decode-step kernel."""
from __future__ import annotations

import pytest
import torch

from kimivl.decoder.norm import DeepseekV3RMSNorm
from kimivl.ops.linear import SMALL_M
from kimivl.ops.rms_norm import rms_norm


def _torch_form(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """The official module's ops, written out."""
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                                             (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("shape", [(1, 1, 2048), (2, 3, 512), (8, 100)])
def test_kernel_has_the_modules_roundings(cpu_ext, x_dtype, w_dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(*shape, generator=g) * 3).to(x_dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(w_dtype)
    out = cpu_ext.rms_norm(x, w, 1e-6)
    want = _torch_form(x, w, 1e-6)
    assert out.dtype == want.dtype == torch.promote_types(x_dtype, w_dtype) and out.shape == x.shape
    if out.dtype == torch.float32 and x_dtype == torch.float32:
        torch.testing.assert_close(out, want, rtol=2e-6, atol=1e-7)
    else:
        # only the mean square's summation order differs (float64 here): a rounding boundary may move by one ulp
        # of x's dtype in a few elements, never more
        torch.testing.assert_close(out.float(), want.float(), rtol=8e-3, atol=0)
        assert (out == want).float().mean() > 0.98


def test_the_module_takes_the_kernel_for_a_decode_step_and_torch_otherwise(cpu_ext):
    norm = DeepseekV3RMSNorm(256, eps=1e-5).bfloat16()
    with torch.no_grad():
        norm.weight.normal_(1, 0.1, generator=torch.Generator().manual_seed(0))
    x = torch.randn(1, 1, 256).bfloat16()
    with torch.no_grad():
        assert torch.equal(norm(x), cpu_ext.rms_norm(x, norm.weight, 1e-5))
        many = torch.randn(SMALL_M + 1, 256).bfloat16()
        assert torch.equal(norm(many), _torch_form(many, norm.weight, 1e-5))  # a prefill: PyTorch ops
    y = norm(x)  # autograd on (the weight requires grad): the PyTorch form, which has a backward
    assert y.grad_fn is not None and torch.equal(y.detach(), _torch_form(x, norm.weight, 1e-5).detach())


def test_kernel_names_bad_input(cpu_ext):
    with pytest.raises(RuntimeError, match=r"x \(\.\.\., 8\) for a weight of 8, got \[2, 9\]"):
        cpu_ext.rms_norm(torch.randn(2, 9), torch.ones(8), 1e-6)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        cpu_ext.rms_norm(torch.randn(2, 8).half(), torch.ones(8), 1e-6)


def test_without_the_extension_the_pytorch_form_runs(monkeypatch):
    monkeypatch.setenv("KIMIVL_CPU_KERNELS", "0")
    x, w = torch.randn(1, 64).bfloat16(), torch.rand(64).bfloat16()
    with torch.no_grad():
        assert torch.equal(rms_norm(x, w, 1e-6), _torch_form(x, w, 1e-6))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_form_equals_the_cpu_form(dtype):
    """On a GPU the normalisation is F.rms_norm; the roundings around it are the module's."""
    g = torch.Generator().manual_seed(9)
    x, w = torch.randn(5, 3, 2048, generator=g).to(dtype), (1 + 0.1 * torch.randn(2048, generator=g)).to(dtype)
    want = rms_norm(x, w, 1e-6)
    got = rms_norm(x.cuda(), w.cuda(), 1e-6).cpu()
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5)
