"""The C++ kernels hand out their work as threads free up (csrc/parallel.h): a piece of rows, an expert, an image's
head goes to whichever thread asks first. Their answers must not depend on that: the same bits with 1, 2 or 3
threads and from one call to the next. The shapes are the awkward ones: output widths that are not multiples of
the 4-row blocks or of the 16-row pieces (where a piece starting mid-block would change a row's sums), MLPs of
odd widths one after another in a single row space, and 2 rows of x (whose 4-row and 1-row blocks sum in a
different order)."""
from __future__ import annotations

import pytest
import torch

from kimivl.ops import cpu_kernels


@pytest.fixture(scope="module")
def ext(cpu_ext):
    return cpu_ext


@pytest.fixture
def threads():
    """Runs a function under 1, 2 and 3 threads (twice under 2) and restores the thread count."""
    before = torch.get_num_threads()

    def under_each(fn):
        answers = []
        try:
            for n in (1, 2, 3, 2):
                torch.set_num_threads(n)
                answers.append(fn())
        finally:
            torch.set_num_threads(before)
        return answers

    return under_each


def _same(answers: list[torch.Tensor]) -> None:
    for i, a in enumerate(answers[1:], 1):
        assert torch.equal(a, answers[0]), f"answer {i} differs from the first (max {(a - answers[0]).abs().max()})"


@pytest.mark.parametrize("m", [1, 2, 5])
@pytest.mark.parametrize("n,k", [(1030, 64), (4099, 40), (70, 2048)])
def test_linear_rows_do_not_depend_on_the_threads(ext, threads, m, n, k):
    g = torch.Generator().manual_seed(m + n + k)
    x = torch.randn(m, k, generator=g).bfloat16()
    w = torch.randn(n, k, generator=g).bfloat16()
    _same(threads(lambda: ext.linear_bf16w(x, w, None)))
    _same(threads(lambda: ext.linear_bf16w(x.float(), w, None)))


@pytest.mark.parametrize("tokens", [1, 2, 6])
def test_moe_rows_do_not_depend_on_the_threads(ext, threads, tokens):
    # 5 experts and a shared MLP of widths 18, 30, 46, 22, 38 and 54: the segments of the gate / up row space
    # start at offsets that are no multiple of 4 unless the loop aligns them
    g = torch.Generator().manual_seed(tokens)
    d, widths = 40, [18, 30, 46, 22, 38, 54]
    x = torch.randn(tokens, d, generator=g).bfloat16()
    idx = torch.stack([torch.randperm(5, generator=g)[:2] for _ in range(tokens)])
    weight = torch.rand(tokens, 2, generator=g)
    ids = sorted(set(idx.view(-1).tolist()))
    mlps = [widths[e] for e in ids] + [widths[5]]
    gate = [torch.randn(i, d, generator=g).bfloat16() for i in mlps]
    up = [torch.randn(i, d, generator=g).bfloat16() for i in mlps]
    down = [torch.randn(d, i, generator=g).bfloat16() for i in mlps]
    _same(threads(lambda: ext.moe_bf16w(x, idx, weight, ids, gate, up, down, 1)))


@pytest.mark.parametrize("tokens", [1, 5])
def test_the_router_does_not_depend_on_the_threads(ext, threads, tokens):
    # 61 router rows of 2,000 columns (not multiples of the 16 lanes), bf16 and float32 weights, 8 groups
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 2000, generator=g).bfloat16()
    w = torch.randn(64, 2000, generator=g)[:61].contiguous()
    bias = torch.randn(61, generator=g) * 0.1
    for weight in (w, w.bfloat16()):
        answers = threads(lambda: ext.route(x, weight, bias, 6, 1, 1, 0, False, True, 2.5))
        for part in range(3):
            _same([a[part] for a in answers])


@pytest.mark.parametrize("length", [1, 129, 700])
def test_mla_decode_does_not_depend_on_the_threads(ext, threads, length):
    g = torch.Generator().manual_seed(length)
    q_nope, q_pe = torch.randn(2, 16, 32, generator=g), torch.randn(2, 16, 16, generator=g)
    kv = torch.randn(2, length, 64 + 16, generator=g).bfloat16()
    w_uk = (torch.randn(16, 32, 64, generator=g) / 6).bfloat16()
    w_uv = (torch.randn(16, 24, 64, generator=g) / 8).bfloat16()
    for form in sorted({0, cpu_kernels.mla_decode_form(ext)}):
        _same(threads(lambda: ext.mla_decode(q_nope, q_pe, kv, w_uk, w_uv, 0.1, None, form)))


def test_prefill_experts_and_vision_attention_do_not_depend_on_the_threads(ext, threads):
    if not ext.experts_isa():
        pytest.skip("moe_experts_bf16 has no kernel for this CPU in this build (experts_isa() = '')")
    g = torch.Generator().manual_seed(0)
    tokens, d, inter, experts = 96, 64, 96, 8
    x = torch.randn(tokens, d, generator=g).bfloat16()
    # skewed routing: experts of 1 to ~70 rows, some above the 32-row limit (the GEMM library's share)
    idx = torch.multinomial(torch.tensor([30.0, 12, 8, 4, 2, 1, 1, 0.2]), tokens * 2, replacement=True,
                            generator=g).view(tokens, 2)
    weight = torch.rand(tokens, 2, generator=g)
    gate_up = (torch.randn(experts, 2 * inter, d, generator=g) / 8).bfloat16()
    down = (torch.randn(experts, d, inter, generator=g) / 10).bfloat16()
    use_amx = ext.bf16_isa() == "amx"
    _same(threads(lambda: ext.moe_experts_bf16(x, idx, weight, gate_up, down, use_amx, 32)))
    if not ext.bf16_isa():  # the AVX2 experts path above; attention_bf16 needs AVX512-BF16
        return
    lengths = [300, 4, 77, 1, 150]
    q, k, v = (torch.randn(sum(lengths), 3, 40, generator=g).bfloat16() for _ in range(3))
    _same(threads(lambda: ext.attention_bf16(q, k, v, lengths)))
