"""Train the shipped demo model from scratch with the project's trainer, then evaluate it.

    python scripts/train_demo_model.py --out runs/demo --steps 1800        # ~1 h on a 2-core CPU
    python scripts/train_demo_model.py --out runs/demo --steps 20 --eval 5  # smoke run

Steps: lay out the untrained checkpoint directory (configs/demo/config.json, a tiktoken vocabulary,
processor settings), then ``kimivl.training.train`` on an endless, seeded stream of synthetic
conversations (sample i is drawn from a generator seeded with i, so the run is reproducible and
resumable), export in the official layout, and evaluate every task on fresh samples.
With ``--install`` the export is copied to kimivl/assets/kimivl-demo (``kimivl.DEMO_MODEL``).
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import time
from pathlib import Path

from kimivl.demo.build import build_demo_base
from kimivl.demo.evaluate import evaluate
from kimivl.demo.tasks import sample

REPO = Path(__file__).resolve().parents[1]

# Curriculum: task weights by sample index. The vision path is bootstrapped on the tasks whose answer is
# a direct property of the image (colour, shape), then the tasks are added a few at a time while the
# learned ones keep a share of every batch. Mixing all seven from the start made the model answer from
# the question alone (the text prior is easier than the image); adding the reading tasks at full weight
# caused gradient spikes that made the learned tasks collapse (docs/demo-model.md).
CURRICULUM: tuple[tuple[int, dict[str, float]], ...] = (
    (2400, {"color": 1.0, "shape": 1.0}),
    (6400, {"color": 0.5, "shape": 1.0, "direction": 1.0}),
    (12000, {"color": 0.3, "shape": 0.6, "direction": 0.6, "compare": 1.0, "count": 1.0}),
    (20000, {"color": 0.2, "shape": 0.4, "direction": 0.4, "compare": 0.7, "count": 1.0, "number": 1.2}),
    (None, {"color": 0.2, "shape": 0.4, "direction": 0.4, "compare": 0.7, "count": 1.0, "number": 1.2, "pdf": 1.0}),
)


def task_weights(index: int) -> dict[str, float]:
    return next(weights for end, weights in CURRICULUM if end is None or index < end)


def record(index: int, seed: int = 0) -> list[dict]:
    """Training conversation number ``index``: a weighted task draw, media first (10 %: question first)."""
    rng = random.Random(f"demo-{seed}-{index}")
    weights = task_weights(index)
    task = rng.choices(list(weights), weights=list(weights.values()))[0]
    return sample(task, rng).to_messages(text_first=rng.random() < 0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--steps", type=int, default=7000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval", type=int, default=50, help="evaluation samples per task (0: skip)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    parser.add_argument("--install", action="store_true", help="copy the result to kimivl/assets/kimivl-demo")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    out = Path(args.out)
    base = build_demo_base(out / "base")
    from kimivl.training import train

    start = time.time()
    result = train(
        {
            "model": str(base), "from_scratch": True, "output_dir": str(out), "export_dir": str(out / "final"),
            "max_steps": args.steps, "batch_size": args.batch_size, "learning_rate": args.lr,
            "warmup_steps": min(100, args.steps // 10), "lr_scheduler": "cosine", "min_lr_ratio": 0.1,
            "weight_decay": 0.05, "max_grad_norm": 1.0, "seed": args.seed,
            "logging_steps": 10, "save_steps": 100, "progress": "log",
            "resume_from_checkpoint": "latest" if args.resume else None,
        },
        train_data=lambda i: record(i, args.seed),
    )
    train_seconds = time.time() - start
    summary: dict = {"steps": args.steps, "batch_size": args.batch_size, "train_seconds": round(train_seconds, 1),
                     "final_loss": result.losses[-1] if result.losses else None}

    if args.eval:
        from kimivl import KimiVLForConditionalGeneration, KimiVLProcessor

        model = KimiVLForConditionalGeneration.from_pretrained(result.export_dir)
        processor = KimiVLProcessor.from_pretrained(result.export_dir)
        scores = evaluate(model, processor, samples_per_task=args.eval, seed=987654)
        summary["eval"] = {t: {"accuracy": r.accuracy, "n": r.total, "seconds_per_answer": r.seconds / r.total,
                               "failures": r.failures} for t, r in scores.items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))

    if args.install:
        target = REPO / "kimivl" / "assets" / "kimivl-demo"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(result.export_dir, target)
        print(f"installed {target}")


if __name__ == "__main__":
    main()
