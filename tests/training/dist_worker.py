"""torchrun worker of the distributed tests: trains the golden tiny model on the test conversations.

Usage: ``torchrun --nproc_per_node 2 dist_worker.py CONFIG_JSON RESULT_JSON``. Rank 0 writes
``{"losses": [...], "export_dir": ...}``. The process group is torn down and the process leaves with
``os._exit(0)`` (DeepSpeed on CPU otherwise aborts at interpreter exit, ecosystem-notes §2).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from PIL import Image

GOLDEN = Path(__file__).resolve().parents[2].parent / "shared" / "golden" / "kimivl-tiny"


def conversations() -> list[list[dict[str, Any]]]:
    """The same set as the ``conversations`` fixture of conftest.py."""
    images = [Image.open(GOLDEN / "inputs" / n).convert("RGB")
              for n in ("image_70x98.png", "image_140x56.png", "image_28x28.png")]
    answers = ["a red disc", "two blue squares", "a tiny dot"]
    convs = [[{"role": "user", "content": [{"type": "image", "image": im}, {"type": "text", "text": "What is it?"}]},
              {"role": "assistant", "content": ans}] for im, ans in zip(images, answers)]
    convs.append([{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi there"}])
    return convs


def main() -> None:
    import torch.distributed as dist

    from kimivl.training import train

    config, result_path = json.loads(sys.argv[1]), Path(sys.argv[2])
    # the CPU (gloo) runs the single-process reference is compared with, even where a GPU is present
    result = train({"model": str(GOLDEN), "device": "cpu", **config}, train_data=conversations())
    if not dist.is_initialized() or dist.get_rank() == 0:
        result_path.write_text(json.dumps({"losses": result.losses, "export_dir": str(result.export_dir)}))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
