"""Decoder / generation benchmark at the real width, through the public API, side by side with the peers.

    python -m benchmarks.bench_decoder                       # bf16, contexts 128 1024 4096 16384
    python -m benchmarks.bench_decoder --dtype fp32 --contexts 128 1024 --no-llamacpp

All implementations read the same weights: the synthetic real-width slice of :mod:`benchmarks.slice`
(official layout; hidden 2048, MLA 512/64/128, layer 0 dense 11264, layer 1 MoE 64 x 1408 top-6 + 2 shared), or
any official-layout checkpoint given as ``--checkpoint DIR`` (e.g. the released model cut to a few layers);
``--seed N`` draws other prompts (and other synthetic weights):

* ``kimivl``: ``KimiVLForConditionalGeneration.from_pretrained(slice, dtype=...)`` and ``model.generate``;
* ``transformers``: ``DeepseekV3ForCausalLM.from_pretrained`` on the same tensors (text keys without
  ``language_model.``) and its ``generate`` (greedy, ``min_new_tokens`` so it never stops early);
* ``kimivl_int8`` (``--quantization int8``): the same with the decoder's linear layers in weight-only int8
  (:mod:`kimivl.quantization.int8`), to read against llama.cpp's Q8_0 (also 8-bit weights, but per block of 32 with
  int8 products on quantized activations);
* ``llamacpp`` (optional): the slice converted to GGUF (``--dtype``: bf16 or f32, and Q8_0 for reference) and
  ``llama-bench``
  (see :mod:`benchmarks.peers.llamacpp`); skipped with the reason when it cannot be built here.

Measured, medians of ``--repeats`` rounds, 1 sequence; each round runs every implementation once (prefill, then
each context with kimivl and transformers alternating) and then ``llama-bench -r 1`` once per GGUF type, so a
slow phase of a shared host weighs on every column alike:

* prefill tokens/s: a ``--prefill-len`` prompt to its first new token (time to first token through
  ``generate``; llama.cpp: ``llama-bench -p``);
* decode tokens/s at each context: a prompt of ``ctx`` tokens, ``--new-tokens`` greedy tokens, rate
  between the first and the last new token (a streamer timestamps each token; llama.cpp: ``-n`` at depth
  ``-d ctx``);
* cache bytes per token (ours: the latent cache; transformers: its cache tensors after the prompt);
* roofline fractions: decode bytes per token (the weights a token touches + the latent cache read at that
  context) over the measured read bandwidth; prefill FLOPs per token over the measured GEMM peak.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import CpuMeter, StepClock, dtype_of, emit, machine_info, measure_bandwidth, measure_gemm, ratios
from benchmarks.slice import add_checkpoint_arguments, checkpoint_from_args, moe_layer_indices, text_only_dir


def prompt(n: int, cfg: dict[str, Any], seed: int) -> torch.Tensor:
    """``n`` random ids from 300 up to below the special ids (the text model's begin / end / pad ids and the image
    placeholder) and the vocabulary's last 300, so nothing ends a turn or asks for an image."""
    text = cfg["text_config"]
    ids = [text.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")] + [
        cfg.get("media_placeholder_token_id")]
    flat = [v for i in ids for v in (i if isinstance(i, list) else [i])]
    high = min([text["vocab_size"] - 300, *(v for v in flat if isinstance(v, int) and v > 600)])
    return torch.randint(300, high, (1, n), generator=torch.Generator().manual_seed(seed))


class Ours:
    name = "kimivl"

    def __init__(self, directory: Path, dtype: torch.dtype, quantization: str | None = None) -> None:
        from kimivl import KimiVLForConditionalGeneration

        self.model = KimiVLForConditionalGeneration.from_pretrained(directory, dtype=dtype,
                                                                   quantization=quantization).eval()
        if quantization:
            self.name = f"kimivl_{quantization}"

    def run(self, ids: torch.Tensor, new: int) -> list[float]:
        clock = StepClock()
        start = time.perf_counter()
        self.model.generate(input_ids=ids, max_new_tokens=new, do_sample=False, eos_token_id=[], streamer=clock)
        return [start] + clock.times[1:]  # the first put is the prompt

    def cache_bytes_per_token(self) -> int:
        from kimivl.decoder import MLACache
        from kimivl.decoder.cache import latent_cache_dtype

        dtype = latent_cache_dtype(self.model.dtype, "cpu")  # the dtype generate() allocates here
        return MLACache.from_config(self.model.config.text_config, 1, 1, dtype=dtype).bytes_per_token()


class Transformers:
    name = "transformers"

    def __init__(self, directory: Path, dtype: torch.dtype) -> None:
        import transformers

        self.model = transformers.DeepseekV3ForCausalLM.from_pretrained(str(directory), dtype=dtype).eval()
        self.version = transformers.__version__

    def run(self, ids: torch.Tensor, new: int) -> list[float]:
        clock = StepClock()
        start = time.perf_counter()
        self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                            do_sample=False, streamer=clock, pad_token_id=0)
        return [start] + clock.times[1:]

    def cache_bytes_per_token(self, ids: torch.Tensor) -> int:
        out = self.model(ids, use_cache=True)
        cache = out.past_key_values
        tensors = [t for layer in cache.layers for t in (layer.keys, layer.values) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors) // ids.shape[1]


def decode_bytes_per_token(cfg: dict[str, Any], dtype_bytes: int, ctx: int) -> int:
    """Weights one decoded token reads (attention, dense MLP or top-k + shared experts, router, head, one
    embedding row) plus the latent cache of ``ctx`` tokens."""
    t = cfg["text_config"]
    h, heads = t["hidden_size"], t["num_attention_heads"]
    qk = t["qk_nope_head_dim"] + t["qk_rope_head_dim"]
    q = h * heads * qk if not t.get("q_lora_rank") else t["q_lora_rank"] * (h + heads * qk)
    attn = q + h * (t["kv_lora_rank"] + t["qk_rope_head_dim"]) \
        + t["kv_lora_rank"] * heads * (t["qk_nope_head_dim"] + t["v_head_dim"]) + heads * t["v_head_dim"] * h
    dense, moe = mlp_active_params(t, moe=False), mlp_active_params(t, moe=True)
    layers = t["num_hidden_layers"]
    n_moe = len(moe_layer_indices(t))
    params = layers * attn + (layers - n_moe) * dense + n_moe * moe + h * t["vocab_size"] + h
    cache = layers * (t["kv_lora_rank"] + t["qk_rope_head_dim"]) * ctx
    return (params + cache) * dtype_bytes


def int8_bytes_per_token(cfg: dict[str, Any], dtype_bytes: int, ctx: int) -> int:
    """:func:`decode_bytes_per_token` with the int8 layers' weights at one byte (lm_head, kv_b_proj, the embedding row,
    the router and the cache stay ``dtype_bytes``; the scales are noise)."""
    t = cfg["text_config"]
    h, heads, layers = t["hidden_size"], t["num_attention_heads"], t["num_hidden_layers"]
    kept = layers * t["kv_lora_rank"] * heads * (t["qk_nope_head_dim"] + t["v_head_dim"]) + h * t["vocab_size"] + h
    n_moe = len(moe_layer_indices(t))
    kept += n_moe * t.get("n_routed_experts", 0) * h  # the router
    whole = decode_bytes_per_token(cfg, dtype_bytes, ctx)
    return whole - (whole // dtype_bytes - kept - layers * (t["kv_lora_rank"] + t["qk_rope_head_dim"]) * ctx) \
        * (dtype_bytes - 1)


def mlp_active_params(t: dict[str, Any], moe: bool) -> int:
    """Weights one token multiplies in a layer's MLP: dense, or top-k + shared experts and the router."""
    h = t["hidden_size"]
    if not moe:
        return 3 * h * t["intermediate_size"]
    return 3 * h * t["moe_intermediate_size"] * (t["num_experts_per_tok"] + (t.get("n_shared_experts") or 0)) \
        + h * (t.get("n_routed_experts") or 0)


def prefill_flops_per_token(cfg: dict[str, Any], ctx: int) -> float:
    """2 x active parameters (head only for the last token: ignored) + attention scores and values, over a prompt
    of ``ctx`` tokens: the last layer's MLP runs for the last position only (kimivl's prefill and llama.cpp's
    prompt processing both skip it for the others)."""
    t = cfg["text_config"]
    per = decode_bytes_per_token(cfg, 1, 0) - t["hidden_size"] * (t["vocab_size"] + 1)
    last_moe = t["num_hidden_layers"] - 1 in moe_layer_indices(t)
    per -= mlp_active_params(t, moe=last_moe) * (ctx - 1) / ctx
    layers, heads = t["num_hidden_layers"], t["num_attention_heads"]
    attn = 2 * layers * heads * (t["qk_nope_head_dim"] + t["qk_rope_head_dim"] + t["v_head_dim"]) * ctx / 2
    return 2.0 * per + attn


def timed_result(meter: CpuMeter, fn: Any) -> Any:
    """``fn()`` timed under ``meter`` (its quiet wait and foreign-load check; a peer's run in its own process
    counts as ours, a waited-for child); returns what ``fn`` returns."""
    holder: dict[str, Any] = {}
    meter.timed(lambda: holder.setdefault("r", fn()))
    return holder["r"]


def one_run(meter: CpuMeter, impl: Any, ids: torch.Tensor, new: int) -> tuple[float, float]:
    """(seconds to the first new token, decode tokens/s between the first and last token; nan for one token)."""
    t = timed_result(meter, lambda: impl.run(ids, new))
    return t[1] - t[0], (len(t) - 2) / (t[-1] - t[1]) if len(t) > 2 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 4096, 16384])
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--text-layers", type=int, default=None, help="decoder layers of the synthetic slice (2)")
    add_checkpoint_arguments(parser)
    parser.add_argument("--quantization", choices=["int8"], default=None,
                        help="also run kimivl with the decoder's linear layers quantized (row kimivl_int8)")
    parser.add_argument("--only-quantized", action="store_true",
                        help="with --quantization: skip the unquantized kimivl (a checkpoint too large to load "
                             "unquantized here)")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--no-llamacpp", action="store_true")
    parser.add_argument("--transformers-max-context", type=int, default=4096,
                        help="skip transformers above this context (it re-expands the whole cache every step)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    dtype = dtype_of(args.dtype)
    directory, cfg = checkpoint_from_args(parser, args, text_layers=args.text_layers)
    text = cfg["text_config"]
    meter = CpuMeter()
    result: dict[str, Any] = {"benchmark": "decoder", "machine": machine_info(args.threads), "dtype": args.dtype,
                              "checkpoint": str(directory), "config": {k: cfg["text_config"][k] for k in (
                                  "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                                  "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "intermediate_size",
                                  "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok",
                                  "n_shared_experts", "vocab_size", "q_lora_rank") if k in text},
                              "seed": args.seed}
    limits = {"read_bandwidth_gb_s": round(measure_bandwidth(meter), 1),
              "gemm_gflop_s": round(measure_gemm(dtype, meter=meter), 1)}
    result["limits"] = limits
    if args.only_quantized and not args.quantization:
        parser.error("--only-quantized needs --quantization")
    impls: list[Any] = [] if args.only_quantized else [Ours(directory, dtype)]
    if args.quantization:
        impls.append(Ours(directory, dtype, args.quantization))
    if not args.no_transformers:
        try:
            impls.append(Transformers(text_only_dir(directory), dtype))
            result["transformers_version"] = impls[-1].version
        except ImportError as e:
            result["transformers"] = {"skipped": f"transformers not importable: {e}"}

    # llama.cpp's GGUFs first (the same dtype as ours, f32 where this CPU has no fast bf16, and Q8_0 for
    # reference); each type on its own, so one that fails is reported without losing the other
    ggufs: dict[str, Path] = {}
    if not args.no_llamacpp:
        for outtype in ("bf16" if args.dtype == "bf16" else "f32", "q8_0"):
            try:
                from benchmarks.peers import llamacpp

                ggufs[outtype] = llamacpp.convert_text(directory, outtype=outtype)
            except Exception as e:  # optional peer: any failure to build/convert is reported, not fatal
                result.setdefault("llamacpp", {})[outtype] = {"skipped": f"{type(e).__name__}: {e}"}

    with torch.inference_mode():
        # agreement on the same weights: greedy continuations of one prompt
        seed = 1_000_003 * args.seed  # the prompts' seeds: 1, 2, 3, ctx at --seed 0 (the documented runs)
        ids = prompt(64, cfg, seed=seed + 1)
        outs = {impl.name: (impl.model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, eos_token_id=[])
                            if isinstance(impl, Ours) else
                            impl.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                                min_new_tokens=8, do_sample=False, pad_token_id=0))[0, 64:]
                for impl in impls}
        for other in outs.keys() - {"kimivl"} if "kimivl" in outs else ():
            key = "agreement_greedy_tokens_equal_of_8" + ("" if other == "transformers" else f"_{other}")
            result[key] = int((outs["kimivl"] == outs[other]).cumprod(0).sum())

        prefill_ids = prompt(args.prefill_len, cfg, seed=seed + 2)
        context_ids = {ctx: prompt(ctx, cfg, seed=seed + ctx) for ctx in args.contexts}
        ttfts: dict[str, list[float]] = {impl.name: [] for impl in impls}
        rates: dict[int, dict[str, list[float]]] = {ctx: {} for ctx in args.contexts}
        peer_runs: dict[str, list[dict[str, Any]]] = {outtype: [] for outtype in ggufs}
        # --repeats rounds, each running every implementation once and then llama-bench once per type: a slow
        # phase of a shared host (they last minutes) then lands on every column, not on one peer's whole run
        for _ in range(args.repeats):
            for impl in impls:
                ttfts[impl.name].append(one_run(meter, impl, prefill_ids, 1)[0])
            for ctx in args.contexts:
                for impl in impls:
                    if impl.name == "transformers" and ctx > args.transformers_max_context:
                        continue
                    rate = one_run(meter, impl, context_ids[ctx], args.new_tokens)[1]
                    rates[ctx].setdefault(impl.name, []).append(rate)
            for outtype in list(peer_runs):
                try:
                    peer_runs[outtype].append(timed_result(meter, lambda: llamacpp.bench_text(
                        ggufs[outtype], threads=args.threads, prompt=args.prefill_len, gen=args.new_tokens,
                        depths=tuple(args.contexts), repetitions=1)))
                except Exception as e:  # reported, not fatal; the type leaves the next rounds
                    result.setdefault("llamacpp", {})[outtype] = {"skipped": f"{type(e).__name__}: {e}"}
                    del peer_runs[outtype]
        prefill = {name: args.prefill_len / statistics.median(times) for name, times in ttfts.items()}
        decode = {str(ctx): {name: statistics.median(values) for name, values in by_impl.items()}
                  for ctx, by_impl in rates.items()}
        cache = {"kimivl": impls[0].cache_bytes_per_token()}  # (the same latent cache with int8 weights)
        for impl in impls:
            if impl.name == "transformers":
                cache["transformers"] = impl.cache_bytes_per_token(prompt(128, cfg, seed=seed + 3))

    for outtype, runs in peer_runs.items():
        key = f"llamacpp_{outtype}"
        prefill[key] = statistics.median(run["prefill_tok_s"] for run in runs)
        for ctx in args.contexts:
            values = [run["decode_tok_s"][str(ctx)] for run in runs if str(ctx) in run["decode_tok_s"]]
            if values:
                decode[str(ctx)][key] = statistics.median(values)
        result.setdefault("llamacpp", {})[outtype] = {
            **{k: runs[0][k] for k in ("command", "flash_attn", "kv_type", "repack_off_because") if k in runs[0]},
            "by_depth_per_round": [{depth: {kind: v["mean"] for kind, v in kinds.items()}
                                    for depth, kinds in run["by_depth"].items()} for run in runs]}

    dtype_bytes = torch.finfo(dtype).bits // 8
    result["prefill"] = {"tokens": args.prefill_len, **{f"{k}_tok_s": round(v, 1) for k, v in prefill.items()},
                         **ratios(prefill),
                         **({} if "kimivl" not in prefill else {"kimivl_fraction_of_gemm_roof": round(
                             prefill["kimivl"] * prefill_flops_per_token(cfg, args.prefill_len) / 1e9
                             / limits["gemm_gflop_s"], 3)}),
                         **({f"kimivl_{args.quantization}_{k}": v for k, v in ratios(
                             prefill, ours=f"kimivl_{args.quantization}").items()} if args.quantization else {})}
    result["decode"] = {}
    for ctx, rates in decode.items():
        bytes_tok = decode_bytes_per_token(cfg, dtype_bytes, int(ctx))
        bound = limits["read_bandwidth_gb_s"] * 1e9 / bytes_tok
        result["decode"][ctx] = {**{f"{k}_tok_s": round(v, 2) for k, v in rates.items()}, **ratios(rates),
                                 "bytes_per_token": bytes_tok, "bandwidth_bound_tok_s": round(bound, 1)}
        if "kimivl" in rates:
            result["decode"][ctx]["kimivl_fraction_of_bound"] = round(rates["kimivl"] / bound, 3)
        if args.quantization and f"kimivl_{args.quantization}" in rates:
            # the quantized row against the 8-bit peer, and against its own bound (int8 weights: 1 byte each)
            ours8 = f"kimivl_{args.quantization}"
            result["decode"][ctx].update({f"{ours8}_{k}": v for k, v in ratios(rates, ours=ours8).items()})
            bound8 = limits["read_bandwidth_gb_s"] * 1e9 / int8_bytes_per_token(cfg, dtype_bytes, int(ctx))
            result["decode"][ctx][f"{ours8}_fraction_of_bound"] = round(rates[ours8] / bound8, 3)
    result["cache_bytes_per_token"] = {**cache, "latent_formula": (
        cfg["text_config"]["kv_lora_rank"] + cfg["text_config"]["qk_rope_head_dim"])
        * cfg["text_config"]["num_hidden_layers"] * dtype_bytes}
    result.update(meter.report())
    emit(result, args.out)


if __name__ == "__main__":
    main()
