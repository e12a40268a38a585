"""Shared pieces of the benchmark suite: machine-load metering, side-by-side timing, machine limits
(bandwidth, GEMM peak) for roofline fractions, and the synthetic real-width Kimi-VL slice checkpoint
(official layout) that every peer loads.

Method (``shared/reference/performance-notes.md`` §0, §4): this host is shared, so every timed region first
waits (bounded) for the machine to be quiet and records the load of *other* processes seen while timing
(``worst_foreign_cores``); implementations alternate inside one invocation so their ratios see the same
machine state; results are medians of ``repeats`` runs.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "bench"  # checkpoints, builds and converted files (gitignored)

QUIET_CORES = 0.3  # a timed region counts as clean when other processes used less than this many cores
QUIET_WAIT_S = 10.0  # bounded wait for a quiet machine before each measurement ...
QUIET_WAIT_TOTAL_S = 120.0  # ... and over the whole run


class CpuMeter:
    """Cores used by *other* processes during a region: machine busy time minus ours (/proc, Linux)."""

    def __init__(self, wait_total_s: float = QUIET_WAIT_TOTAL_S) -> None:
        self.tick = os.sysconf("SC_CLK_TCK")
        self.worst = 0.0
        self.waited = 0.0
        self.wait_total_s = wait_total_s

    @staticmethod
    def _sample() -> tuple[int, int, float]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        own = int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])  # incl. waited-for children
        return sum(v) - v[3] - v[4], own, time.perf_counter()

    def foreign(self, start: tuple[int, int, float]) -> float:
        busy, own, t = self._sample()
        return max(0.0, (busy - start[0]) - (own - start[1])) / self.tick / max(t - start[2], 1e-9)

    def wait_quiet(self) -> None:
        t0 = time.perf_counter()
        deadline = t0 + min(QUIET_WAIT_S, max(0.0, self.wait_total_s - self.waited))
        while time.perf_counter() < deadline:
            start = self._sample()
            time.sleep(0.5)
            if self.foreign(start) < QUIET_CORES:
                break
        self.waited += time.perf_counter() - t0

    def timed(self, fn: Callable[[], Any]) -> float:
        """Seconds of ``fn()``, after waiting for quiet; remembers the worst foreign load."""
        self.wait_quiet()
        start = self._sample()
        t0 = time.perf_counter()
        fn()
        seconds = time.perf_counter() - t0
        self.worst = max(self.worst, self.foreign(start))
        return seconds

    def report(self) -> dict[str, float]:
        return {"worst_foreign_cores": round(self.worst, 2), "quiet_wait_s": round(self.waited, 1)}


class StepClock:
    """A ``generate()`` streamer that timestamps the prompt hand-over and every new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def compare(meter: CpuMeter, runs: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per name; the implementations alternate so they see the same machine state."""
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            times[name].append(meter.timed(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def ratios(values: dict[str, float], ours: str = "kimivl", higher_is_better: bool = True) -> dict[str, float]:
    """``ours / peer`` for every peer (``peer / ours`` for times), rounded."""
    out = {}
    for name, v in values.items():
        if name != ours and v and values.get(ours):
            out[f"vs_{name}"] = round(values[ours] / v if higher_is_better else v / values[ours], 3)
    return out


def machine_info(threads: int) -> dict[str, Any]:
    flags = ""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    from kimivl.ops import cpu_kernels

    ext = cpu_kernels.kernels()
    mla_form = "" if ext is None else {ext.MLA_FLOAT32: "float32", ext.MLA_VDPBF16: "vdpbf16ps",
                                       ext.MLA_AMX: "amx"}[cpu_kernels.mla_decode_form(ext)]
    return {"cpu": model, "cores": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "avx512_bf16": "avx512_bf16" in flags, "amx": "amx_bf16" in flags,
            # which forms kimivl's bf16 kernels take here: vdpbf16ps for (backend auto) the vision attention where
            # True, torch's SDPA otherwise; the MLA decode step's form for a bf16 model (docs/performance.md)
            "kimivl_vdpbf16_preferred": cpu_kernels.vdpbf16_preferred(), "kimivl_mla_decode_form": mla_form,
            # KIMIVL_CPU_MAX_ISA (and oneDNN's own cap, which torch's GEMMs follow), when a run sets them
            "kimivl_cpu_max_isa": cpu_kernels.MAX_ISA, "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "")}


# ------------------------------------------------------------------------------------------ machine limits
def measure_bandwidth(meter: CpuMeter | None = None, mib: int = 512, repeats: int = 5) -> float:
    """Read bandwidth in GB/s (``sum`` over a float32 array 16x the L3 size; STREAM 'read')."""
    x = torch.ones(mib * 2**20 // 4)
    x.sum()
    meter = meter or CpuMeter(wait_total_s=20)
    t = statistics.median(meter.timed(x.sum) for _ in range(repeats))
    return x.numel() * 4 / t / 1e9


def measure_gemm(dtype: torch.dtype, n: int = 2048, meter: CpuMeter | None = None, repeats: int = 3) -> float:
    """GFLOP/s of an n^3 ``kimivl.ops.linear.linear`` with ``dtype`` weights (the compute roof of the path
    kimivl's layers take: on a CPU without a bf16 matmul fast path that is float32 GEMM on upcast weights,
    not torch's slow bf16 matmul)."""
    from kimivl.ops.linear import linear

    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    linear(a, b)
    meter = meter or CpuMeter(wait_total_s=20)
    t = statistics.median(meter.timed(lambda: linear(a, b)) for _ in range(repeats))
    return 2 * n**3 / t / 1e9


def dtype_of(name: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
            "fp16": torch.float16, "float16": torch.float16}[name]


def emit(result: dict[str, Any], out: str | Path | None = None) -> None:
    """Print the result as JSON (and write it to ``out`` when given)."""
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
