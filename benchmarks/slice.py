"""The synthetic real-width Kimi-VL slice every benchmark loads: the released layer shapes at reduced depth.

Text: hidden 2048, MLA (16 heads, kv_lora 512, qk_nope 128, qk_rope 64, v 128, no q_lora), layer 0 dense
(intermediate 11264), layers 1.. MoE (64 routed experts of width 1408, top-6 ``noaux_tc`` sigmoid routing,
2 shared experts), a small vocabulary (default 2048) so the embedding and head do not dominate.
Vision: MoonViT at the released width (1152, 16 heads, MLP 4304, 64x64 position table), a few layers, and
the released projector (2x2 merge -> 4608 -> 4608 -> 2048).

``write_slice(directory, ...)`` writes an official-layout checkpoint directory (``config.json``, sharded
``model*.safetensors`` + index, ``tiktoken.model``, ``tokenizer_config.json``, ``preprocessor_config.json``,
``generation_config.json``) with seeded random weights (the golden sets' recipe: N(0, 1/fan_in) matrices), so
kimivl, transformers and llama.cpp all read the same numbers. It is written once per parameter set and reused.

Every benchmark also takes ``--checkpoint DIR``: any official-layout Kimi-VL directory in place of the synthetic
slice (its config sets the widths and depths), e.g. the released model cut to a few layers by ``cut_checkpoint``,
and ``--seed N`` for other inputs (and other synthetic weights). From the command line::

    python -m benchmarks.slice --out DIR [--seed N] [--text-layers 2] [--vision-layers 4]   # a synthetic slice
    python -m benchmarks.slice --from RELEASED_DIR --out DIR [--text-layers 2] [--vision-layers 4]  # a cut
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import string
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import CACHE

TEXT_SLICE: dict[str, Any] = {
    "model_type": "deepseek_v3", "vocab_size": 2048, "hidden_size": 2048, "intermediate_size": 11264,
    "moe_intermediate_size": 1408, "num_hidden_layers": 2, "num_nextn_predict_layers": 0,
    "num_attention_heads": 16, "num_key_value_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64,
    "ep_size": 1, "routed_scaling_factor": 2.446, "kv_lora_rank": 512, "q_lora_rank": None,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc",
    "n_group": 1, "topk_group": 1, "num_experts_per_tok": 6, "moe_layer_freq": 1, "first_k_dense_replace": 1,
    "norm_topk_prob": True, "scoring_func": "sigmoid", "aux_loss_alpha": 0.001, "seq_aux": True,
    "hidden_act": "silu", "max_position_embeddings": 32768, "initializer_range": 0.02, "rms_norm_eps": 1e-5,
    "use_cache": True, "rope_theta": 800000.0, "rope_scaling": None, "attention_bias": False,
    "attention_dropout": 0.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}
VISION_SLICE: dict[str, Any] = {
    "model_type": "moonvit", "patch_size": 14, "init_pos_emb_height": 64, "init_pos_emb_width": 64,
    "num_attention_heads": 16, "num_hidden_layers": 4, "hidden_size": 1152, "intermediate_size": 4304,
    "merge_kernel_size": [2, 2], "torch_dtype": "bfloat16",
}
NUM_SPECIAL = 258
SLICE_SEED = 1234  # the synthetic slice's weights at --seed 0 (--seed N: SLICE_SEED + N)


def slice_config(text_layers: int = 2, vision_layers: int = 4, vocab_ranks: int = 2048 - NUM_SPECIAL) -> dict[str, Any]:
    """The official-schema ``config.json`` of a slice."""
    vocab = vocab_ranks + NUM_SPECIAL
    text = {**TEXT_SLICE, "num_hidden_layers": text_layers, "vocab_size": vocab,
            "bos_token_id": vocab_ranks, "eos_token_id": vocab_ranks + 1, "pad_token_id": vocab_ranks + 255}
    return {
        "architectures": ["KimiVLForConditionalGeneration"], "model_type": "kimi_vl", "ignore_index": -100,
        "media_placeholder_token_id": vocab_ranks + 21, "pad_token_id": 0, "torch_dtype": "bfloat16",
        "vision_config": {**VISION_SLICE, "num_hidden_layers": vision_layers}, "text_config": text,
        "bos_token_id": vocab_ranks, "eos_token_id": vocab_ranks + 1, "tie_word_embeddings": False,
    }


def slice_ranks(n: int) -> dict[bytes, int]:
    """``n`` BPE ranks: the 256 bytes, then letter pairs / ' x' pairs (each reachable by one merge)."""
    ranks = {bytes([b]): b for b in range(256)}
    letters = string.ascii_lowercase
    for pair in [" " + c for c in letters] + [a + b for a in letters for b in letters]:
        if len(ranks) >= n:
            break
        ranks[pair.encode()] = len(ranks)
    for a in letters:  # " ab" and "abc" triples, reachable as " a" + "b" and "ab" + "c"
        for b in letters:
            for token in [f" {a}{b}"] + [f"{a}{b}{c}" for c in letters]:
                if len(ranks) < n:
                    ranks[token.encode()] = len(ranks)
    if len(ranks) < n:
        raise ValueError(f"slice vocabulary: at most {len(ranks)} ranks, asked for {n}")
    return ranks


def write_slice(directory: Path | None = None, *, text_layers: int = 2, vision_layers: int = 4,
                vocab_ranks: int = 2048 - NUM_SPECIAL, seed: int = SLICE_SEED, max_shard_size: str = "512MB") -> Path:
    """Write (once) and return the slice checkpoint directory."""
    from kimivl.configuration import KimiVLConfig
    from kimivl.demo.build import CHAT_TEMPLATE
    from kimivl.demo.vocab import write_tokenizer
    from kimivl.modeling import KimiVLForConditionalGeneration
    from kimivl.training.init import golden_recipe_tensors

    config = slice_config(text_layers, vision_layers, vocab_ranks)
    key = hashlib.sha1(json.dumps([config, seed], sort_keys=True).encode()).hexdigest()[:10]
    directory = Path(directory) if directory else CACHE / f"slice-t{text_layers}-v{vision_layers}-{key}"
    stamp = directory / ".complete"
    if stamp.is_file() and stamp.read_text() == key:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = KimiVLForConditionalGeneration(KimiVLConfig.from_dict(config))
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    tensors = ((k, v if k.endswith("e_score_correction_bias") else v.to(torch.bfloat16))
               for k, v in golden_recipe_tensors(shapes, seed))
    _save_streaming(tensors, directory, max_shard_size)  # a shard in memory at a time: full depth fits too
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    ids = write_tokenizer(directory, slice_ranks(vocab_ranks), CHAT_TEMPLATE)
    preprocessor = {
        "image_processor_type": "KimiVLImageProcessor", "processor_class": "KimiVLProcessor", "patch_size": 14,
        "pad_input": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "in_token_limit": 4096,
        "merge_kernel_size": [2, 2],
    }
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    generation = {"max_new_tokens": 64, "do_sample": False, "eos_token_id": [ids["<|im_end|>"], ids["[EOS]"]],
                  "bos_token_id": ids["[BOS]"], "pad_token_id": ids["[PAD]"]}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    stamp.write_text(key)
    return directory


def _save_streaming(tensors: Any, directory: Path, max_shard_size: str) -> None:
    """Shards of at most ``max_shard_size`` and the index, written as the tensors arrive (the official layout's
    names, ``model-00001-of-0000N.safetensors``), each shard freed before the next is filled."""
    from safetensors.torch import save_file

    from kimivl.checkpoint import SAFE_WEIGHTS_INDEX_NAME, _parse_size

    for stale in directory.glob("model*.safetensors*"):
        stale.unlink()
    limit, shard, size, parts, total = _parse_size(max_shard_size), {}, 0, [], 0

    def flush() -> None:
        nonlocal shard, size
        if shard:
            name = f"part-{len(parts):05d}.safetensors"
            save_file(shard, str(directory / name), metadata={"format": "pt"})
            parts.append((name, list(shard)))
        shard, size = {}, 0

    for key, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > limit:
            flush()
        shard[key], size, total = tensor, size + nbytes, total + nbytes
    flush()
    weight_map = {}
    for i, (name, keys) in enumerate(parts):
        final = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        (directory / name).rename(directory / final)
        weight_map.update(dict.fromkeys(keys, final))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def weight_bytes(directory: Path) -> int:
    """Bytes of all tensors in the checkpoint (from the index, or the single file's size)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return int(json.loads(index.read_text())["metadata"]["total_size"])
    return (directory / "model.safetensors").stat().st_size


def derived_name(directory: Path) -> str:
    """The name of files derived from a checkpoint (text-only view, GGUF): the slice's own name for a slice in
    ``CACHE``, else the directory's name and a hash of its path (two checkpoints called ``slice`` stay apart)."""
    directory = Path(directory).resolve()
    if directory.is_relative_to(CACHE.resolve()):
        return directory.name
    return f"{directory.name}-{hashlib.sha1(str(directory).encode()).hexdigest()[:8]}"


def is_fresh(out: Path, checkpoint_dir: Path) -> bool:
    """``out`` exists and is newer than every file of the checkpoint (a rewritten checkpoint is derived anew)."""
    if not out.exists():
        return False
    newest = max((f.stat().st_mtime for f in Path(checkpoint_dir).iterdir() if f.is_file()), default=0.0)
    return out.stat().st_mtime >= newest


def text_only_dir(directory: Path) -> Path:
    """A transformers ``DeepseekV3ForCausalLM`` view of the checkpoint's language model (same tensors, keys
    without ``language_model.``), written once under ``CACHE`` (next to a slice; never into a user's
    checkpoint); see spec §11."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    directory = Path(directory).resolve()
    out = CACHE / (derived_name(directory) + "-text")
    stamp = out / ".complete"
    if stamp.is_file() and is_fresh(stamp, directory):
        return out
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((directory / "config.json").read_text())["text_config"]
    config["architectures"] = ["DeepseekV3ForCausalLM"]
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    from kimivl.checkpoint import weight_files

    tensors = {}
    for shard in weight_files(directory):
        with safe_open(str(shard), "pt") as f:
            for k in f.keys():
                if k.startswith("language_model."):
                    tensors[k[len("language_model."):]] = f.get_tensor(k)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    stamp.write_text("ok")
    return out


# ------------------------------------------------------------------------------- other checkpoints
def check_checkpoint(directory: Path) -> dict[str, Any]:
    """The ``config.json`` of an official-layout Kimi-VL checkpoint directory; a ``ValueError`` that names what
    is missing otherwise (before minutes of benchmark set-up)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"checkpoint {directory}: no such directory")
    if not (directory / "config.json").is_file():
        raise ValueError(f"checkpoint {directory}: no config.json (an official-layout Kimi-VL directory is needed)")
    config = json.loads((directory / "config.json").read_text())
    if config.get("model_type") != "kimi_vl" or not isinstance(config.get("text_config"), dict) \
            or not isinstance(config.get("vision_config"), dict):
        raise ValueError(f"checkpoint {directory}: config.json is not a Kimi-VL config (model_type "
                         f"{config.get('model_type')!r}; text_config and vision_config are needed)")
    from kimivl.checkpoint import weight_files

    weight_files(directory)  # the loader's own check (a CheckpointError, a ValueError): a file, or an index and shards
    return config


def moe_layer_indices(text_config: dict[str, Any]) -> list[int]:
    """The decoder layers that are MoE layers (spec §4: i >= first_k_dense_replace and i % moe_layer_freq == 0)."""
    if not text_config.get("n_routed_experts"):
        return []
    k, freq = text_config.get("first_k_dense_replace", 0), text_config.get("moe_layer_freq", 1)
    return [i for i in range(text_config["num_hidden_layers"]) if i >= k and i % freq == 0]


_LAYER_KEY = re.compile(r"^(language_model\.model\.layers|vision_tower\.encoder\.blocks)\.(\d+)\.")


def cut_checkpoint(source: Path, out: Path, *, text_layers: int = 2, vision_layers: int = 4,
                   max_shard_size: str = "512MB") -> Path:
    """Write the first ``text_layers`` decoder layers and ``vision_layers`` MoonViT blocks of an official-layout
    checkpoint (e.g. a released Kimi-VL) to ``out``, with everything else it has (embeddings, head, projector,
    tokenizer and processor files); only the kept tensors are read, so a 30 GB checkpoint cuts in a few GB."""
    from safetensors import safe_open

    from kimivl.checkpoint import save_weights, weight_files

    source, out = Path(source), Path(out)
    config = check_checkpoint(source)
    have_text, have_vision = config["text_config"]["num_hidden_layers"], config["vision_config"]["num_hidden_layers"]
    if not 1 <= text_layers <= have_text or not 1 <= vision_layers <= have_vision:
        raise ValueError(f"cut of {source}: asked for {text_layers} decoder layers and {vision_layers} vision "
                         f"layers; it has {have_text} and {have_vision} (at least 1 of each)")
    if out.resolve() == source.resolve():
        raise ValueError(f"cut of {source}: the output must be another directory")
    keep = {"language_model.model.layers": text_layers, "vision_tower.encoder.blocks": vision_layers}
    tensors = {}
    for file in weight_files(source):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                m = _LAYER_KEY.match(key)
                if m is None or int(m.group(2)) < keep[m.group(1)]:
                    tensors[key] = f.get_tensor(key)
    out.mkdir(parents=True, exist_ok=True)
    save_weights(tensors, out, max_shard_size=max_shard_size)
    del tensors
    for f in source.iterdir():  # tokenizer, processor, generation and chat-template files as they are
        if f.is_file() and f.name != "config.json" and not f.name.startswith("model") and f.suffix != ".safetensors":
            shutil.copy2(f, out / f.name)
    config["text_config"]["num_hidden_layers"] = text_layers
    config["text_config"]["num_nextn_predict_layers"] = 0  # the MTP layers sit after the last layer: cut away
    config["vision_config"]["num_hidden_layers"] = vision_layers
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """``--checkpoint DIR`` and ``--seed N``, the same in every benchmark."""
    parser.add_argument("--checkpoint", type=Path, default=None, metavar="DIR",
                        help="an official-layout Kimi-VL checkpoint to benchmark instead of the synthetic slice "
                             "(its config sets widths and depths; e.g. the released model cut by "
                             "'python -m benchmarks.slice --from DIR --out DIR2')")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the inputs (prompts, hidden states, images) and of the synthetic slice's "
                             f"weights ({SLICE_SEED} + N); 0 (default) repeats the documented runs")


def checkpoint_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace, flags: dict[str, str] | None = None,
                         **slice_kwargs: Any) -> tuple[Path, dict[str, Any]]:
    """(directory, its config): ``--checkpoint`` checked, or the synthetic slice for ``slice_kwargs`` (depths,
    None: the slice's default) and ``--seed`` written once. Depth options of the slice cannot be combined with
    ``--checkpoint``; ``flags`` names their options where they are not ``--text-layers`` / ``--vision-layers``."""
    if args.checkpoint is not None:
        given = [(flags or {}).get(k, f"--{k.replace('_', '-')}") for k, v in slice_kwargs.items() if v is not None]
        if given:
            parser.error(f"{', '.join(given)} shape(s) the synthetic slice; --checkpoint {args.checkpoint} brings "
                         "its own depths (cut it with 'python -m benchmarks.slice --from')")
        try:
            return args.checkpoint.resolve(), check_checkpoint(args.checkpoint)
        except ValueError as e:
            parser.error(str(e))
    depths = {k: v for k, v in slice_kwargs.items() if v is not None}
    directory = write_slice(seed=SLICE_SEED + args.seed, **depths)
    return directory, json.loads((directory / "config.json").read_text())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the synthetic real-width slice, or cut an official "
                                                 "checkpoint to a few layers, for the benchmarks' --checkpoint.")
    parser.add_argument("--out", type=Path, required=True, help="directory to write")
    parser.add_argument("--from", dest="source", type=Path, default=None, metavar="DIR",
                        help="cut this official-layout checkpoint (e.g. a released Kimi-VL) instead")
    parser.add_argument("--text-layers", type=int, default=2)
    parser.add_argument("--vision-layers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help=f"synthetic weights: seed {SLICE_SEED} + N")
    args = parser.parse_args(argv)
    try:
        if args.source is not None:
            out = cut_checkpoint(args.source, args.out, text_layers=args.text_layers,
                                 vision_layers=args.vision_layers)
        else:
            out = write_slice(args.out, text_layers=args.text_layers, vision_layers=args.vision_layers,
                              seed=SLICE_SEED + args.seed)
    except ValueError as e:
        parser.error(str(e))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
