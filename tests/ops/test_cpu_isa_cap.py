"""``KIMIVL_CPU_MAX_ISA``: the C++ kernels built for, and the callers deciding on, fewer instruction sets than the CPU
has. On an AMX CPU the cap ``avx512_bf16`` builds and runs what an AMD Zen 4 / 5 (the benchmarks' acceptance CPU)
does, and on an AVX-512 CPU ``avx2`` what a CPU without AVX-512 does, so the kernel tests run once more under each
cap below this CPU's own."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kimivl.ops import cpu_kernels

ROOT = Path(__file__).resolve().parents[2]
FLAGS = "flags\t\t: fpu sse2 avx2 fma avx512f avx512bw avx512_bf16 avx512_vnni amx_bf16 amx_tile amx_int8"


@pytest.fixture
def fake_cpu(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_cpuinfo_flags", lambda: FLAGS)
    cpu_kernels.cpu_flags.cache_clear()
    yield
    cpu_kernels.cpu_flags.cache_clear()


AMX = {"amx_bf16", "amx_tile", "amx_int8"}


@pytest.mark.parametrize(("cap", "hidden"), [
    ("", set()),
    ("avx512_bf16", AMX),
    ("avx512", AMX | {"avx512_bf16"}),
    ("avx2", AMX | {"avx512f", "avx512bw", "avx512_bf16", "avx512_vnni"}),
])
def test_a_cap_hides_the_cpu_features_above_it(fake_cpu, monkeypatch, cap: str, hidden: set[str]) -> None:
    monkeypatch.setattr(cpu_kernels, "MAX_ISA", cap or "amx")  # (read from the environment at import)
    assert cpu_kernels.cpu_flags() == set(FLAGS.partition(":")[2].split()) - hidden
    # what the callers decide from them: vdpbf16ps preferred only where AVX512-BF16 is the top (Zen 4 / 5)
    assert cpu_kernels.vdpbf16_preferred() == (cap == "avx512_bf16")


def test_a_capped_build_has_a_folder_of_its_own(monkeypatch) -> None:
    tags = {cap: cpu_kernels._build_tag(cap) for cap in ("amx", "avx512_bf16", "avx2")}
    assert len(set(tags.values())) == 3
    monkeypatch.setenv(cpu_kernels.ISA_SWITCH, "")
    assert cpu_kernels.max_isa() == "amx"  # unset: the default, whose folder keeps the name it always had
    monkeypatch.setenv(cpu_kernels.ISA_SWITCH, " AVX2 ")
    assert cpu_kernels.max_isa() == "avx2"


def test_an_unknown_cap_is_refused_with_the_choices(monkeypatch) -> None:
    monkeypatch.setenv(cpu_kernels.ISA_SWITCH, "avx1024")
    with pytest.raises(ValueError, match="KIMIVL_CPU_MAX_ISA='avx1024' is not one of amx, avx512_bf16, avx512, avx2"):
        cpu_kernels.max_isa()


def _reason(cap: str) -> str | None:
    """Why the capped build is not run here (None: it is): only below what this CPU has."""
    flags = cpu_kernels._cpuinfo_flags().split()
    if os.environ.get(cpu_kernels.ISA_SWITCH):
        return f"{cpu_kernels.ISA_SWITCH} is set for this run"
    if cap == "avx512_bf16" and ("amx_bf16" not in flags or "avx512_bf16" not in flags):
        return "this CPU has no AMX: the suite's own build is already an avx512_bf16 (or lesser) one"
    if cap == "avx2" and "avx512f" not in flags:
        return "this CPU has no AVX-512: the suite's own build is already an AVX2 (or lesser) one"
    return None


# Per cap, what the capped process must see: bf16_isa(), experts_isa(), the MLA form, vdpbf16_preferred().
# avx512_bf16 is the acceptance Zen 5's code (no AMX compiled in: vdpbf16ps MLA and experts, the C++ vision
# attention); avx2 that of CPUs without AVX-512 (the AVX2 weight-streaming kernels, the float32-product experts
# kernel, float32 MLA, torch's SDPA).
CAPS = {"avx512_bf16": ["avx512_bf16", "avx512_bf16", "MLA_VDPBF16", "True"],
        "avx2": ["-", "avx2", "MLA_FLOAT32", "False"]}
KERNEL_TESTS = ["tests/decoder/test_cpu_decode.py", "tests/decoder/test_moe.py", "tests/ops/test_mla_decode.py",
                "tests/ops/test_attention.py", "tests/ops/test_attention_bf16.py", "tests/ops/test_linear.py",
                "tests/ops/test_rms_norm.py", "tests/ops/test_rope.py", "tests/ops/test_rope_2d.py",
                "tests/ops/test_parallel_schedule.py", "tests/ops/test_routing.py"]


@pytest.mark.parametrize("cap", list(CAPS))
def test_a_capped_build_passes_the_kernel_tests(cpu_ext, cap: str) -> None:
    """Builds the extension under the cap (2-3 minutes on 2 cores, once per checkout) and runs the tests of every
    kernel and of the decode step in a process that sees the CPU through it."""
    reason = _reason(cap)
    if reason is not None:
        pytest.skip(reason)
    env = {**os.environ, cpu_kernels.ISA_SWITCH: cap, "HF_HUB_OFFLINE": "1"}
    probe = ("from kimivl.ops import cpu_kernels as c; e = c.kernels(); form = c.mla_decode_form(e); "
             "print(e.bf16_isa() or '-', e.experts_isa() or '-', "
             "next(n for n in ('MLA_FLOAT32', 'MLA_VDPBF16', 'MLA_AMX') "
             "if getattr(e, n) == form), c.vdpbf16_preferred())")
    seen = subprocess.run([sys.executable, "-c", probe], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=1200)
    assert seen.stdout.split() == CAPS[cap], seen.stdout + seen.stderr[-3000:]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *KERNEL_TESTS], env=env,
                         cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout.splitlines()[-1]
