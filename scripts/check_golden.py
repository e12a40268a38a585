"""Run a golden set (official layout + expected outputs) through the public API; print JSON.

    python scripts/check_golden.py [GOLDEN_DIR]        # default: ../shared/golden/kimivl-tiny

Reports the max-abs difference of every model output the official implementation stored
(vision stages, projector, decoder hidden states, routing, logits) and whether each is within
the README's tolerance (1e-4).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from kimivl import KimiVLForConditionalGeneration

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-4


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("golden_dir", nargs="?", default=str(REPO.parent / "shared" / "golden" / "kimivl-tiny"))
    args = parser.parse_args()
    golden_dir = Path(args.golden_dir)
    g = load_file(str(golden_dir / "expected" / "expected.safetensors"))
    model = KimiVLForConditionalGeneration.from_pretrained(golden_dir)
    report: dict[str, float] = {}
    diff = lambda a, b: float((a.float() - b.float()).abs().max())  # noqa: E731

    with torch.no_grad():
        vt = model.vision_tower
        pv, grid = g["processor.pixel_values"], g["processor.image_grid_hws"]
        x = vt.patch_embed(pv, grid)
        report["vision.patch_embed_out"] = diff(x, g["vision.patch_embed_out"])
        x = vt.encoder(x, grid)
        report["vision.encoder_out"] = diff(x, g["vision.encoder_out"])
        tower = vt(pv, grid)
        report["vision.tower_out"] = diff(tower, g["vision.tower_out"])
        report["vision.projector_out"] = diff(model.multi_modal_projector(tower), g["vision.projector_out"])

        inputs = {k: g[f"prompt.{k}"] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_hws")}
        out = model(**inputs, output_hidden_states=True)
        for i, h in enumerate(out.hidden_states):
            report[f"prompt.hidden_states.{i}"] = diff(h, g[f"prompt.hidden_states.{i}"])
        report["prompt.logits"] = diff(out.logits, g["prompt.logits"])
        report["text_only.logits"] = diff(model(input_ids=g["text_only.input_ids"]).logits, g["text_only.logits"])

    ok = all(v <= TOL for v in report.values())
    print(json.dumps({"golden": str(golden_dir), "tolerance": TOL, "max_abs": report, "all_within_tolerance": ok}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
