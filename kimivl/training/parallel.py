"""Execution engines: one process, or ``torchrun`` with DDP / FSDP2 / DeepSpeed ZeRO (``kimivl.training.sharded``).

An engine owns what differs between them: the wrapped model to call, the optimizer and LR scheduler,
backward, the optimizer step with clipping, gradient-sync suppression during accumulation, and the
save / load of the resumable state. The loop in :mod:`kimivl.training.trainer` is the same for all.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kimivl.training.config import TrainingArguments
from kimivl.training.state import TrainerState, save_training_state


@dataclass(frozen=True)
class DistInfo:
    """``mode``: none | ddp | fsdp2 | deepspeed; ``world`` processes, this one is ``rank``, training on ``device``."""

    mode: str
    world: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device = torch.device("cpu")


def resolve_device(spec: str, local_rank: int | None = None) -> torch.device:
    """The device a training process runs on, from the config's ``device``: ``auto`` is CUDA when available,
    else the CPU; ``cuda`` without an index is this process's GPU, ``cuda:LOCAL_RANK`` (``cuda:0`` outside
    torchrun). A device that is not there is a ``ValueError`` naming what is."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"training config: device = {spec!r} is not a device; expected auto, cpu, cuda or "
                         f"cuda:N") from e
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise ValueError(f"training config: device = {spec!r}; training runs on auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(f"training config: device = {spec!r}, but no CUDA device is available (torch "
                         f"{torch.__version__}); use device: cpu (or auto)")
    index, count = (local_rank if device.index is None else device.index), torch.cuda.device_count()
    if index >= count:
        raise ValueError(f"training config: device = {spec!r} is cuda:{index} (LOCAL_RANK={local_rank}), but "
                         f"{count} CUDA device(s) are visible")
    return torch.device("cuda", index)


def setup(args: TrainingArguments) -> DistInfo:
    """Decide the mode (``auto`` = ddp when launched by torchrun with WORLD_SIZE > 1) and the device, and join
    the process group (gloo on the CPU, nccl on CUDA) if needed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(args.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # nccl and the FSDP2 mesh take the current device
    mode = args.distributed
    if mode == "auto":
        mode = "ddp" if world > 1 else "none"
    if mode == "none":
        if world > 1:
            raise ValueError(f"distributed: none, but WORLD_SIZE={world}; choose ddp, fsdp2 or deepspeed")
        return DistInfo("none", device=device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(mode, dist.get_world_size(), dist.get_rank(), local_rank, device)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters; weight decay on >= 2-D tensors only (not norms, biases)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(model: nn.Module, args: TrainingArguments) -> tuple[torch.optim.Optimizer, Any]:
    from kimivl.training.trainer import lr_lambda

    groups = param_groups(model, args.weight_decay)
    if not groups:
        raise ValueError("nothing to train: every parameter is frozen")
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  eps=args.adam_epsilon)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args))


class LocalEngine:
    """One process (also the base of DDP and FSDP2: they differ in wrapping, sync and state I/O)."""

    def __init__(self, model: nn.Module, args: TrainingArguments, info: DistInfo) -> None:
        self.info = info
        self.raw = model
        self.model = model
        self.device = next(model.parameters()).device
        self.input_dtype = next((p.dtype for n, p in model.named_parameters() if "vision_tower" in n),
                                torch.float32)
        self.optimizer, self.scheduler = make_optimizer(model, args)
        self.trainable = [p for p in model.parameters() if p.requires_grad]

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def sync_context(self, sync: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def _clip(self, max_norm: float | None) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return 0.0
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)

    def step(self, max_grad_norm: float | None) -> float:
        # Every trainable parameter steps every step: an expert no token was routed to (or the vision
        # tower in a text-only step) gets a zero gradient instead of none, as under FSDP2 / ZeRO where
        # idle experts must take part in the reduction. AdamW then moves it by its momentum only.
        for p in self.trainable:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        norm = self._clip(max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def gathered(self, params: list[nn.Parameter]) -> contextlib.AbstractContextManager:
        """Context in which ``params`` are full tensors that may be changed in place (ZeRO-3 overrides)."""
        return contextlib.nullcontext()

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Gathered official-key weights for the export; None = use the unwrapped model directly."""
        return None

    def save(self, directory: Path, state: TrainerState, *, is_main: bool,
             model_tensors: Callable[[nn.Module], dict[str, torch.Tensor]]) -> None:
        if is_main:
            save_training_state(directory, model_state=model_tensors(self.raw),
                                optimizer_state=self.optimizer.state_dict(),
                                scheduler_state=self.scheduler.state_dict(), state=state)
        if self.info.world > 1:
            dist.barrier()

    def load(self, directory: Path, loader: Callable[[Path], tuple]) -> TrainerState:
        model_state, opt, sch, state = loader(directory)
        if model_state is not None:
            self.raw.load_state_dict(model_state, strict=True)
        if opt is not None:
            self.optimizer.load_state_dict(opt)
        if sch is not None:
            self.scheduler.load_state_dict(sch)
        return state


def wrap(model: nn.Module, args: TrainingArguments, info: DistInfo) -> LocalEngine:
    """The engine for ``info.mode``."""
    if info.mode == "none":
        return LocalEngine(model, args, info)
    from kimivl.training import sharded

    return sharded.make_engine(model, args, info)
