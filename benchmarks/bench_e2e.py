"""End to end through the public API: time to first token and decode tokens/s for one image and one question.

Issue item 4. Two models, each loaded with ``KimiVLForConditionalGeneration.from_pretrained`` and
``KimiVLProcessor.from_pretrained`` and driven the way a user does (``processor.apply_chat_template(messages,
tokenize=True, return_dict=True, return_tensors="pt")`` then ``model.generate(**inputs, streamer=...)``):

* ``demo``: the shipped demo model (``kimivl.DEMO_MODEL``, float32, 3 M parameters) on
  ``kimivl/assets/examples/shape.png`` with "What color is the shape?";
* ``slice``: the synthetic real-width slice (``benchmarks/slice.py``: released layer shapes, reduced depth,
  random weights), or the official-layout checkpoint given as ``--checkpoint DIR``, on a 448x448 image (1024
  patches -> 256 image tokens) with a short question (``--image`` / ``--question`` for others).

Generation is greedy with ``max_new_tokens=--new-tokens`` and ``eos_token_id=[]`` so every run makes the same
number of tokens. Per run, from one streamer that timestamps every step:

* ``ttft_s``: messages -> first new token (processor included: image decode, resize, patches, tokenizer);
  split into ``processor_s``, ``vision_s`` (vision tower + projector, timed by forward hooks on the modules
  during the same call) and ``prefill_s`` (the rest until the first token: embedding splice, decoder prefill,
  lm_head, first greedy pick);
* ``decode_tok_s``: (new tokens - 1) / (last token time - first token time).

Medians of ``--repeats`` runs after one warm-up run (whose greedy answer under the checkpoint's own stop ids is
reported as ``answer``). Peer: transformers has no Kimi-VL, so only the text part has one: transformers
``DeepseekV3ForCausalLM`` on the same tensors (``text_only_dir``) runs the prefill of the same prompt from the
same precomputed ``inputs_embeds`` (image features spliced in by kimivl), next to kimivl's decoder prefill on
those embeddings; the two alternate (``compare``) and ``ratio`` is transformers time / kimivl time.

``follow_up``: the conversation's second turn (the first answer, then ``FOLLOW_UP``) with the first turn's
latents in a ``PromptCache`` (primed untimed by the first turn, as a chat session or the server's worker has
them) against the same request prefilled whole (image encoded again), alternating; ``cached_tokens`` is how much
of its prompt the cache served and ``ttft_ratio`` is full / cached. The answers of the two are the same
(checked).

Every timed region first waits (bounded) for the shared host to be quiet; ``worst_foreign_cores`` is the
largest load of other processes seen while timing.

Usage: ``python -m benchmarks.bench_e2e [--dtype auto|bf16|fp32] [--only demo|slice] [--new-tokens 32]
[--repeats 3] [--no-peer] [--out FILE]``. ``auto`` (default) is the checkpoint's ``torch_dtype``: float32 for
the demo model, bfloat16 for the slice (as for the released checkpoints).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import CACHE, REPO, CpuMeter, StepClock, compare, dtype_of, emit, machine_info

DEMO_IMAGE = REPO / "kimivl" / "assets" / "examples" / "shape.png"
DEMO_QUESTION = "What color is the shape?"
SLICE_QUESTION = "Describe the picture in one sentence."
FOLLOW_UP = "What else can you tell me about it?"


class _VisionClock:
    """Forward hooks: vision tower start -> projector end, summed over the calls of one run."""

    def __init__(self, model: Any) -> None:
        self.seconds = 0.0
        self._start = 0.0
        model.vision_tower.register_forward_pre_hook(self._begin)
        model.multi_modal_projector.register_forward_hook(self._finish)

    def _begin(self, *_: Any) -> None:
        self._start = time.perf_counter()

    def _finish(self, *_: Any) -> None:
        self.seconds += time.perf_counter() - self._start


def _release_freed_memory() -> None:
    """Collect, then hand freed heap back to the OS (glibc keeps freed mid-size tensors, 2.2 GB of the fp32
    slice after one run, which the next model's load would otherwise be stacked on)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def slice_image(size: int = 448) -> Path:
    """A deterministic ``size`` x ``size`` PNG (the demo's shape picture, resized), written once."""
    from PIL import Image

    path = CACHE / f"e2e-{size}x{size}.png"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.open(DEMO_IMAGE).convert("RGB").resize((size, size), Image.BICUBIC).save(path)
    return path


def messages(image: Path, question: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image", "image": str(image)}, {"type": "text", "text": question}]}]


def one_run(model: Any, processor: Any, conversation: list[dict[str, Any]], new_tokens: int,
            vision: _VisionClock) -> dict[str, float]:
    """One request, messages to last token, greedy with stopping off."""
    clock = StepClock()
    vision.seconds = 0.0
    t0 = time.perf_counter()
    inputs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    t1 = time.perf_counter()
    model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, eos_token_id=[], streamer=clock)
    # clock.times[0]: prompt handed over (before the prefill); [1]: first new token; [-1]: last
    first, last = clock.times[1], clock.times[-1]
    n = len(clock.times) - 1
    return {"ttft_s": first - t0, "processor_s": t1 - t0, "vision_s": vision.seconds,
            "prefill_s": first - clock.times[0] - vision.seconds,
            "decode_tok_s": (n - 1) / (last - first) if n > 1 else float("nan"), "new_tokens": n}


def follow_up(model: Any, processor: Any, conversation: list[dict[str, Any]], answer: str, new_tokens: int,
              repeats: int, meter: CpuMeter) -> dict[str, Any]:
    """TTFT of the second turn with the first turn's latents cached and without (see the module docstring)."""
    from kimivl.generation import PromptCache

    def render(turns: list[dict[str, Any]]) -> dict[str, Any]:
        return processor.apply_chat_template(turns, add_generation_prompt=True, tokenize=True, return_dict=True,
                                             return_tensors="pt")

    second = [*conversation, {"role": "assistant", "content": answer}, {"role": "user", "content": FOLLOW_UP}]
    settings = {"max_new_tokens": new_tokens, "do_sample": False, "eos_token_id": []}
    runs: dict[str, list[float]] = {"cached": [], "full": []}
    outputs: dict[str, Any] = {}
    cache = PromptCache()

    def run(kind: str) -> None:
        if kind == "cached":  # the first turn, as the session had it (untimed)
            cache.reset()
            model.generate(**render(conversation), prompt_cache=cache, **settings)
        clock = StepClock()
        t0 = time.perf_counter()
        outputs[kind] = model.generate(**render(second), prompt_cache=cache if kind == "cached" else None,
                                       streamer=clock, **settings)
        runs[kind].append(clock.times[1] - t0)

    for _ in range(repeats):
        for kind in ("cached", "full"):
            meter.timed(lambda kind=kind: run(kind))
    if not torch.equal(outputs["cached"], outputs["full"]):
        raise RuntimeError("the cached and the full prefill gave different answers")
    cached, full = statistics.median(runs["cached"]), statistics.median(runs["full"])
    return {"prompt_tokens": int(render(second)["input_ids"].shape[1]), "cached_tokens": cache.reused,
            "ttft_cached_s": round(cached, 4), "ttft_full_s": round(full, 4), "ttft_ratio": round(full / cached, 2),
            "runs": {k: [round(v, 4) for v in r] for k, r in runs.items()}}


def measure(directory: Path, image: Path, question: str, dtype: str, new_tokens: int, repeats: int,
            meter: CpuMeter) -> tuple[dict[str, Any], Any, Any, list[dict[str, Any]]]:
    """Load, warm up, time ``repeats`` requests; returns (result, model, processor, conversation)."""
    from kimivl import KimiVLForConditionalGeneration, KimiVLProcessor

    t0 = time.perf_counter()
    model = KimiVLForConditionalGeneration.from_pretrained(directory,
                                                           dtype="auto" if dtype == "auto" else dtype_of(dtype))
    processor = KimiVLProcessor.from_pretrained(directory)
    load_s = time.perf_counter() - t0
    vision = _VisionClock(model)
    conversation = messages(image, question)
    inputs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    warm = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)  # warm-up, checkpoint stop ids
    answer = processor.decode(warm[0, inputs["input_ids"].shape[1]:].tolist(), skip_special_tokens=True)
    runs = []
    for _ in range(repeats):  # timed() waits for quiet and records the foreign load around each run
        meter.timed(lambda: runs.append(one_run(model, processor, conversation, new_tokens, vision)))
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    result = {
        "checkpoint": str(directory.relative_to(REPO)) if directory.is_relative_to(REPO) else str(directory),
        "dtype": str(model.dtype).replace("torch.", ""), "parameters": model.num_parameters(),
        "image": str(image.resolve().relative_to(REPO)) if image.resolve().is_relative_to(REPO) else str(image),
        "question": question,
        "prompt_tokens": int(inputs["input_ids"].shape[1]), "image_patches": int(inputs["pixel_values"].shape[0]),
        "load_s": round(load_s, 2), "answer": answer,
        **{k: round(v, 4 if k.endswith("_s") else 2) for k, v in med.items()},
        "runs": [{k: round(v, 4) for k, v in r.items()} for r in runs],
    }
    result["follow_up"] = follow_up(model, processor, conversation, answer, new_tokens, repeats, meter)
    return result, model, processor, conversation


def text_peer(embeds: torch.Tensor, directory: Path, dtype: torch.dtype, repeats: int,
              meter: CpuMeter) -> dict[str, Any]:
    """kimivl decoder prefill vs transformers DeepseekV3ForCausalLM on the same inputs_embeds (one prompt).

    Both decoders load the text-only view of the slice (same tensors). The full kimivl model is gone by
    now and transformers loads first, so its load peak does not add to kimivl's weights (about 7 GB in
    all in fp32 for the default slice).
    """
    import transformers
    from transformers import DeepseekV3ForCausalLM

    from benchmarks.slice import text_only_dir
    from kimivl.checkpoint import load_weights
    from kimivl.configuration import KimiVLConfig
    from kimivl.decoder import DeepseekV3ForCausalLM as KimiDecoder
    from kimivl.decoder.cache import MLACache

    transformers.utils.logging.disable_progress_bar()
    text_dir = text_only_dir(directory)
    # Loaded as stored (bf16) and cast afterwards: transformers' own bf16 -> fp32 load peaks at ~3x the fp32
    # weights (7.7 GB for this slice, measured), the cast at ~1.6x; the weights end up the same.
    hf = DeepseekV3ForCausalLM.from_pretrained(text_dir, dtype=torch.bfloat16).to(dtype).eval()
    _release_freed_memory()
    with torch.device("meta"):
        lm = KimiDecoder(KimiVLConfig.from_pretrained(directory).text_config)
    load_weights(lm, text_dir, dtype=dtype)
    lm.eval()
    n = embeds.shape[1]

    @torch.inference_mode()
    def ours() -> torch.Tensor:
        cache = MLACache.from_config(lm.config, 1, n + 1, dtype=dtype)
        out = lm.model(inputs_embeds=embeds, cache=cache)
        return lm.lm_head(out.last_hidden_state[:, -1]).float()

    @torch.inference_mode()
    def theirs() -> torch.Tensor:
        return hf(inputs_embeds=embeds, use_cache=True, logits_to_keep=1).logits[:, -1].float()

    a, b = ours(), theirs()
    times = compare(meter, {"kimivl": ours, "transformers": theirs}, repeats)
    return {
        "what": "decoder prefill from the same inputs_embeds (image spliced in), next-token logits, fresh cache",
        "prompt_tokens": n, "kimivl_s": round(times["kimivl"], 4), "transformers_s": round(times["transformers"], 4),
        "ratio": round(times["transformers"] / times["kimivl"], 3),
        "same_next_token": bool(a.argmax() == b.argmax()),
        "logits_max_abs_diff": round(float((a - b).abs().max()), 5),
    }


def main(argv: list[str] | None = None) -> None:
    from benchmarks.slice import add_checkpoint_arguments, checkpoint_from_args
    from kimivl import DEMO_MODEL

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="load dtype (auto: config torch_dtype: fp32 demo, bf16 slice)")
    p.add_argument("--only", choices=["demo", "slice"], help="run one of the two models")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--text-layers", type=int, default=None, help="decoder depth of the synthetic slice (2)")
    p.add_argument("--vision-layers", type=int, default=None, help="MoonViT depth of the synthetic slice (4)")
    p.add_argument("--image", type=Path, default=None, help="the slice's image (default: a 448x448 picture)")
    p.add_argument("--question", default=SLICE_QUESTION, help="the slice's question")
    add_checkpoint_arguments(p)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-peer", action="store_true", help="skip transformers")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    if args.image is not None and not args.image.is_file():
        p.error(f"--image {args.image}: no such file")
    if not args.no_peer and args.only != "demo":
        import transformers  # noqa: F401  (fail now, not after minutes of work, when the peer is missing)
    if args.threads:
        torch.set_num_threads(args.threads)
    meter = CpuMeter()
    result: dict[str, Any] = {"benchmark": "end_to_end", "new_tokens": args.new_tokens, "repeats": args.repeats}
    if args.only in (None, "demo"):
        result["demo"] = measure(Path(DEMO_MODEL), DEMO_IMAGE, DEMO_QUESTION, args.dtype, args.new_tokens,
                                 args.repeats, meter)[0]
    if args.only in (None, "slice"):
        directory, _ = checkpoint_from_args(p, args, text_layers=args.text_layers, vision_layers=args.vision_layers)
        result["slice"], model, processor, conversation = measure(
            directory, args.image or slice_image(), args.question, args.dtype, args.new_tokens, args.repeats, meter)
        if not args.no_peer:
            inputs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                                   return_dict=True, return_tensors="pt")
            with torch.inference_mode():
                embeds = model.embed_inputs(inputs["input_ids"], inputs["pixel_values"], inputs["image_grid_hws"])
            dtype = model.dtype
            del model
            _release_freed_memory()
            result["slice"]["text_prefill_vs_transformers"] = text_peer(embeds, directory, dtype, args.repeats, meter)
    result.update(meter.report())
    result["machine"] = machine_info(torch.get_num_threads())
    emit(result, args.out)


if __name__ == "__main__":
    main()
