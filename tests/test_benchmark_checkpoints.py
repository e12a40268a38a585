"""The benchmark suite's checkpoint plumbing: cutting an official checkpoint to a few layers, ``--checkpoint``
and ``--seed`` (the suite itself is timed, never tested; these are the parts a wrong answer would hide in)."""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch

from benchmarks.slice import (add_checkpoint_arguments, check_checkpoint, checkpoint_from_args, cut_checkpoint,
                              derived_name, moe_layer_indices)
from kimivl import KimiVLForConditionalGeneration, KimiVLProcessor


def test_cut_keeps_the_first_layers_bit_for_bit(golden_dir: Path, golden_weights: dict[str, torch.Tensor],
                                                 tmp_path: Path) -> None:
    out = cut_checkpoint(golden_dir, tmp_path / "cut", text_layers=2, vision_layers=1)
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 2
    assert config["vision_config"]["num_hidden_layers"] == 1
    model = KimiVLForConditionalGeneration.from_pretrained(out)  # one strict load: every key there, none extra
    state = model.state_dict()
    cut_away = ("language_model.model.layers.2.", "vision_tower.encoder.blocks.1.")
    kept = {k for k in golden_weights if not k.startswith(cut_away)}
    assert kept == set(state), sorted(kept ^ set(state))[:5]
    for key in kept:
        assert torch.equal(state[key], golden_weights[key].to(state[key].dtype)), key
    # the tokenizer and processor files came along: the cut answers a chat request
    processor = KimiVLProcessor.from_pretrained(out)
    text = processor.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert processor(text=text, return_tensors="pt")["input_ids"].shape[1] > 3


def test_cut_refuses_impossible_requests(golden_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"asked for 4 decoder layers and 1 vision layers; it has 3 and 2"):
        cut_checkpoint(golden_dir, tmp_path / "cut", text_layers=4, vision_layers=1)
    with pytest.raises(ValueError, match="output must be another directory"):
        cut_checkpoint(golden_dir, golden_dir, text_layers=1, vision_layers=1)
    with pytest.raises(ValueError, match="no config.json"):
        cut_checkpoint(tmp_path, tmp_path / "cut")


def test_check_checkpoint_names_what_is_missing(golden_dir: Path, tmp_path: Path) -> None:
    assert check_checkpoint(golden_dir)["model_type"] == "kimi_vl"
    with pytest.raises(ValueError, match="no such directory"):
        check_checkpoint(tmp_path / "absent")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not a Kimi-VL config .model_type 'llama'"):
        check_checkpoint(tmp_path)
    shutil.copy(golden_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(ValueError, match="no model.safetensors or model.safetensors.index.json"):
        check_checkpoint(tmp_path)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench")
    parser.add_argument("--layers", type=int, default=None)
    add_checkpoint_arguments(parser)
    return parser


def test_checkpoint_argument(golden_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = _parser()
    args = parser.parse_args(["--checkpoint", str(golden_dir), "--seed", "5"])
    directory, config = checkpoint_from_args(parser, args, vision_layers=args.layers)
    assert directory == golden_dir.resolve() and config["text_config"]["num_hidden_layers"] == 3
    assert args.seed == 5
    args = parser.parse_args(["--checkpoint", str(golden_dir), "--layers", "2"])
    with pytest.raises(SystemExit):
        checkpoint_from_args(parser, args, {"vision_layers": "--layers"}, vision_layers=args.layers)
    assert "--layers shape(s) the synthetic slice" in capsys.readouterr().err
    args = parser.parse_args(["--checkpoint", str(golden_dir / "absent")])
    with pytest.raises(SystemExit):
        checkpoint_from_args(parser, args)
    assert "no such directory" in capsys.readouterr().err


def test_derived_files_of_same_named_checkpoints_stay_apart(tmp_path: Path) -> None:
    (tmp_path / "a" / "slice").mkdir(parents=True)
    (tmp_path / "b" / "slice").mkdir(parents=True)
    names = {derived_name(tmp_path / "a" / "slice"), derived_name(tmp_path / "b" / "slice")}
    assert len(names) == 2 and all(n.startswith("slice-") for n in names)


def test_moe_layer_indices() -> None:
    base = {"n_routed_experts": 64, "num_hidden_layers": 5}
    assert moe_layer_indices({**base, "first_k_dense_replace": 1, "moe_layer_freq": 1}) == [1, 2, 3, 4]
    assert moe_layer_indices({**base, "first_k_dense_replace": 1, "moe_layer_freq": 2}) == [2, 4]
    assert moe_layer_indices({**base, "n_routed_experts": None}) == []
