"""Resumable training state: model, optimizer, LR scheduler, step, data position and RNG.

A checkpoint is a directory ``<output_dir>/checkpoint-<step>/`` holding ``model.safetensors`` (every
parameter of the training model, wrapper names included, e.g. LoRA's), ``optimizer.pt`` and
``scheduler.pt`` (tensors and numbers only: read back with ``torch.load(weights_only=True)``, never
arbitrary pickles), ``rng.pt`` (the torch CPU generator state) and ``trainer_state.json`` (step, data
position, loss history, the arguments). This is training state, not an export: the official-layout
model is written by :mod:`kimivl.training.export`.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"


@dataclass
class TrainerState:
    """What the loop needs besides tensors: ``step`` (optimizer steps done), ``position`` (raw records
    consumed), the per-step loss history and the arguments the run was started with."""

    step: int = 0
    position: int = 0
    losses: list[float] = field(default_factory=list)
    args: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"step": self.step, "position": self.position, "losses": self.losses, "args": self.args},
                          indent=2) + "\n"

    @classmethod
    def from_file(cls, path: Path) -> TrainerState:
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(int(data["step"]), int(data["position"]), list(data.get("losses", [])), data.get("args", {}))


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as separate CPU tensors (tied weights are stored under each name)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def save_training_state(directory: Path, *, model_state: dict[str, torch.Tensor] | None,
                        optimizer_state: dict[str, Any] | None, scheduler_state: dict[str, Any] | None,
                        state: TrainerState) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    if model_state is not None:
        save_file(model_state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    if optimizer_state is not None:
        torch.save(optimizer_state, directory / "optimizer.pt")
    if scheduler_state is not None:
        torch.save(scheduler_state, directory / "scheduler.pt")
    torch.save({"torch": torch.get_rng_state()}, directory / "rng.pt")
    (directory / STATE_FILE).write_text(state.to_json(), encoding="utf-8")
    return directory


def load_training_state(directory: Path) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any] | None,
                                                 dict[str, Any] | None, TrainerState]:
    """Read a checkpoint directory (and restore the torch RNG). Missing optional files come back as None."""
    if not (directory / STATE_FILE).is_file():
        raise FileNotFoundError(f"{directory} is not a training checkpoint (no {STATE_FILE})")
    model_state = load_file(str(directory / "model.safetensors")) if (directory / "model.safetensors").is_file() else None
    opt = torch.load(directory / "optimizer.pt", weights_only=True) if (directory / "optimizer.pt").is_file() else None
    sch = torch.load(directory / "scheduler.pt", weights_only=True) if (directory / "scheduler.pt").is_file() else None
    if (directory / "rng.pt").is_file():
        torch.set_rng_state(torch.load(directory / "rng.pt", weights_only=True)["torch"])
    return model_state, opt, sch, TrainerState.from_file(directory / STATE_FILE)


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoint directories of a run, oldest first."""
    found = []
    for path in Path(output_dir).glob(CHECKPOINT_PREFIX + "*"):
        m = re.fullmatch(re.escape(CHECKPOINT_PREFIX) + r"(\d+)", path.name)
        if m and (path / STATE_FILE).is_file():
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


def resolve_resume(value: str | None, output_dir: Path) -> Path | None:
    """``None`` -> None; ``"latest"`` -> the newest checkpoint in ``output_dir`` (None if there is none);
    otherwise the given directory, which must exist."""
    if value is None:
        return None
    if value == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(value)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"resume_from_checkpoint={value!r}: no {STATE_FILE} there")
    return path


def rotate_checkpoints(output_dir: Path, keep: int | None) -> None:
    """Delete all but the ``keep`` newest checkpoints."""
    if keep is None or keep <= 0:
        return
    for path in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
