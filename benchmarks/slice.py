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
"""
from __future__ import annotations

import hashlib
import json
import string
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
                vocab_ranks: int = 2048 - NUM_SPECIAL, seed: int = 1234, max_shard_size: str = "512MB") -> Path:
    """Write (once) and return the slice checkpoint directory."""
    from kimivl.checkpoint import save_weights
    from kimivl.configuration import KimiVLConfig
    from kimivl.demo.build import CHAT_TEMPLATE
    from kimivl.demo.vocab import write_tokenizer
    from kimivl.modeling import KimiVLForConditionalGeneration
    from kimivl.training.init import golden_recipe_state_dict

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
    sd = {k: v if k.endswith("e_score_correction_bias") else v.to(torch.bfloat16)
          for k, v in golden_recipe_state_dict(shapes, seed).items()}
    save_weights(sd, directory, max_shard_size=max_shard_size)
    del sd
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


def weight_bytes(directory: Path) -> int:
    """Bytes of all tensors in the checkpoint (from the index, or the single file's size)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return int(json.loads(index.read_text())["metadata"]["total_size"])
    return (directory / "model.safetensors").stat().st_size


def text_only_dir(directory: Path) -> Path:
    """A transformers ``DeepseekV3ForCausalLM`` view of the slice's language model (same tensors, keys
    without ``language_model.``), written next to it once; see spec §11."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = directory.parent / (directory.name + "-text")
    stamp = out / ".complete"
    if stamp.is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((directory / "config.json").read_text())["text_config"]
    config["architectures"] = ["DeepseekV3ForCausalLM"]
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors = {}
    for shard in sorted(directory.glob("model*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for k in f.keys():
                if k.startswith("language_model."):
                    tensors[k[len("language_model."):]] = f.get_tensor(k)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    stamp.write_text("ok")
    return out
