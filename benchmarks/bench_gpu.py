"""The suite's GPU rows (one CUDA device): vision tower, decoder / generation, MoE layer, end to end.

    python -m benchmarks.bench_gpu --out runs/bench/gpu.json            # everything, bf16
    python -m benchmarks.bench_gpu --only decoder --contexts 128 4096

The same real-width slice as the CPU benchmarks (:mod:`benchmarks.slice`: hidden 2048, MLA 512/64/128,
layer 0 dense 11264, layer 1 MoE 64 x 1408 top-6 + 2 shared; MoonViT 1152 x 16 heads, 4 layers), bf16, on
``cuda:0``. Each section records its own error instead of ending the run. Timings are medians of CUDA-event
(or synchronised wall-clock) measurements after warm-up.

* ``limits``: device-to-device copy bandwidth (bytes read + written) and an 8192^3 bf16 GEMM.
* ``vision``: tower + projector on the mixed 6-image batch (6,660 patches) with each attention backend:
  ``varlen`` (PyTorch's flash varlen kernel), ``flash`` (the flash-attn package, when installed), ``sdpa``
  (one SDPA per image) and ``dense_mask`` (the official code's one SDPA over a dense (L, L) block mask);
  patches/s, useful TFLOP/s, agreement with ``sdpa``, peak memory as the largest image grows.
* ``decoder``: ``model.generate`` through the public API: prefill tokens/s (``--prefill-len`` prompt) and
  decode tokens/s at each context with the captured CUDA graphs (default) and without
  (``KIMIVL_CUDA_GRAPHS=0``), and transformers' ``DeepseekV3ForCausalLM`` on the same weights; roofline =
  bytes a token reads / copy bandwidth.
* ``moe``: the MoE layer for 1 ... 4096 tokens, ours against transformers' on the same weights, and the
  roofline (touched expert bytes / bandwidth, FLOPs / GEMM peak).
* ``e2e``: the shipped demo model and the slice, one image, messages to the last token (TTFT, tokens/s).
* ``profile``: the kernels of a prefill and 4 graph-replayed decode steps (count, top kernels by GPU time).
* ``compiled``: decode with ``KIMIVL_COMPILE_DECODE=1`` (inductor before capture) and its first-call time.

``--device cpu`` (hidden) runs the script's Python on the CPU as a dry run before spending device time.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench_decoder import prompt
from benchmarks.common import StepClock, emit

DEVICE = "cuda"


def cuda_time(fn: Callable[[], Any], repeats: int = 10, warmup: int = 2) -> float:
    """Median seconds of ``fn`` between CUDA events (wall clock for a ``--device cpu`` dry run)."""
    for _ in range(warmup):
        fn()
    if DEVICE == "cpu":
        return statistics.median(_wall(fn) for _ in range(repeats))
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def _wall(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _sync() -> None:
    if DEVICE != "cpu":
        torch.cuda.synchronize()


def graph_time(fn: Callable[[], Any], repeats: int = 20) -> float:
    """Median seconds of one replay of ``fn`` captured in a CUDA graph (no launch overhead)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return cuda_time(graph.replay, repeats=repeats, warmup=3)


def limits() -> dict[str, float]:
    if DEVICE == "cpu":
        return {"copy_gb_s": 20.0, "bf16_gemm_tflop_s": 0.1}
    x = torch.empty(2 * 2**30 // 2, dtype=torch.bfloat16, device=DEVICE).normal_()
    y = torch.empty_like(x)
    copy = cuda_time(lambda: y.copy_(x))
    a = torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16)
    gemm = cuda_time(lambda: a @ b, repeats=10)
    del x, y, a, b
    torch.cuda.empty_cache()
    return {"copy_gb_s": round(2 * 2**31 / copy / 1e9, 1), "bf16_gemm_tflop_s": round(2 * 8192**3 / gemm / 1e12, 1)}


# --------------------------------------------------------------------------------------------- vision
def bench_vision(directory: Path, text_hidden: int, lim: dict[str, float], repeats: int) -> dict[str, Any]:
    from benchmarks.bench_vision import (MEMORY_BASE, MEMORY_SIDES, MIXED_SIZES, official_dense_attention,
                                         preprocess, synthetic_images, vision_flops)
    from benchmarks.bench_vision import load_vision
    from kimivl.ops.attention import resolve_backend

    tower, projector, _ = load_vision(directory, torch.bfloat16)
    tower, projector = tower.to(DEVICE), projector.to(DEVICE)
    cfg = tower.config
    pixels, grid = preprocess(directory, synthetic_images(MIXED_SIZES))
    pixels = pixels.to(DEVICE)
    flops = vision_flops(grid, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.patch_size,
                         text_hidden)
    useful = flops["linear"] + flops["attention"]
    out: dict[str, Any] = {"patches": int(pixels.shape[0]), "images": [list(s) for s in MIXED_SIZES],
                           "auto_backend": resolve_backend("auto", torch.empty(1, 1, 1, dtype=torch.bfloat16, device=DEVICE))}
    results: dict[str, torch.Tensor] = {}

    def run(name: str, fn: Callable[[], torch.Tensor]) -> None:
        try:
            with torch.inference_mode():
                results[name] = fn()
                seconds = cuda_time(fn, repeats=repeats)
            out[name] = {"ms": round(seconds * 1e3, 3), "patches_s": round(pixels.shape[0] / seconds),
                         "useful_tflop_s": round(useful / seconds / 1e12, 1)}
        except Exception as e:  # a backend that is not installed or not supported here
            out[name] = {"skipped": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}

    for backend in ("varlen", "flash", "sdpa"):
        tower.attn_backend = backend
        run(backend, lambda: projector(tower(pixels, grid)))
    tower.attn_backend = "sdpa"
    with official_dense_attention():
        run("dense_mask", lambda: projector(tower(pixels, grid)))
    ref = results.get("sdpa")
    for name, value in results.items():
        if ref is not None and name != "sdpa":
            out[name]["rel_diff_vs_sdpa"] = float((value.float() - ref.float()).norm() / ref.float().norm())
    best = min((v["ms"] for k, v in out.items() if isinstance(v, dict) and "ms" in v and k != "dense_mask"),
               default=None)
    if best and "ms" in out.get("dense_mask", {}):
        out["best_vs_dense_mask"] = round(out["dense_mask"]["ms"] / best, 2)
    # peak memory as the largest image grows: per-image attention stays linear, the dense mask grows as L^2
    memory = {}
    for side in MEMORY_SIDES:
        pv, gr = preprocess(directory, synthetic_images([*MEMORY_BASE, (side, side)]))
        pv = pv.to(DEVICE)
        row = {"patches": int(pv.shape[0])}
        for name in ("varlen", "sdpa", "dense_mask"):
            tower.attn_backend = "sdpa" if name == "dense_mask" else name
            if DEVICE == "cpu":
                continue
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            try:
                with torch.inference_mode():
                    if name == "dense_mask":
                        with official_dense_attention():
                            projector(tower(pv, gr))
                    else:
                        projector(tower(pv, gr))
                row[f"{name}_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
            except Exception as e:
                row[f"{name}_mib"] = f"{type(e).__name__}"
        memory[f"{side}x{side}"] = row
    out["peak_memory_above_weights"] = memory
    out["limits"] = lim
    return out


# -------------------------------------------------------------------------------------------- decoder
def _generate_times(model: Any, ids: torch.Tensor, new: int, **kwargs: Any) -> list[float]:
    clock = StepClock()
    _sync()
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=new, do_sample=False, streamer=clock, **kwargs)
    return [start] + clock.times[1:]


def _rates(run: Callable[[], list[float]], repeats: int) -> tuple[float, float]:
    """(median seconds to the first token, median tokens/s between the first and the last token)."""
    run()  # warm-up (captures the graphs of this shape)
    ttft, rate = [], []
    for _ in range(repeats):
        t = run()
        ttft.append(t[1] - t[0])
        rate.append((len(t) - 2) / (t[-1] - t[1]))
    return statistics.median(ttft), statistics.median(rate)


def bench_decoder(directory: Path, cfg: dict[str, Any], lim: dict[str, float], contexts: list[int],
                  prefill_len: int, new: int, repeats: int, peer: bool) -> dict[str, Any]:
    from benchmarks.bench_decoder import decode_bytes_per_token, prefill_flops_per_token
    from benchmarks.slice import text_only_dir
    from kimivl import KimiVLForConditionalGeneration
    from kimivl.generation import cuda_graph

    model = KimiVLForConditionalGeneration.from_pretrained(directory, dtype=torch.bfloat16, device=DEVICE).eval()
    impls: dict[str, Callable[[torch.Tensor, int], list[float]]] = {}

    def ours(graphs: bool) -> Callable[[torch.Tensor, int], list[float]]:
        def run(ids: torch.Tensor, n: int) -> list[float]:
            os.environ[cuda_graph.ENV_SWITCH] = "1" if graphs else "0"
            try:
                return _generate_times(model, ids, n, eos_token_id=[])
            finally:
                os.environ.pop(cuda_graph.ENV_SWITCH, None)
        return run

    impls["kimivl"] = ours(True)
    impls["kimivl_eager"] = ours(False)
    out: dict[str, Any] = {"dtype": "bf16", "text_layers": cfg["text_config"]["num_hidden_layers"]}
    if peer:
        try:
            import transformers

            hf = transformers.DeepseekV3ForCausalLM.from_pretrained(str(text_only_dir(directory)),
                                                                    dtype=torch.bfloat16).to(DEVICE).eval()
            impls["transformers"] = lambda ids, n: _generate_times(
                hf, ids.to(DEVICE), n, attention_mask=torch.ones_like(ids, device=DEVICE), min_new_tokens=n,
                pad_token_id=0)
            out["transformers_version"] = transformers.__version__
        except Exception as e:
            out["transformers"] = {"skipped": f"{type(e).__name__}: {e}"}

    prefill = {}
    ids = prompt(prefill_len, cfg, 0)
    for name, impl in impls.items():
        try:
            # a 2-layer prefill takes a few ms on a GPU: 3 runs gave medians 1.3-1.5x apart between the graph and
            # eager runs of the same prefill code (twenty-second session)
            ttft, _ = _rates(lambda: impl(ids, 2), max(repeats, 15))
            prefill[name] = {"ttft_s": round(ttft, 4), "tok_s": round(prefill_len / ttft)}
        except Exception as e:
            prefill[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    flops = prefill_flops_per_token(cfg, prefill_len) * prefill_len
    for row in prefill.values():
        if "ttft_s" in row:
            row["x_gemm_roofline"] = round(row["ttft_s"] / (flops / (lim["bf16_gemm_tflop_s"] * 1e12)), 1)
    out["prefill"] = prefill
    decode = {}
    for ctx in contexts:
        ids = prompt(ctx, cfg, ctx)
        row: dict[str, Any] = {}
        bound = decode_bytes_per_token(cfg, 2, ctx) / (lim["copy_gb_s"] * 1e9)
        for name, impl in impls.items():
            if name == "transformers" and ctx > 4096:
                continue
            try:
                _, rate = _rates(lambda: impl(ids, new), repeats)
                row[name] = {"tok_s": round(rate, 1), "fraction_of_roofline": round(rate * bound, 3)}
            except Exception as e:
                row[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        for peer_name in ("kimivl_eager", "transformers"):
            if "tok_s" in row.get(peer_name, {}) and "tok_s" in row.get("kimivl", {}):
                row[f"vs_{peer_name}"] = round(row["kimivl"]["tok_s"] / row[peer_name]["tok_s"], 2)
        row["roofline_tok_s"] = round(1 / bound)
        decode[str(ctx)] = row
    out["decode"] = decode
    return out


def bench_compiled(directory: Path, cfg: dict[str, Any], lim: dict[str, float], contexts: list[int], new: int,
                   repeats: int) -> dict[str, Any]:
    """Decode with ``KIMIVL_COMPILE_DECODE=1``: the graph step compiled by inductor before capture (opt-in);
    ``first_call_s`` is the first generate call of the run (the compilation)."""
    from benchmarks.bench_decoder import decode_bytes_per_token
    from kimivl import KimiVLForConditionalGeneration
    from kimivl.generation import cuda_graph

    model = KimiVLForConditionalGeneration.from_pretrained(directory, dtype=torch.bfloat16, device=DEVICE).eval()
    os.environ[cuda_graph.COMPILE_SWITCH] = "1"
    cuda_graph._RUNNERS.clear()
    out: dict[str, Any] = {}
    try:
        for ctx in contexts:
            ids = prompt(ctx, cfg, ctx)
            t0 = time.perf_counter()
            first = _generate_times(model, ids, new, eos_token_id=[])
            row = {"first_call_s": round(time.perf_counter() - t0, 1)}
            _, rate = _rates(lambda: _generate_times(model, ids, new, eos_token_id=[]), repeats)
            bound = decode_bytes_per_token(cfg, 2, ctx) / (lim["copy_gb_s"] * 1e9)
            row.update({"tok_s": round(rate, 1), "fraction_of_roofline": round(rate * bound, 3),
                        "first_call_tok_s": round((len(first) - 2) / (first[-1] - first[1]), 1)})
            out[str(ctx)] = row
    finally:
        os.environ.pop(cuda_graph.COMPILE_SWITCH, None)
        cuda_graph._RUNNERS.clear()
    return out


def profile_decode(directory: Path, cfg: dict[str, Any], steps: int = 4) -> dict[str, Any]:
    """Kernels of one decode step (context 1K), from the profiler over ``steps`` steps replayed from graphs:
    how many there are and where the time goes (the next fusion targets)."""
    from torch.profiler import ProfilerActivity, profile

    from kimivl import KimiVLForConditionalGeneration

    model = KimiVLForConditionalGeneration.from_pretrained(directory, dtype=torch.bfloat16, device=DEVICE).eval()
    ids = prompt(1024, cfg, 1)
    model.generate(ids, max_new_tokens=steps + 1, do_sample=False, eos_token_id=[])  # captures the graphs
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model.generate(ids, max_new_tokens=steps + 1, do_sample=False, eos_token_id=[])
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name[:90], []).append(e.device_time)
    total = sum(sum(v) for v in by_name.values())
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:15]
    return {"kernels_total": len(kernels), "gpu_us_total": round(total, 1), "note": "prefill + %d steps" % steps,
            "top": [{"kernel": k, "calls": len(v), "us": round(sum(v), 1)} for k, v in top]}


# ------------------------------------------------------------------------------------------------ MoE
def bench_moe(directory: Path, cfg: dict[str, Any], lim: dict[str, float], tokens: list[int],
              peer: bool) -> dict[str, Any]:
    from benchmarks.bench_moe import roofline_seconds
    from benchmarks.slice import text_only_dir
    from kimivl import KimiVLForConditionalGeneration
    from kimivl.ops.moe import moe_gathered, moe_grouped

    model = KimiVLForConditionalGeneration.from_pretrained(directory, dtype=torch.bfloat16, device=DEVICE)
    layers = {"kimivl": model.language_model.model.layers[1].mlp.eval()}
    out: dict[str, Any] = {}
    if peer:
        try:
            import transformers

            hf = transformers.DeepseekV3ForCausalLM.from_pretrained(str(text_only_dir(directory)),
                                                                    dtype=torch.bfloat16).to(DEVICE)
            layers["transformers"] = hf.model.layers[1].mlp.eval()
            out["transformers_experts_implementation"] = getattr(hf.config, "_experts_implementation", None)
        except Exception as e:
            out["transformers"] = {"skipped": f"{type(e).__name__}: {e}"}
    g = torch.Generator().manual_seed(0)
    rows = {}
    with torch.inference_mode():
        for n in tokens:
            x = torch.randn(1, n, cfg["text_config"]["hidden_size"], generator=g).to(DEVICE, torch.bfloat16)
            row: dict[str, Any] = {}
            idx, _, _ = layers["kimivl"].gate(x.view(n, -1))
            hit = int(idx.unique().numel())
            for name, layer in layers.items():
                try:
                    row[f"{name}_ms"] = round(cuda_time(lambda: layer(x), repeats=20, warmup=3) * 1e3, 4)
                except Exception as e:
                    row[f"{name}_ms"] = f"{type(e).__name__}: {str(e)[:200]}"
            # the layer replayed from a CUDA graph (as in a captured decode step), and its two sync-free expert
            # paths on their own (the routing precomputed): which one a decode step should take
            ours = layers["kimivl"]
            if DEVICE != "cpu":
                w_idx, w_w, _ = ours.gate(x.view(n, -1))
                stacked = ours.stacked_experts()
                variants = {"experts_grouped": lambda: moe_grouped(x.view(n, -1), w_idx, w_w, *stacked)}
                if n * w_idx.shape[1] <= len(ours.experts):  # the decode-step path, and what a graph replays
                    variants["kimivl_graph"] = lambda: ours(x)
                    variants["experts_gather_graph"] = lambda: moe_gathered(x.view(n, -1), w_idx, w_w, *stacked)
                for name, fn in variants.items():
                    try:
                        timer = graph_time if name.endswith("graph") else (lambda f: cuda_time(f, 20, 3))
                        row[f"{name}_ms"] = round(timer(fn) * 1e3, 4)
                    except Exception as e:
                        row[f"{name}_ms"] = f"{type(e).__name__}: {str(e)[:200]}"
            if "transformers" in layers:
                a, b = layers["kimivl"](x).float(), layers["transformers"](x).float()
                row["rel_diff_vs_transformers"] = float((a - b).norm() / b.norm())
            t_bytes, t_flops = roofline_seconds(cfg, hit, n, 2, lim["copy_gb_s"], lim["bf16_gemm_tflop_s"] * 1e3)
            bound = max(t_bytes, t_flops)
            row.update({"experts_hit": hit, "roofline_ms": round(bound * 1e3, 4),
                        "bound_by": "bandwidth" if t_bytes >= t_flops else "compute"})
            for name in [*layers, "kimivl_graph"]:
                if isinstance(row.get(f"{name}_ms"), float):
                    row[f"{name}_x_roofline"] = round(row[f"{name}_ms"] / 1e3 / bound, 2)
            if isinstance(row.get("transformers_ms"), float) and isinstance(row.get("kimivl_ms"), float):
                row["vs_transformers"] = round(row["transformers_ms"] / row["kimivl_ms"], 2)
            rows[str(n)] = row
    out["tokens"] = rows
    return out


# ------------------------------------------------------------------------------------------------ e2e
def bench_e2e(directory: Path, new: int, repeats: int) -> dict[str, Any]:
    from benchmarks.bench_e2e import DEMO_IMAGE, DEMO_QUESTION, messages, slice_image
    from kimivl import DEMO_MODEL, KimiVLForConditionalGeneration, KimiVLProcessor

    out = {}
    for name, path, image, question, dtype in (
            ("demo", Path(DEMO_MODEL), DEMO_IMAGE, DEMO_QUESTION, "auto"),
            ("slice", directory, slice_image(), "Describe the picture in one sentence.", torch.bfloat16)):
        model = KimiVLForConditionalGeneration.from_pretrained(path, dtype=dtype, device=DEVICE)
        processor = KimiVLProcessor.from_pretrained(path)
        conversation = messages(image, question)

        def once(n: int, stop: bool = False) -> tuple[list[float], Any]:
            clock = StepClock()
            _sync()
            t0 = time.perf_counter()
            inputs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                                   return_dict=True, return_tensors="pt")
            ids = model.generate(**inputs, max_new_tokens=n, do_sample=False, streamer=clock,
                                 **({} if stop else {"eos_token_id": []}))
            return [t0] + clock.times[1:], (inputs, ids)

        _, (inputs, ids) = once(new, stop=True)
        answer = processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
        ttft, rate = _rates(lambda: once(new)[0], repeats)
        out[name] = {"answer": answer, "ttft_s": round(ttft, 4), "decode_tok_s": round(rate, 1),
                     "prompt_tokens": int(inputs["input_ids"].shape[1]), "dtype": str(model.dtype)}
        del model
        if DEVICE != "cpu":
            torch.cuda.empty_cache()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", choices=["vision", "decoder", "moe", "e2e", "profile", "compiled"])
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 4096, 16384])
    p.add_argument("--compiled-contexts", type=int, nargs="+", default=[128, 4096])
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 512, 4096])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # "cpu": a dry run of the script itself
    args = p.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE != "cpu" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu needs a CUDA device")
    from benchmarks.slice import slice_config, write_slice

    directory, cfg = write_slice(), slice_config()
    props = torch.cuda.get_device_properties(0) if DEVICE != "cpu" else None
    result: dict[str, Any] = {"benchmark": "gpu", "device": props.name if props else "cpu (dry run)",
                              "sms": props.multi_processor_count if props else None,
                              "torch": torch.__version__, "cuda": torch.version.cuda}
    result["limits"] = lim = limits()
    sections = args.only or ["vision", "decoder", "moe", "e2e", "profile", "compiled"]
    for name in sections:
        t0 = time.perf_counter()
        try:
            if name == "vision":
                result[name] = bench_vision(directory, cfg["text_config"]["hidden_size"], lim,
                                              args.repeats if DEVICE == "cpu" else max(args.repeats, 5))
            elif name == "decoder":
                result[name] = bench_decoder(directory, cfg, lim, args.contexts, args.prefill_len, args.new_tokens,
                                             args.repeats, not args.no_peer)
            elif name == "compiled":
                result[name] = bench_compiled(directory, cfg, lim, args.compiled_contexts, args.new_tokens,
                                              args.repeats)
            elif name == "profile":
                result[name] = profile_decode(directory, cfg)
            elif name == "moe":
                result[name] = bench_moe(directory, cfg, lim, args.tokens, not args.no_peer)
            else:
                result[name] = bench_e2e(directory, args.new_tokens, args.repeats)
        except Exception:
            result[name] = {"error": traceback.format_exc()[-2000:]}
        result.setdefault("section_seconds", {})[name] = round(time.perf_counter() - t0, 1)
        if DEVICE != "cpu":
            torch.cuda.empty_cache()
        if args.out:  # partial results survive a later failure or a timeout
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    emit(result, args.out)


if __name__ == "__main__":
    main()
