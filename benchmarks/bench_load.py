"""Peak memory of ``from_pretrained`` on the synthetic real-width slice: does loading hold one copy of the weights?

Issue item 5: loading the real checkpoint layout (bf16 safetensors, sharded, with an index) must never hold
two copies of the weights; the target is ``peak RSS during from_pretrained - RSS just before <= 1.1 x the
loaded weight bytes``. Each case runs in a fresh subprocess (``--child``), so the allocator, the page tables
and the mappings of one case cannot hide or inflate another.

What is measured, per case (``/proc/self/status``, Linux):

* ``peak_ratio``: (VmHWM - VmRSS before) / bytes of the loaded state dict. VmHWM is reset with
  ``/proc/self/clear_refs`` just before the call, so it is the exact peak of the call (falls back to
  ``ru_maxrss`` where the reset is refused). The bytes are those of the *loaded* tensors, so bf16 -> fp32
  is measured against the fp32 bytes.
* the anonymous / file-backed split of RSS at its peak (sampled every 2 ms in a thread) and after the call.
  RSS counts the pages of memory-mapped files that the process has touched (``RssFile``) as well as its own
  anonymous memory (``RssAnon``); page-cache pages filled by ``read()`` are not counted. A loader that
  returns tensors which are views of an ``mmap`` of the file therefore shows almost nothing during the call
  and pays when the weights are first used, so every case also touches one byte of every page of every
  weight afterwards (what the first forward does) and reports ``after_touch_ratio`` (RSS after that,
  minus before) and ``peak_through_first_use_ratio`` (the call and the touch together).

``meta_build`` (building the model on the meta device only) measures the fixed, model-size-independent part
of the peak: torch imports its Python meta kernels on first use (~70 MB); ``peak_ratio_excluding_meta_build``
subtracts it.

Cases: ``default`` (``from_pretrained(dir)``: stored dtype, bf16 here), ``bf16`` (``dtype=torch.bfloat16``),
``fp32`` (``dtype=torch.float32``, converted on load), ``auto`` (``dtype="auto"``: config ``torch_dtype``),
``int8`` (``quantization="int8"``: each decoder weight quantized as it is read; ``peak_over_loaded_mib`` is the
peak beyond the loaded int8 model, one float32 copy of the weight being quantized),
and the peer, transformers ``DeepseekV3ForCausalLM.from_pretrained(text_only_dir(d), dtype=torch.bfloat16)``
on the text part of the same tensors (its own ratio against its own loaded bytes). Timings (``load_s``) are
reported but are not the point here: they depend on whether the files are in the page cache.

Usage: ``python -m benchmarks.bench_load [--dtype all|bf16|fp32|auto] [--text-layers 2] [--out FILE]``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, CpuMeter, emit, machine_info

MiB = 2**20
CASES = ("default", "bf16", "fp32", "auto", "int8", "transformers_bf16", "meta_build")


def _status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1]) * 1024
    return out


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _Sampler(threading.Thread):
    """Largest RssAnon + RssFile seen, with its split (the split of VmHWM itself is not exported)."""

    def __init__(self, period_s: float = 0.002) -> None:
        super().__init__(daemon=True)
        self.period_s = period_s
        self.stop = threading.Event()
        self.peak = {"RssAnon": 0, "RssFile": 0}

    def run(self) -> None:
        while not self.stop.is_set():
            s = _status()
            if s["RssAnon"] + s["RssFile"] > self.peak["RssAnon"] + self.peak["RssFile"]:
                self.peak = {"RssAnon": s["RssAnon"], "RssFile": s["RssFile"]}
            time.sleep(self.period_s)


def _touch(tensors: list[Any]) -> None:
    """Read one byte of every page of every tensor (what the first forward does to mmap-backed weights)."""
    import torch

    for t in tensors:
        if t.numel() == 0:
            continue
        flat = t.detach().reshape(-1).view(torch.uint8)
        flat[::4096].sum()
        flat[-1:].sum()


def _load(case: str, directory: Path) -> Any:
    import torch

    if case == "meta_build":  # the fixed cost inside from_pretrained that is not weights (see main)
        from kimivl import KimiVLConfig, KimiVLForConditionalGeneration

        with torch.device("meta"):
            return KimiVLForConditionalGeneration(KimiVLConfig.from_pretrained(directory))
    if case == "transformers_bf16":
        from transformers import DeepseekV3ForCausalLM

        from benchmarks.slice import text_only_dir

        return DeepseekV3ForCausalLM.from_pretrained(text_only_dir(directory), dtype=torch.bfloat16)
    from kimivl import KimiVLForConditionalGeneration

    kwargs = {"default": {}, "bf16": {"dtype": torch.bfloat16}, "fp32": {"dtype": torch.float32},
              "auto": {"dtype": "auto"}, "int8": {"quantization": "int8"}}[case]
    return KimiVLForConditionalGeneration.from_pretrained(directory, **kwargs)


def child(case: str, directory: Path) -> dict[str, Any]:
    """One measurement, in this (fresh) process; returns the JSON record."""
    import torch

    torch.set_num_threads(1)  # conversion threads are not what is measured; keeps the shared host calm
    if case == "transformers_bf16":  # import everything the call needs before the baseline is taken
        import transformers  # noqa: F401
        from transformers import DeepseekV3ForCausalLM  # noqa: F401

        from benchmarks.slice import text_only_dir

        text_only_dir(directory)
    else:
        import kimivl  # noqa: F401
    torch.ones(1).sum()  # lazily created thread pools and allocator state before the baseline
    before = _status()
    reset = _reset_peak()
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sampler = _Sampler()
    sampler.start()
    t0 = time.perf_counter()
    model = _load(case, directory)
    load_s = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    peak = _status()["VmHWM"] if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    after = _status()
    tensors = [t for t in model.state_dict().values() if not t.is_meta]
    if case == "meta_build":
        return {"case": case, "peak_mib": round((peak - before["VmRSS"]) / MiB, 1), "load_s": round(load_s, 2)}
    loaded = sum(t.numel() * t.element_size() for t in tensors)
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in tensors})
    _touch(tensors)
    touched = _status()
    peak_all = touched["VmHWM"] if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    base = before["VmRSS"]
    return {
        "case": case, "loaded_bytes": loaded, "loaded_mib": round(loaded / MiB, 1), "dtypes": dtypes,
        "load_s": round(load_s, 2),
        "peak_ratio": round((peak - base) / loaded, 3),
        "after_load_ratio": round((after["VmRSS"] - base) / loaded, 3),
        "after_touch_ratio": round((touched["VmRSS"] - base) / loaded, 3),
        "peak_through_first_use_ratio": round((peak_all - base) / loaded, 3),
        "mib": {
            "before": round(base / MiB), "peak": round(peak / MiB), "peak_through_first_use": round(peak_all / MiB),
            "sampled_peak_anon": round((sampler.peak["RssAnon"] - before["RssAnon"]) / MiB),
            "sampled_peak_file": round((sampler.peak["RssFile"] - before["RssFile"]) / MiB),
            "after_load_anon": round((after["RssAnon"] - before["RssAnon"]) / MiB),
            "after_load_file": round((after["RssFile"] - before["RssFile"]) / MiB),
            "after_touch_anon": round((touched["RssAnon"] - before["RssAnon"]) / MiB),
            "after_touch_file": round((touched["RssFile"] - before["RssFile"]) / MiB),
        },
        "peak_source": "VmHWM (reset by clear_refs)" if reset else f"ru_maxrss (before: {maxrss_before // MiB} MiB)",
    }


def run_case(case: str, directory: Path, meter: CpuMeter) -> dict[str, Any]:
    """Run ``case`` in a fresh interpreter (nice'd like its parent) and parse its JSON line."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    cmd = [sys.executable, "-m", "benchmarks.bench_load", "--child", case, "--dir", str(directory)]
    meter.wait_quiet()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"case": case, "error": proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", choices=["all", "bf16", "fp32", "auto", "int8"], default="all",
                   help="which load dtype to measure besides the default call (all: every case)")
    p.add_argument("--text-layers", type=int, default=None,
                   help="decoder depth of the synthetic slice (2: ~1.5 GB bf16)")
    p.add_argument("--vision-layers", type=int, default=None, help="MoonViT depth of the synthetic slice (4)")
    p.add_argument("--no-peer", action="store_true", help="skip transformers")
    p.add_argument("--no-default", action="store_true",
                   help="skip the stored-dtype load (a checkpoint too large to load unquantized here)")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    from benchmarks.slice import add_checkpoint_arguments, checkpoint_from_args, text_only_dir, weight_bytes

    add_checkpoint_arguments(p)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, Path(args.dir))))
        return

    directory, _ = checkpoint_from_args(p, args, text_layers=args.text_layers, vision_layers=args.vision_layers)
    cases = ["meta_build"] + ([] if args.no_default else ["default"]) \
        + (["bf16", "fp32", "auto", "int8"] if args.dtype == "all" else [args.dtype])
    if not args.no_peer:
        text_only_dir(directory)
        cases.append("transformers_bf16")
    meter = CpuMeter()
    results = {case: run_case(case, directory, meter) for case in cases}
    # Building the model on meta imports torch's Python meta kernels (sympy, mpmath, ...: ~70 MB, once per
    # process, whatever the model size); shown separately so the weight-proportional part is visible too.
    fixed = results.pop("meta_build", {}).get("peak_mib")
    for case, r in results.items():
        if fixed is not None and "error" not in r and case != "transformers_bf16":
            r["peak_ratio_excluding_meta_build"] = round(
                (r["mib"]["peak_through_first_use"] - r["mib"]["before"] - fixed) * MiB / r["loaded_bytes"], 3)
    # int8 quantizes each weight from one float32 copy as it is read: the loaded bytes plus that copy of the
    # largest weight, reported apart (its ratio on a small slice says little about a 16 GiB model)
    ours = [r["peak_through_first_use_ratio"] for c, r in results.items()
            if c not in ("transformers_bf16", "int8") and "error" not in r]
    if "error" not in results.get("int8", {"error": 1}):
        r = results["int8"]
        r["peak_over_loaded_mib"] = round(r["mib"]["peak_through_first_use"] - r["mib"]["before"]
                                          - r["loaded_bytes"] / MiB, 1)
    emit({
        "benchmark": "load_memory",
        "checkpoint": str(directory.relative_to(REPO)) if directory.is_relative_to(REPO) else str(directory),
        "checkpoint_bytes": weight_bytes(directory), "target_ratio": 1.1,
        "worst_ratio_kimivl": max(ours) if ours else None, "meta_build_mib": fixed, "cases": results,
        **meter.report(), "machine": machine_info(1),
    }, args.out)


if __name__ == "__main__":
    main()
