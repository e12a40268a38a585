"""Benchmark kimivl's generation loop against transformers' DeepseekV3ForCausalLM on the same text weights.

Spec: ``shared/reference/kimivl-spec.md`` §11 (transformers 5 as a second reference: a ``config.json`` with the
``text_config`` and ``model_type: deepseek_v3``, tensors under the official names without ``language_model.``);
``shared/reference/performance-notes.md`` §2.1-2.3 and §4 (B1-B5) for the method and the peer numbers.

Both models load one random checkpoint written once to ``--workdir`` (the config below, seeded weights), in the
same dtype, with the same thread count. Measured, as medians of ``--repeats`` runs:

* prefill tokens/s: one forward of a ``--prefill-len`` prompt into an empty cache, next-token logits only
  (ours: ``prefill``; transformers: ``model(ids, use_cache=True, logits_to_keep=1)``);
* decode tokens/s at each context length: greedy one-token steps after a prefill of that many tokens
  (ours: ``decode_step`` + argmax on the MLA latent cache with absorbed weights; transformers: the same
  loop through its ``DynamicCache``), model cost only, as in performance-notes §2.1; one prefill per context,
  then the median over ``--repeats`` blocks of ``--decode-steps`` steps;
* ``generate()`` end to end (prefill included) for ``--generate-new`` tokens after a 256-token prompt;
* KV-cache bytes per token, measured from the cache tensors after a prefill.

Every timed region first waits (bounded: 10 s each, 2 min in all) for the shared host to be quiet and the
worst load of other processes seen while timing is reported (``worst_foreign_cores``). Prints one JSON
object. Runtime with the defaults on a quiet 2-core host: about 3 minutes.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import CpuMeter, compare
from kimivl.configuration import DeepseekV3Config
from kimivl.decoder import DeepseekV3ForCausalLM, MLACache
from kimivl.generation import decode_step, generate, prefill
from kimivl.training.init import golden_recipe_state_dict

# A scaled Moonlight decoder that fits this 2-core CPU: the real MLA shapes per head (kv_lora 512, nope 128,
# rope 64, v 128, no q_lora) and real routing (sigmoid noaux_tc, top-6, 2 shared experts, one dense layer),
# with hidden 1024, 8 heads, 4 layers, 16 experts of width 704 and a 32K vocabulary (~210 M parameters).
BENCH_CONFIG: dict[str, Any] = {
    "model_type": "deepseek_v3", "vocab_size": 32768, "hidden_size": 1024, "intermediate_size": 2816,
    "moe_intermediate_size": 704, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 8,
    "n_shared_experts": 2, "n_routed_experts": 16, "num_experts_per_tok": 6, "routed_scaling_factor": 2.446,
    "kv_lora_rank": 512, "q_lora_rank": None, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
    "topk_method": "noaux_tc", "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1, "moe_layer_freq": 1,
    "norm_topk_prob": True, "scoring_func": "sigmoid", "hidden_act": "silu", "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5, "rope_theta": 800000.0, "rope_scaling": None, "attention_bias": False,
    "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2,
}


def build_checkpoint(directory: Path, seed: int) -> Path:
    """Write config.json + model.safetensors (random, the golden set's recipe) once; reuse them afterwards."""
    from safetensors.torch import save_file

    config_path = directory / "config.json"
    if (directory / "model.safetensors").is_file() and json.loads(config_path.read_text()) == BENCH_CONFIG:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    config = DeepseekV3Config.from_dict(BENCH_CONFIG)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in DeepseekV3ForCausalLM(config).state_dict().items()}
    sd = golden_recipe_state_dict(shapes, seed)
    save_file(sd, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(BENCH_CONFIG, indent=1))
    return directory


def load_ours(directory: Path, dtype: torch.dtype) -> DeepseekV3ForCausalLM:
    from safetensors.torch import load_file

    sd = {k: v if k.endswith("e_score_correction_bias") else v.to(dtype)
          for k, v in load_file(str(directory / "model.safetensors")).items()}
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(DeepseekV3Config.from_dict(BENCH_CONFIG))
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


def load_transformers(directory: Path, dtype: torch.dtype) -> Any:
    import transformers

    return transformers.DeepseekV3ForCausalLM.from_pretrained(str(directory), dtype=dtype).eval()


WARMUP_STEPS = 2


def prompt(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, BENCH_CONFIG["vocab_size"], (1, n), generator=torch.Generator().manual_seed(seed))


class Ours:
    """kimivl: prefill / decode_step over an MLACache (absorbed MLA in decode)."""

    def __init__(self, model: DeepseekV3ForCausalLM) -> None:
        self.model = model

    def prefill(self, ids: torch.Tensor, extra: int = 0) -> list[Any]:
        cache = MLACache.from_config(self.model.config, 1, ids.shape[1] + extra, dtype=self.model.lm_head.weight.dtype)
        return [cache, prefill(self.model, ids, cache)]

    def step(self, state: list[Any]) -> None:
        state[1] = decode_step(self.model, state[1].argmax(-1), state[0])

    def generate(self, ids: torch.Tensor, n: int) -> torch.Tensor:
        return generate(self.model, ids, max_new_tokens=n, eos_token_id=[])

    def cache_bytes_per_token(self, state: list[Any], n: int) -> int:
        return state[0].data.numel() * state[0].data.element_size() // n


class Transformers:
    """transformers' DeepseekV3ForCausalLM with its DynamicCache (re-expands the latents every step)."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def prefill(self, ids: torch.Tensor, extra: int = 0) -> list[Any]:
        out = self.model(ids, use_cache=True, logits_to_keep=1)
        return [out.cache, out.logits[:, -1].float()]

    def step(self, state: list[Any]) -> None:
        out = self.model(state[1].argmax(-1, keepdim=True), cache=state[0], use_cache=True)
        state[1] = out.logits[:, -1].float()

    def generate(self, ids: torch.Tensor, n: int) -> torch.Tensor:
        return self.model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    def cache_bytes_per_token(self, state: list[Any], n: int) -> int:
        return sum(t.numel() * t.element_size() for layer in state[0].layers for t in (layer.keys, layer.values)) // n


def decode_rates(meter: CpuMeter, impls: dict[str, Any], ctx: int, steps: int, repeats: int) -> dict[str, float]:
    """Greedy decode tokens/s after one (untimed) prefill of ``ctx`` tokens per implementation."""
    ids = prompt(ctx, seed=ctx)
    states = {name: impl.prefill(ids, extra=WARMUP_STEPS + steps * (repeats + 1)) for name, impl in impls.items()}

    def block(name: str, n: int) -> Callable[[], None]:
        def run() -> None:
            for _ in range(n):
                impls[name].step(states[name])
        return run

    for name in impls:
        block(name, WARMUP_STEPS)()
    seconds = compare(meter, {name: block(name, steps) for name in impls}, repeats)
    return {name: steps / t for name, t in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/kimivl-bench-generate"))
    # float32: this host's CPU is AVX2-only, where torch's bf16 GEMM falls back to a ~0.4 GFLOP/s path.
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--decode-steps", type=int, default=8)
    parser.add_argument("--generate-new", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    directory = build_checkpoint(args.workdir, args.seed)
    ours = Ours(load_ours(directory, dtype))
    hf = Transformers(load_transformers(directory, dtype))
    impls = {"ours": ours, "transformers": hf}
    meter = CpuMeter()
    result: dict[str, Any] = {
        "config": {k: BENCH_CONFIG[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                 "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                                                 "v_head_dim", "intermediate_size", "moe_intermediate_size",
                                                 "n_routed_experts", "num_experts_per_tok", "n_shared_experts",
                                                 "vocab_size")},
        "parameters": sum(p.numel() for p in ours.model.parameters()),
        "dtype": args.dtype, "threads": args.threads, "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "hf_experts_implementation": hf.model.config._experts_implementation,
        "hf_attn_implementation": hf.model.config._attn_implementation,
    }

    def ratio(rates: dict[str, float]) -> dict[str, float]:
        return {**{f"{k}_tok_s": round(v, 2) for k, v in rates.items()},
                "ratio": round(rates["ours"] / rates["transformers"], 2)}

    with torch.inference_mode():
        # agreement on the same weights
        ids = prompt(256, seed=1)
        logits = {name: impl.prefill(ids)[1] for name, impl in impls.items()}
        new = {name: impl.generate(ids, 8)[0, 256:] for name, impl in impls.items()}
        result["agreement"] = {
            "prefill_logits_max_abs_diff": float((logits["ours"] - logits["transformers"]).abs().max()),
            "prefill_logits_max_abs": float(logits["transformers"].abs().max()),
            "greedy_tokens_equal_of_8": int((new["ours"] == new["transformers"]).cumprod(0).sum()),
        }

        ids = prompt(args.prefill_len)
        seconds = compare(meter, {name: (lambda impl=impl: impl.prefill(ids)) for name, impl in impls.items()},
                          args.repeats)
        result["prefill"] = {"tokens": args.prefill_len, **ratio({k: args.prefill_len / v for k, v in seconds.items()})}

        result["decode"] = {str(ctx): ratio(decode_rates(meter, impls, ctx, args.decode_steps, args.repeats))
                            for ctx in args.contexts}

        ids, n = prompt(256, seed=2), args.generate_new
        seconds = compare(meter, {name: (lambda impl=impl: impl.generate(ids, n)) for name, impl in impls.items()},
                          args.repeats)
        result["generate"] = {"prompt": 256, "new_tokens": n,
                              **ratio({k: n / v for k, v in seconds.items()})}

        ids = prompt(128, seed=3)
        cfg = ours.model.config
        result["cache_bytes_per_token"] = {
            **{name: impl.cache_bytes_per_token(impl.prefill(ids), 128) for name, impl in impls.items()},
            "latent_formula": (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers
            * torch.finfo(dtype).bits // 8,
        }
    result["worst_foreign_cores"] = round(meter.worst, 2)  # other processes' load during the timed regions
    result["quiet_wait_s"] = round(meter.waited, 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
