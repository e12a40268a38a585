"""Lay out the untrained demo checkpoint directory: configs, tokenizer files, chat template.

The architecture comes from ``configs/demo/config.json`` (official schema), the vocabulary from
``kimivl.demo.vocab``. The weights are written later by the trainer's export.
"""
from __future__ import annotations

import json
from pathlib import Path

from kimivl.demo.vocab import train_ranks, write_tokenizer

VOCAB_RANKS = 400
REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "configs" / "demo" / "config.json"

# The official Kimi-VL chat template (spec §6.3), as the released tokenizer_config.json carries it.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}{%- if loop.first and messages[0]['role'] != 'system' -%}"
    "{{'<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|>'}}{%- endif -%}"
    "{%- if message['role'] == 'system' -%}{{'<|im_system|>'}}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}{{'<|im_user|>'}}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{'<|im_assistant|>'}}{%- endif -%}"
    "{{- message['role'] -}}{{'<|im_middle|>'}}{%- if message['content'] is string -%}"
    "{{- message['content'] + '<|im_end|>' -}}{%- else -%}{%- for content in message['content'] -%}"
    "{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content -%}"
    "{{'<|media_start|>image<|media_content|><|media_pad|><|media_end|>'}}{%- else -%}{{content['text']}}"
    "{%- endif -%}{%- endfor -%}{{'<|im_end|>'}}{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{'<|im_assistant|>assistant<|im_middle|>'}}{%- endif -%}"
)

# Processor settings of the demo: 7-pixel patches (MoonViT learns shapes from scratch only with patches
# well under the size of a shape, docs/demo-model.md), at most 256 patches per image (112 x 112 pixels of
# content, 64 tokens); videos and documents get budgets sized for a 4-8 frame clip and a 1-3 page PDF.
PREPROCESSOR = {
    "image_processor_type": "KimiVLImageProcessor",
    "processor_class": "KimiVLProcessor",
    "patch_size": 7,
    "pad_input": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "in_token_limit": 256,
    "merge_kernel_size": [2, 2],
    # min_frames 8: an mp4 of the task's 4-8 frames gives all of them, like a frame list
    "video_options": {"fps": 2.0, "max_frames": 8, "min_frames": 8, "max_tokens": 256, "min_frame_tokens": 16},
    "document_options": {"dpi": 72.0, "max_pages": 3, "max_tokens": 288, "min_page_tokens": 48},
}


def build_demo_base(directory: Path) -> Path:
    """Write config.json, preprocessor_config.json, generation_config.json and the tokenizer files."""
    directory.mkdir(parents=True, exist_ok=True)
    ranks = train_ranks(VOCAB_RANKS)
    ids = write_tokenizer(directory, ranks, CHAT_TEMPLATE)
    config = json.loads(DEMO_CONFIG.read_text(encoding="utf-8"))
    if config["media_placeholder_token_id"] != ids["<|media_pad|>"] or config["text_config"]["vocab_size"] != len(ranks) + 258:
        raise ValueError(f"{DEMO_CONFIG} does not match a {len(ranks)}-rank vocabulary "
                         f"(<|media_pad|> = {ids['<|media_pad|>']}, vocab {len(ranks) + 258})")
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (directory / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2) + "\n", encoding="utf-8")
    generation = {"max_new_tokens": 16, "do_sample": False, "eos_token_id": [ids["<|im_end|>"], ids["[EOS]"]],
                  "bos_token_id": ids["[BOS]"], "pad_token_id": ids["[PAD]"]}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    return directory
