"""Multi-process engines under ``torchrun``: DDP, FSDP2 (``fully_shard``) and DeepSpeed ZeRO-1/2/3.

Facts this relies on (``shared/reference/ecosystem-notes.md`` §2): gloo works for all three on CPU;
accelerate's CPU multi-process path does not, so it is not used. Two MoE-specific rules:

- every rank must run the same collectives in every module. Ranks route tokens to different experts,
  so an expert can be idle on one rank and busy on another; under FSDP2 / ZeRO a parameter with no
  gradient on one rank desynchronises the gradient reduction. ``touch_experts`` adds
  ``0 * sum(expert params)`` to each MoE block's input (a forward pre-hook; values unchanged), so
  every expert gets a gradient on every rank, ready at the same point of the backward pass. A micro-batch without images likewise gets a
  masked one-token dummy image row (``pad_image_row``) so the vision tower runs on every rank.
- under ZeRO-3 the MoE block is a leaf module (``set_z3_leaf_modules``): its parameters are gathered
  together before it runs, otherwise ranks routing to different experts deadlock.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kimivl.decoder.model import DeepseekV3DecoderLayer
from kimivl.decoder.moe import DeepseekV3MoE
from kimivl.training.config import TrainingArguments
from kimivl.training.parallel import DistInfo, LocalEngine, make_optimizer
from kimivl.training.state import TrainerState, save_training_state
from kimivl.vision.moonvit import MoonVitEncoderLayer


def touch_experts(model: nn.Module) -> int:
    """Forward pre-hooks adding ``0 * sum(expert params)`` to each MoE block's input (values unchanged).

    Every expert then gets a gradient on every rank, and -- because this term is built *before* the
    routed dispatch -- autograd finishes each expert's gradient at the same point of the backward pass
    on every rank, whatever the routing. Bucketed reducers that fill buckets in gradient-ready order
    (DeepSpeed ZeRO-1/2) need that; with the zero term added after the dispatch instead, ZeRO-2 reduced
    mismatched buckets and diverged from the single-process run.
    """
    blocks = [m for m in model.modules() if isinstance(m, DeepseekV3MoE)]

    def hook(module: nn.Module, inputs: tuple) -> tuple:
        params = [p for p in module.experts.parameters() if p.requires_grad]
        if not params:
            return inputs
        zero = torch.stack([p.sum() for p in params]).sum() * 0.0
        return (inputs[0] + zero.to(inputs[0].dtype), *inputs[1:])

    for block in blocks:
        block.register_forward_pre_hook(hook)
    return len(blocks)


def pad_image_row(batch: dict[str, torch.Tensor], image_token_id: int, patch_size: int) -> dict[str, torch.Tensor]:
    """``batch`` with one extra row holding a single masked image token and a 2x2-patch black image
    (labels -100, attention 0), when it has no images; otherwise ``batch`` itself."""
    if "pixel_values" in batch:
        return batch
    b, s = batch["input_ids"].shape
    row = torch.zeros(1, s, dtype=batch["input_ids"].dtype)
    row[0, 0] = image_token_id
    out = {"input_ids": torch.cat([batch["input_ids"], row]),
           "labels": torch.cat([batch["labels"], torch.full((1, s), -100, dtype=batch["labels"].dtype)]),
           "attention_mask": torch.cat([batch["attention_mask"], torch.zeros(1, s, dtype=batch["attention_mask"].dtype)])}
    out["pixel_values"] = torch.zeros(4, 3, patch_size, patch_size)
    out["image_grid_hws"] = torch.tensor([[2, 2]], dtype=torch.int64)
    return out


class DDPEngine(LocalEngine):
    """``DistributedDataParallel`` (find_unused_parameters: idle experts / no images are normal)."""

    def __init__(self, model: nn.Module, args: TrainingArguments, info: DistInfo) -> None:
        super().__init__(model, args, info)
        ids = [info.device.index] if info.device.type == "cuda" else None
        self.model = nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)

    def sync_context(self, sync: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if sync else self.model.no_sync()


class FSDP2Engine(LocalEngine):
    """``fully_shard`` on every decoder layer and MoonViT block, then the root; mixed precision with
    ``bf16`` (parameters gathered in bf16, gradients reduced in fp32)."""

    def __init__(self, model: nn.Module, args: TrainingArguments, info: DistInfo) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        device = next(model.parameters()).device
        mesh = init_device_mesh(device.type, (info.world,))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if args.bf16 else \
            MixedPrecisionPolicy()
        touch_experts(model)
        for module in model.modules():
            if isinstance(module, (DeepseekV3DecoderLayer, MoonVitEncoderLayer)):
                fully_shard(module, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        super().__init__(model, args, info)
        self.input_dtype = torch.bfloat16 if args.bf16 else self.input_dtype

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.raw, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {_official(k): v for k, v in sd.items()}

    def save(self, directory: Path, state: TrainerState, *, is_main: bool,
             model_tensors: Callable[[nn.Module], dict[str, torch.Tensor]]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd, optim_sd = get_state_dict(self.raw, self.optimizer, options=opts)
        if is_main:
            save_training_state(directory, model_state={k: v.contiguous() for k, v in model_sd.items()},
                                optimizer_state=optim_sd, scheduler_state=self.scheduler.state_dict(), state=state)
        dist.barrier()

    def load(self, directory: Path, loader: Callable[[Path], tuple]) -> TrainerState:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        model_state, opt, sch, state = loader(directory)
        set_state_dict(self.raw, self.optimizer, model_state_dict=model_state, optim_state_dict=opt,
                       options=StateDictOptions(full_state_dict=True))
        self.scheduler.load_state_dict(sch)
        return state


class DeepSpeedEngine(LocalEngine):
    """DeepSpeed ZeRO stage ``zero_stage`` with our AdamW + LR schedule as client optimizer / scheduler.
    The loss is already normalised per optimizer step, so ``backward(scale_wrt_gas=False)``."""

    def __init__(self, model: nn.Module, args: TrainingArguments, info: DistInfo) -> None:
        try:
            import deepspeed
        except ImportError as e:
            raise ImportError("distributed: deepspeed needs DeepSpeed: DS_BUILD_OPS=0 pip install "
                              "'kimivl[deepspeed]'") from e
        config = self._config(args)
        stage = config["zero_optimization"]["stage"]
        if stage == 3:  # the leaf MoE block is gathered whole; DeepSpeed's hooks would run after ours
            from deepspeed.utils import set_z3_leaf_modules

            set_z3_leaf_modules(model, [DeepseekV3MoE])
        else:
            touch_experts(model)
        self.info, self.raw, self.stage = info, model, stage
        self.device = next(model.parameters()).device
        self.input_dtype = next(model.parameters()).dtype
        optimizer, scheduler = make_optimizer(model, args)
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
        self._deepspeed = deepspeed

    @staticmethod
    def _config(args: TrainingArguments) -> dict[str, Any]:
        import json

        given = args.deepspeed_config
        if isinstance(given, str):
            given = json.loads(Path(given).read_text(encoding="utf-8")) if given.endswith(".json") else \
                __import__("yaml").safe_load(Path(given).read_text(encoding="utf-8"))
        config: dict[str, Any] = dict(given or {})
        config.setdefault("train_micro_batch_size_per_gpu", args.batch_size)
        config.setdefault("gradient_accumulation_steps", args.gradient_accumulation_steps)
        config.setdefault("gradient_clipping", float(args.max_grad_norm or 0.0))
        config.setdefault("zero_optimization", {}).setdefault("stage", args.zero_stage)
        config.setdefault("steps_per_print", 10**9)
        config.setdefault("wall_clock_breakdown", False)
        return config

    def backward(self, loss: torch.Tensor) -> None:  # `lr` and `sync_context` as LocalEngine's
        self.model.backward(loss, scale_wrt_gas=False)
        self.model.step()  # an optimizer step only at the accumulation boundary

    def step(self, max_grad_norm: float | None) -> float:
        norm = self.model.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def gathered(self, params: list[nn.Parameter]) -> contextlib.AbstractContextManager:
        """Full parameters for reading / changing them (ZeRO-3 partitions them; rank 0's change wins)."""
        if self.stage != 3:
            return contextlib.nullcontext()
        return self._deepspeed.zero.GatheredParameters(params, modifier_rank=0)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        with self.gathered(list(self.raw.parameters())):
            return {k: v.detach().to("cpu", copy=True) for k, v in self.raw.state_dict().items()}

    def save(self, directory: Path, state: TrainerState, *, is_main: bool,
             model_tensors: Callable[[nn.Module], dict[str, torch.Tensor]]) -> None:
        self.model.save_checkpoint(str(directory), tag="deepspeed")
        if is_main:
            save_training_state(directory, model_state=None, optimizer_state=None, scheduler_state=None, state=state)
        dist.barrier()

    def load(self, directory: Path, loader: Callable[[Path], tuple]) -> TrainerState:
        self.model.load_checkpoint(str(directory), tag="deepspeed")
        return loader(directory)[3]


def _official(key: str) -> str:
    return key.removeprefix("module.")


def make_engine(model: nn.Module, args: TrainingArguments, info: DistInfo) -> LocalEngine:
    engines = {"ddp": DDPEngine, "fsdp2": FSDP2Engine, "deepspeed": DeepSpeedEngine}
    return engines[info.mode](model, args, info)
