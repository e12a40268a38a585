"""MoE layer at the real width: kimivl against transformers' DeepseekV3MoE on the same weights, and the roofline.

    python -m benchmarks.bench_moe                          # bf16, 1 8 64 512 4096 tokens
    python -m benchmarks.bench_moe --dtype fp32 --tokens 1 8 64

The layer is layer 1 of the real-width slice (:mod:`benchmarks.slice`: 64 routed experts of width 1408,
top-6 ``noaux_tc`` sigmoid routing, 2 shared experts, hidden 2048), or the first MoE layer of the checkpoint
given as ``--checkpoint DIR``, loaded through each library's own ``from_pretrained`` (transformers stacks the
experts into 3-D tensors on load). Both layers get the same hidden states (standard normal, ``--seed``); their
outputs are compared before timing.

Roofline per call: ``max(bytes / bandwidth, flops / gemm_peak)`` with bytes = the weights actually touched
(the distinct routed experts hit by the T tokens, the shared experts, the router) and flops = 2 x the
multiply-adds of the chosen and shared experts; bandwidth and GEMM peak are measured in the same run.
Reported: ms per call (median), ``vs_transformers`` (its time / ours) and ``x_roofline`` (ours / bound).
"""
from __future__ import annotations

import argparse
from typing import Any

import torch

from benchmarks.common import CpuMeter, compare, dtype_of, emit, machine_info, measure_bandwidth, measure_gemm
from benchmarks.slice import add_checkpoint_arguments, checkpoint_from_args, moe_layer_indices, text_only_dir


def roofline_seconds(cfg: dict[str, Any], experts_hit: int, tokens: int, dtype_bytes: int,
                     bandwidth_gb_s: float, gemm_gflop_s: float) -> tuple[float, float]:
    """(seconds to stream the touched weights, seconds of the expert FLOPs at the GEMM peak)."""
    t = cfg["text_config"]
    h, f = t["hidden_size"], t["moe_intermediate_size"]
    expert = 3 * h * f
    shared = t.get("n_shared_experts") or 0
    weights = (experts_hit + shared) * expert + h * t["n_routed_experts"]
    flops = 2.0 * tokens * (t["num_experts_per_tok"] + shared) * expert
    return weights * dtype_bytes / (bandwidth_gb_s * 1e9), flops / (gemm_gflop_s * 1e9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 512, 4096])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--out", default=None)
    add_checkpoint_arguments(parser)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    dtype = dtype_of(args.dtype)
    directory, cfg = checkpoint_from_args(parser, args)
    moe_layers = moe_layer_indices(cfg["text_config"])
    if not moe_layers:
        parser.error(f"{directory}: no MoE layer among its {cfg['text_config']['num_hidden_layers']} decoder layers")
    layer = moe_layers[0]
    meter = CpuMeter()
    bandwidth, gemm = measure_bandwidth(meter), measure_gemm(dtype, meter=meter)

    from kimivl import KimiVLForConditionalGeneration

    model = KimiVLForConditionalGeneration.from_pretrained(directory, dtype=dtype)
    ours = model.language_model.model.layers[layer].mlp
    layers: dict[str, Any] = {"kimivl": ours.eval()}
    result: dict[str, Any] = {"benchmark": "moe_layer", "machine": machine_info(args.threads), "dtype": args.dtype,
                              "checkpoint": str(directory), "layer": layer, "seed": args.seed,
                              "limits": {"read_bandwidth_gb_s": round(bandwidth, 1), "gemm_gflop_s": round(gemm, 1)}}
    if not args.no_transformers:
        try:
            import transformers

            hf = transformers.DeepseekV3ForCausalLM.from_pretrained(str(text_only_dir(directory)), dtype=dtype)
            layers["transformers"] = hf.model.layers[layer].mlp.eval()
            result["transformers"] = {"version": transformers.__version__,
                                      "experts_implementation": hf.config._experts_implementation}
        except ImportError as e:
            result["transformers"] = {"skipped": f"not importable: {e}"}

    rows = {}
    g = torch.Generator().manual_seed(args.seed)
    with torch.inference_mode():
        for n in args.tokens:
            x = torch.randn(1, n, cfg["text_config"]["hidden_size"], generator=g).to(dtype)
            row: dict[str, Any] = {}
            if "transformers" in layers:
                diff = (layers["kimivl"](x).float() - layers["transformers"](x).float()).abs().max().item()
                row["max_abs_diff_vs_transformers"] = diff
            idx, _, _ = ours.gate(x.view(n, -1))
            hit = int(idx.unique().numel())
            seconds = compare(meter, {name: (lambda m=m: m(x)) for name, m in layers.items()}, args.repeats)
            t_bytes, t_flops = roofline_seconds(cfg, hit, n, torch.finfo(dtype).bits // 8, bandwidth, gemm)
            bound = max(t_bytes, t_flops)
            row.update({"experts_hit": hit, **{f"{k}_ms": round(v * 1e3, 3) for k, v in seconds.items()},
                        "roofline_ms": round(bound * 1e3, 3), "bound_by": "bandwidth" if t_bytes >= t_flops else "compute",
                        "kimivl_x_roofline": round(seconds["kimivl"] / bound, 3)})
            if "transformers" in seconds:
                row["vs_transformers"] = round(seconds["transformers"] / seconds["kimivl"], 3)
                row["transformers_x_roofline"] = round(seconds["transformers"] / bound, 3)
            rows[str(n)] = row
    result["tokens"] = rows
    result.update(meter.report())
    emit(result, args.out)


if __name__ == "__main__":
    main()
