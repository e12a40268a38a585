"""The optional C++ CPU kernels of kimivl (``kimivl/ops/csrc``), built just in time on first use.

Seven kernels and four compositions of them (``csrc/``, one extension module, ``bindings.cpp``), all for
inference on the CPU:

- ``linear_bf16w(x, w, bias=None)`` — activations (..., K) in float32 or bf16 times bfloat16 weights (N, K)
  transposed, answered in x's dtype, for the few-row shapes of a decode step, where the time is streaming the
  weights once from memory: widened in registers, float32 accumulation, the next block of weight rows
  prefetched (rows of 2-6 KB are each their own page, where the hardware prefetcher keeps restarting).
  torch's own bf16 GEMV streams 7-11 GB/s on an AVX2 CPU; this one 17-20 GB/s (docs/performance.md).
- ``moe_bf16w(x, topk_idx, topk_weight, ids, gate, up, down, n_shared)`` — a MoE layer's chosen and shared
  experts (or one dense MLP) for up to 128 tokens in one call (:func:`kimivl.ops.moe.fused_cpu_moe`,
  :func:`~kimivl.ops.moe.fused_cpu_mlp`): every gate/up row of every MLP as one parallel loop, silu(gate) *
  up in float32, every down row as another, then the routed outputs weighted and summed with the roundings
  of the module path.
- ``moe_experts_bf16(x, topk_idx, topk_weight, gate_up, down, use_amx, max_rows)`` (``experts_bf16.cpp``) —
  a prefill's routed experts (:func:`kimivl.ops.moe.grouped_cpu_moe`): each expert's products transposed (its
  weights as the A operand, read in place: AMX tiles or vdpbf16ps broadcasts; on AVX2, float32 FMAs on weight
  rows widened into an L1/L2 buffer), whole experts per thread, the weighted sum over slots fused;
  ``experts_isa()`` says which path this build and CPU have. ``moe_experts_int8(x, topk_idx, topk_weight, gate,
  up, down, gate_scale, up_scale, down_scale)``: the AVX2 path for int8 experts (each weight block dequantized
  into that buffer; :func:`kimivl.ops.moe.grouped_int8_moe`).
- ``attention_bf16(q, k, v, lengths)`` (``attention_bf16.cpp``) — the vision tower's per-image attention with
  AVX512-BF16 dot products and an online softmax (:mod:`kimivl.ops.attention`, backend ``"avx512_bf16"``), for
  CPUs that have AVX512-BF16 but no AMX, where torch's flash CPU kernel runs at ~1/5 of the bf16 GEMM rate.
- ``mla_decode(q_nope, q_pe, kv, w_uk, w_uv, scale, valid, form)`` — one absorbed-MLA decode step
  (:mod:`kimivl.ops.mla`) in one pass over the latent cache: chunks of 128 rows per thread, all heads
  scored against each chunk while it sits in L2, a chunk-local softmax merged at the end (flash-decoding),
  W_UK / W_UV read in place from ``kv_b_proj.weight``. Float32 FMAs on widened rows, or for a bf16 cache and
  weights bf16 products on the rows in place, by AMX tiles or vdpbf16ps (:func:`mla_decode_form`).
- ``rms_norm(x, weight, eps)`` and ``rope_rotate(x, cos, sin)`` — a decode step's RMSNorm and RoPE in one
  call each instead of ~8-12 tensor ops of dispatch (:mod:`kimivl.ops.rms_norm`, :mod:`kimivl.ops.rope`),
  with the PyTorch forms' roundings (``rope_rotate`` bit for bit; the extension is built with
  ``-ffp-contract=off`` so a product and a sum stay two roundings).
- ``route(x, weight, bias, ...)`` (``routing.cpp``) — DeepSeek-V3 routing of a decode step's few rows in plain
  loops (:func:`kimivl.ops.routing.route_cpu_rows`): the router's dozen ATen ops cost ~1 % of a decode step.
- ``mla_block``, ``moe_block``, ``mlp_block`` (``decode_layer.cpp``) — a bf16 decoder layer's decode step in two
  calls: the kernels above and the router in the modules' order, without the ~100 Python-level calls between
  them (:mod:`kimivl.decoder.cpu_decode`; bit-identical to the module path).
- ``DecoderStep`` (``decode_model.cpp``) — a bf16 decoder's whole decode step in one call: embedding, RoPE
  tables, every layer's blocks, final norm and ``lm_head`` (:func:`kimivl.decoder.cpu_decode.model_step`).

Like torch's operators, every tensor function runs without Python's lock (other threads keep running).

The extension is compiled with ``torch.utils.cpp_extension.load`` (g++ and ninja, ``-O3 -march=native``)
into ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), under a name that carries a hash of the
CPU's feature flags (a build for one CPU's instructions, AMX say, must not be loaded on another that lacks
them, e.g. through a home directory shared between machines) and of the checkout's path (two checkouts would
otherwise rebuild each other's build folder on every load), the first time a bf16 weight meets a
small CPU batch, 2-3 minutes on 2 cores, once; ``python -m kimivl.ops.cpu_kernels`` builds it ahead of time.
When it cannot be built (no compiler), or with ``KIMIVL_CPU_KERNELS=0``, every caller uses its PyTorch path and
a single warning says why.

``KIMIVL_CPU_MAX_ISA`` (``amx``, the default, ``avx512_bf16``, ``avx512`` or ``avx2``; read at import) caps the
instruction sets the extension is built for and the CPU features the callers see, as oneDNN's
``ONEDNN_MAX_CPU_ISA`` does for its kernels (torch's own GEMMs follow that one): on an AMX CPU,
``avx512_bf16`` runs the code an AMD Zen 4 / 5 runs (vdpbf16ps MLA form and experts, the C++ vision attention),
and ``avx2`` that of a CPU without AVX-512, each in a build folder of its own (tests/ops/test_cpu_isa_cap.py).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)
SOURCES = [Path(__file__).parent / "csrc" / name
           for name in ("bindings.cpp", "linear_bf16w.cpp", "mla_decode.cpp", "rms_norm.cpp", "rope.cpp",
                        "decode_layer.cpp", "decode_model.cpp", "experts_bf16.cpp",
                        "attention_bf16.cpp", "routing.cpp", "linear_int8w.cpp")]
ENV_SWITCH = "KIMIVL_CPU_KERNELS"
ISA_SWITCH = "KIMIVL_CPU_MAX_ISA"
# Per cap: the prefixes of the CPU flags above it (hidden from the callers) and the compiler options that keep
# the build from them (after -march=native).
_NO_AMX = ("-mno-amx-tile", "-mno-amx-bf16", "-mno-amx-int8")
ISA_CAPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "amx": ((), ()),
    "avx512_bf16": (("amx",), _NO_AMX),
    "avx512": (("amx", "avx512_bf16"), (*_NO_AMX, "-mno-avx512bf16")),
    "avx2": (("amx", "avx512"), (*_NO_AMX, "-mno-avx512f")),
}


def max_isa() -> str:
    """The ``KIMIVL_CPU_MAX_ISA`` cap in the environment now ("amx" when unset: whatever the CPU has); the module
    reads it once, at import, into ``MAX_ISA``."""
    cap = os.environ.get(ISA_SWITCH, "").strip().lower() or "amx"
    if cap not in ISA_CAPS:
        raise ValueError(f"{ISA_SWITCH}={os.environ[ISA_SWITCH]!r} is not one of {', '.join(ISA_CAPS)}")
    return cap


def _cpuinfo_line(key: str) -> str:
    """The first line of /proc/cpuinfo that starts with ``key`` ("" where there is none: not Linux, not x86)."""
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith(key)), "")
    except OSError:
        return ""


def _cpuinfo_flags() -> str:
    """The ``flags`` line of /proc/cpuinfo ("" where there is none)."""
    return _cpuinfo_line("flags")


def _build_tag(cap: str) -> str:
    """8 hex digits of the CPU's feature flags (``-march=native`` builds are only valid on such a CPU) and of this
    checkout's path: two checkouts sharing the extensions directory would otherwise share a build folder whose
    ninja file names the other's sources, and each load would recompile everything (~2 min)."""
    key = f"{_cpuinfo_flags() or platform.machine()}|{Path(__file__).resolve().parent}"
    if cap != "amx":  # a capped build has a folder of its own (the default keeps its name)
        key += f"|{cap}"
    return hashlib.sha1(key.encode()).hexdigest()[:8]


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as the kernel names them (``avx512_bf16``, ``amx_bf16``, ...), less those above
    ``KIMIVL_CPU_MAX_ISA``; empty where unknown."""
    hidden = ISA_CAPS[MAX_ISA][0]
    return frozenset(f for f in _cpuinfo_flags().partition(":")[2].split() if not f.startswith(hidden))


MAX_ISA = max_isa()
NAME = f"kimivl_cpu_kernels_{_build_tag(MAX_ISA)}"


def vdpbf16_preferred() -> bool:
    """Whether bf16 dot products (vdpbf16ps) beat float32 FMAs on this CPU: AVX512-BF16 without AMX (AMD Zen 4 / 5,
    the acceptance machine of performance notes §1), where one vdpbf16ps does twice the FLOPs of a float32 FMA at
    the same issue rate (oneDNN's bf16 GEMM 510-536 GFLOP/s per core there, its float32 one 254-264). On AMX Xeons
    it issues at half that rate, so float32 FMAs (or AMX through oneDNN) stay the faster choice (docs/performance.md).
    The vision attention backend ``auto`` and the MLA decode step ask this. The CPU's flags only: whether the
    extension was compiled with the instruction is ``kernels().bf16_isa()``."""
    flags = cpu_flags()
    return "avx512_bf16" in flags and "amx_bf16" not in flags


def mla_decode_form(ext: ModuleType) -> int:
    """The form ``mla_decode`` takes for a bf16 model here: ``ext.MLA_AMX`` where the CPU and this build and
    process have AMX (its tiles make the step as fast as reading the cache: docs/performance.md), else
    ``ext.MLA_VDPBF16`` where :func:`vdpbf16_preferred`, else ``ext.MLA_FLOAT32``. The bf16 forms round the
    queries and probabilities to bf16 as the bf16 prefill does; a float32 model always gets the float32 form."""
    flags = cpu_flags()
    if "amx_bf16" in flags and ext.bf16_isa() == "amx":
        return ext.MLA_AMX
    return ext.MLA_VDPBF16 if vdpbf16_preferred() else ext.MLA_FLOAT32


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """Whether torch's CPU bf16 matmul has a hardware path (AVX512-BF16 / AMX) on this machine."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@functools.lru_cache(maxsize=1)
def onednn_float32_preferred() -> bool:
    """Whether float32 GEMMs of more than a few rows should go to oneDNN rather than torch's default (MKL's
    sgemm): on AMD CPUs, where MKL takes slower code paths (:func:`kimivl.ops.linear.float32_linear`)."""
    return (_cpuinfo_vendor() == "AuthenticAMD" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _cpuinfo_vendor() -> str:
    """The ``vendor_id`` of /proc/cpuinfo ("" where there is none)."""
    return _cpuinfo_line("vendor_id").partition(":")[2].strip()


KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # activation dtypes every kernel takes


def inference_rows(x: torch.Tensor, rows: int, max_rows: int, *others: torch.Tensor | None) -> bool:
    """The condition every decode-step kernel shares: ``x`` on the CPU in a kernel dtype, ``0 < rows <=
    max_rows``, and no autograd through ``x`` or any of ``others`` (weights, tables; None entries skipped)."""
    if x.device.type != "cpu" or x.dtype not in KERNEL_DTYPES or not 0 < rows <= max_rows:
        return False
    return not (torch.is_grad_enabled()
                and any(t is not None and t.requires_grad for t in (x, *others)))


def enabled() -> bool:
    """False when ``KIMIVL_CPU_KERNELS`` is 0 / false / off."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "off", "no")


_BUILD_LOCK = threading.Lock()  # lru_cache does not stop two threads' first calls from both building


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """An inter-process lock that the kernel drops when its holder dies (``flock``; nothing where absent)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's own lock file only
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _headers_hash() -> str:
    """A hash of csrc/*.h, passed as a define: torch rebuilds when sources or flags change, not headers."""
    digest = hashlib.sha1()
    for header in sorted((Path(__file__).parent / "csrc").glob("*.h")):
        digest.update(header.read_bytes())
    return digest.hexdigest()[:12]


@functools.lru_cache(maxsize=1)
def _build() -> ModuleType | None:
    try:
        from torch.utils.cpp_extension import _get_build_directory, load

        build_dir = Path(_get_build_directory(NAME, False))
        build_dir.mkdir(parents=True, exist_ok=True)
        with _BUILD_LOCK, _exclusive(build_dir / "kimivl-build.flock"):
            # torch's own lock is a plain file: a process killed while building (a timed-out test, a stopped
            # server) leaves it behind and every later load() waits for it forever. Under the flock no other
            # kimivl process is building, so a file found here is such a leftover.
            stale = build_dir / "lock"
            if stale.exists():
                logger.warning("removing %s, left by a build that did not finish", stale)
                stale.unlink(missing_ok=True)
            return load(NAME, [str(s) for s in SOURCES],
                        extra_cflags=["-O3", "-march=native", *ISA_CAPS[MAX_ISA][1], "-fopenmp",
                                      "-ffp-contract=off", f"-DKIMIVL_HEADERS={_headers_hash()}"],
                        extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler, no ninja, a failed build: the PyTorch paths serve instead
        logger.warning("kimivl CPU kernels unavailable (%s: %s); using the PyTorch paths", type(exc).__name__,
                       str(exc).strip().splitlines()[-1] if str(exc).strip() else "")
        return None


def is_built() -> bool:
    """Whether the extension is loaded in this process or compiled in the extensions directory already (so
    :func:`kernels` returns in about a second instead of compiling for a minute)."""
    return bool(_build.cache_info().currsize) or _compiled_on_disk()


@functools.lru_cache(maxsize=1)
def _compiled_on_disk() -> bool:
    # Looked up once per process: callers ask on every decode step, and only this process's own build
    # (which fills _build's cache) can change the answer in between.
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return (Path(_get_build_directory(NAME, False)) / f"{NAME}.so").is_file()
    except Exception:  # a private helper of torch's; without it, assume not built
        return False


def kernels(build: bool = True) -> ModuleType | None:
    """The compiled extension, or None when disabled or not buildable (built on the first call). With
    ``build=False``, None unless :func:`is_built` (for callers that should not pause to compile)."""
    if not enabled() or (not build and not is_built()):
        return None
    return _build()


def main() -> None:
    import argparse

    argparse.ArgumentParser(description="Build kimivl's C++ CPU kernels ahead of first use.").parse_args()
    ext = kernels()
    if ext is None:
        raise SystemExit(f"not built (disabled by {ENV_SWITCH}, or the build failed: see the warning above)")
    print(f"built: {ext.__file__} (AVX2+FMA path: {ext.has_avx2()}; bf16 kernels: {ext.bf16_isa() or 'none'}; "
          f"prefill experts: {ext.experts_isa() or 'none'}; "
          f"{ISA_SWITCH}: {MAX_ISA})")


if __name__ == "__main__":
    main()
