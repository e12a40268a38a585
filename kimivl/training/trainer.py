"""The SFT loop: AdamW, warmup + cosine LR, clipping, accumulation, bf16 autocast, checkpointing, export.

One optimizer step = ``gradient_accumulation_steps`` micro-batches of ``batch_size`` conversations per
process. The loss is the token-level mean over *all* trainable tokens of the step (every micro-batch,
every process): each micro-batch backpropagates ``sum(CE) * world / tokens_in_step``, so the curve does
not depend on how a step is split into micro-batches or processes. Frozen prefixes are verified
bit-identical at the end. Metrics go to ``<output_dir>/metrics.jsonl``; the display (tqdm or log lines)
shows step, loss, tokens/s and ETA.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kimivl.errors import KimiVLInputError
from kimivl.modeling import KimiVLForConditionalGeneration
from kimivl.processing import IGNORE_INDEX, KimiVLProcessor
from kimivl.training import parallel
from kimivl.training.collate import collate
from kimivl.training.config import TrainingArguments
from kimivl.training.data import SampleStream, SFTExample, encode_conversation
from kimivl.training.export import export_pretrained
from kimivl.training.freeze import assert_unchanged, freeze, parameter_summary, snapshot
from kimivl.training.routing import RouterMonitor
from kimivl.training.state import (CHECKPOINT_PREFIX, TrainerState, load_training_state, model_tensors,
                                   resolve_resume, rotate_checkpoints)

logger = logging.getLogger(__name__)
METRICS_FILE = "metrics.jsonl"


@dataclass
class TrainResult:
    """``losses``: one token-mean loss per optimizer step of this run (resumed steps included)."""

    step: int
    losses: list[float]
    metrics_file: Path
    export_dir: Path | None = None
    checkpoint_dir: Path | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


def lr_lambda(args: TrainingArguments):
    """Multiplier of ``learning_rate`` at optimizer step ``s`` (0-based): linear warmup to 1 over
    ``warmup_steps`` steps, then cosine / linear decay to ``min_lr_ratio`` at ``max_steps``, or constant."""
    warmup, total, floor = args.warmup_steps, args.max_steps, args.min_lr_ratio

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        if args.lr_scheduler == "constant":
            return 1.0
        progress = min(1.0, (s - warmup) / max(1, total - warmup))
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if args.lr_scheduler == "cosine" else 1.0 - progress
        return floor + (1.0 - floor) * shape

    return factor


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Sum (not mean) of the shifted next-token cross-entropy over labelled, unpadded positions (fp32)."""
    targets = labels[:, 1:]
    if attention_mask is not None:
        targets = targets.masked_fill(attention_mask[:, 1:] == 0, IGNORE_INDEX)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def enable_gradient_checkpointing(model: nn.Module) -> int:
    """Recompute every decoder layer and MoonViT block in backward (``torch.distributed._composable.checkpoint``:
    hooks only, parameter names unchanged). Returns the number of wrapped blocks."""
    from torch.distributed._composable import checkpoint

    from kimivl.decoder.model import DeepseekV3DecoderLayer
    from kimivl.vision.moonvit import MoonVitEncoderLayer

    blocks = [m for m in model.modules() if isinstance(m, (DeepseekV3DecoderLayer, MoonVitEncoderLayer))]
    for block in blocks:
        checkpoint(block)
    return len(blocks)


class Trainer:
    """Fine-tunes ``model`` on ``train_data`` (or ``args.train_file``) with ``processor``'s renderer.

    ``train_data``: a list / map-style dataset of records or :class:`SFTExample`, an iterable or
    ``IterableDataset`` of records, or a callable ``f(index) -> record`` (records as in
    :mod:`kimivl.training.data`). ``asset_dirs``: directories whose processor files are copied into the
    export (default: ``args.processor`` and ``args.model``).
    """

    def __init__(self, model: nn.Module, processor: KimiVLProcessor, args: TrainingArguments,
                 train_data: Any = None, *, asset_dirs: list[str | Path | None] | None = None) -> None:
        self.args = args
        self.processor = processor
        self.model = model
        self.output_dir = Path(args.output_dir)
        self.asset_dirs = asset_dirs if asset_dirs is not None else [args.processor, args.model]
        if train_data is None:
            if not args.train_file:
                raise ValueError("no training data: pass train_data=... or set train_file in the config")
            train_data = list(args.train_file) if len(args.train_file) > 1 else args.train_file[0]
        self.stream = SampleStream(train_data, seed=args.seed, shuffle=args.shuffle)
        self.state = TrainerState(args=args.to_dict())
        base = self.base_model
        context = base.config.text_config.max_position_embeddings if hasattr(base, "config") else None
        self.max_seq_len = args.max_seq_len or context
        self.pad_token_id = processor.tokenizer.pad_token_id
        self.skipped = 0

        self.dist = parallel.setup(args)  # also the device (config key ``device``), where the model moves now
        model.to(self.dist.device)
        self.frozen = freeze(model, args.freeze) if args.freeze else []
        self.lora = None
        if args.lora:
            from kimivl.training.lora import apply_lora

            self.model = model = apply_lora(model, args)
            self.lora = model
            if args.freeze:  # LoRA weights under a frozen prefix stay frozen as well
                freeze(model, args.freeze)
        self._frozen_ref = snapshot(model, args.freeze) if args.freeze else {}
        if args.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        needs_router = args.router_stats or args.balance_loss_alpha > 0 or args.bias_update_speed > 0
        self.monitor = RouterMonitor(model, keep_scores=args.balance_loss_alpha > 0) if needs_router else None
        self.engine = parallel.wrap(model, args, self.dist)
        self.optimizer, self.scheduler = self.engine.optimizer, self.engine.scheduler
        logger.info("parameters per tower: %s", parameter_summary(model))

    # ------------------------------------------------------------------ properties
    @property
    def base_model(self) -> KimiVLForConditionalGeneration:
        """The plain model under any LoRA / parallel wrapper."""
        model = self.model
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        return model

    @property
    def is_main(self) -> bool:
        return self.dist.rank == 0

    # ------------------------------------------------------------------ data
    def _records(self) -> Iterator[tuple[int, Any]]:
        """This process's records, from ``state.position`` on (each process takes every world-th record)."""
        for position, record in self.stream.iterate(self.state.position):
            if position % self.dist.world != self.dist.rank:
                continue
            self.state.position = position + 1
            yield position, record

    def _examples(self) -> Iterator[SFTExample]:
        """This process's encoded examples; over-long or label-free conversations are skipped (logged)."""
        for position, record in self._records():
            if isinstance(record, SFTExample):
                example = record
            else:
                try:
                    example = encode_conversation(self.processor, record)
                except KimiVLInputError as e:
                    # Over-long conversations are data, not bugs: skip them; any other input error is raised.
                    if "over the model context" not in str(e):
                        raise
                    example = None
            if example is None or (self.max_seq_len and example.num_tokens > self.max_seq_len) \
                    or example.num_trainable_tokens == 0:
                self.skipped += 1
                logger.warning("skipping record %d (%s)", position, "too long" if example is None or
                               example.num_tokens > (self.max_seq_len or 0) else "no assistant tokens")
                continue
            yield example

    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        examples = self._examples()
        while True:
            chunk = [ex for _, ex in zip(range(self.args.batch_size), examples)]
            if not chunk:
                return
            yield self._collate(chunk)

    def _collate(self, examples: list[Any]) -> dict[str, Any]:
        return collate(examples, self.pad_token_id)

    # ------------------------------------------------------------------ one step
    def _count(self, batch: dict[str, torch.Tensor]) -> tuple[float, float]:
        """(trainable, total) tokens of one micro-batch: the loss is the mean over the trainable ones."""
        mask = batch["attention_mask"]
        trainable = ((batch["labels"][:, 1:] != IGNORE_INDEX) & (mask[:, 1:] == 1)).sum()
        return float(trainable), float(mask.sum())

    def _forward_backward(self, batch: dict[str, torch.Tensor], tokens_in_step: float,
                          sync: bool) -> tuple[float, float]:
        device = self.engine.device
        if self.dist.mode in ("fsdp2", "deepspeed"):  # every rank must run the vision tower (collectives)
            from kimivl.training.sharded import pad_image_row

            batch = pad_image_row(batch, self.processor.image_token_id, self.processor.image_processor.patch_size)
        batch = {k: v.to(device) for k, v in batch.items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(self.engine.input_dtype)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if self.args.bf16 else contextlib.nullcontext()
        with self.engine.sync_context(sync), autocast:
            if self.monitor is not None:
                self.monitor.start(batch["attention_mask"])
            out = self.engine.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    pixel_values=batch.get("pixel_values"), image_grid_hws=batch.get("image_grid_hws"))
            loss_sum = token_loss_sum(out.logits, batch["labels"], batch["attention_mask"])
            loss = loss_sum * (self.dist.world / tokens_in_step)
            aux = self.monitor.balance_loss(self.args.balance_loss_alpha) if self.monitor is not None else None
            if aux is not None:
                loss = loss + aux / self.args.gradient_accumulation_steps
            if self.monitor is not None:
                self.monitor.stop()
            self.engine.backward(loss)
        return float(loss_sum.detach()), float(aux.detach()) if aux is not None else 0.0

    def train(self) -> TrainResult:
        """Run to ``max_steps`` (resuming first if asked), save a final checkpoint, export, verify freezing."""
        args = self.args
        resume = resolve_resume(args.resume_from_checkpoint, self.output_dir)
        if resume is not None:
            self.load_checkpoint(resume)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        metrics_path = self.output_dir / METRICS_FILE
        metrics = metrics_path.open("a", encoding="utf-8") if self.is_main else None
        progress = self._progress()
        batches = self._batches()
        history: list[dict[str, Any]] = []
        self.engine.model.train()
        start_step, t_start = self.state.step, time.perf_counter()
        last_ckpt = None
        try:
            while self.state.step < args.max_steps:
                t0 = time.perf_counter()
                micro = [b for _, b in zip(range(args.gradient_accumulation_steps), batches)]
                if not micro:
                    logger.warning("the training data ran out at step %d", self.state.step)
                    break
                per_batch = [self._count(b) for b in micro]
                counts = torch.tensor([sum(c[0] for c in per_batch), sum(c[1] for c in per_batch), 0.0, 0.0],
                                      dtype=torch.float64)
                counts[2:] = self._global_sum(counts[:2].clone())
                tokens_in_step = max(float(counts[2]), 1.0)
                lr = self.engine.lr  # the rate this step uses (the scheduler moves on with the step)
                loss_sum = aux_sum = 0.0
                for i, batch in enumerate(micro):
                    ls, aux = self._forward_backward(batch, tokens_in_step, sync=i == len(micro) - 1)
                    loss_sum, aux_sum = loss_sum + ls, aux_sum + aux
                grad_norm = self.engine.step(args.max_grad_norm)
                if self.monitor is not None:
                    self.monitor.all_reduce_load()
                    if args.bias_update_speed > 0:
                        biases = [r.gate.e_score_correction_bias for r in self.monitor.records]
                        with self.engine.gathered([b for b in biases if b is not None]):
                            self.monitor.update_bias(args.bias_update_speed)
                reduced = self._global_sum(torch.tensor([loss_sum, aux_sum], dtype=torch.float64))
                loss = float(reduced[0]) / tokens_in_step
                self.state.step += 1
                self.state.losses.append(loss)
                dt = time.perf_counter() - t0
                done = self.state.step - start_step
                eta = (time.perf_counter() - t_start) / done * (args.max_steps - self.state.step)
                record = {"step": self.state.step, "loss": loss, "lr": lr,
                          "grad_norm": grad_norm, "trainable_tokens": int(counts[2]), "tokens": int(counts[3]),
                          "tokens_per_s": float(counts[3]) / dt, "step_time_s": dt, "eta_s": eta,
                          "samples_seen": self.state.position, "skipped": self.skipped}
                if args.balance_loss_alpha > 0:
                    record["balance_loss"] = float(reduced[1]) / (self.dist.world * len(micro))
                if self.monitor is not None and len(self.monitor) and (self.state.step % args.logging_steps == 0
                                                                       or self.state.step == args.max_steps):
                    record["router_imbalance"] = self.monitor.imbalance()
                    record["router_load"] = self.monitor.load_fractions()
                if self.monitor is not None:
                    self.monitor.reset_load()
                history.append(record)
                self._display(progress, record)
                if metrics is not None and (self.state.step % args.logging_steps == 0
                                            or self.state.step == args.max_steps):
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                if args.save_steps and self.state.step % args.save_steps == 0 and self.state.step < args.max_steps:
                    last_ckpt = self.save_checkpoint()
        finally:
            if progress is not None:
                progress.close()
            if metrics is not None:
                metrics.close()
        last_ckpt = self.save_checkpoint()
        if self._frozen_ref:
            assert_unchanged(self.model, self._frozen_ref)
            logger.info("verified: %d frozen parameters are bit-identical", len(self._frozen_ref))
        export_dir = self.export() if args.export_dir != "" else None
        return TrainResult(self.state.step, list(self.state.losses), metrics_path, export_dir, last_ckpt, history)

    def _global_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.dist.world > 1:
            t = t.clone()
            dist.all_reduce(t)
        return t

    # ------------------------------------------------------------------ display
    def _progress(self) -> Any:
        if not self.is_main or self.args.progress != "tqdm":
            return None
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return None
        return tqdm(total=self.args.max_steps, initial=self.state.step, desc="train", unit="step", dynamic_ncols=True)

    def _display(self, progress: Any, r: dict[str, Any]) -> None:
        if not self.is_main:
            return
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{r['loss']:.4f}", lr=f"{r['lr']:.2e}", tok_s=f"{r['tokens_per_s']:.0f}")
        elif self.args.progress == "log" and (r["step"] % self.args.logging_steps == 0
                                              or r["step"] == self.args.max_steps):
            logger.info("step %d/%d loss %.4f lr %.2e grad_norm %.3f tokens/s %.0f eta %s", r["step"],
                        self.args.max_steps, r["loss"], r["lr"], r["grad_norm"], r["tokens_per_s"],
                        time.strftime("%H:%M:%S", time.gmtime(r["eta_s"])))

    # ------------------------------------------------------------------ checkpoints and export
    def save_checkpoint(self, directory: str | Path | None = None) -> Path:
        """Write the resumable state (see :mod:`kimivl.training.state`); returns the directory."""
        directory = Path(directory) if directory is not None else self.output_dir / f"{CHECKPOINT_PREFIX}{self.state.step}"
        if self.dist.world > 1:
            pos = torch.tensor([self.state.position], dtype=torch.int64)
            dist.all_reduce(pos, op=dist.ReduceOp.MAX)
            self.state.position = int(pos)
        self.engine.save(directory, self.state, is_main=self.is_main, model_tensors=model_tensors)
        if self.is_main:
            rotate_checkpoints(self.output_dir, self.args.save_total_limit)
        return directory

    def load_checkpoint(self, directory: str | Path) -> None:
        """Restore model, optimizer, scheduler, step, data position and RNG from a checkpoint directory."""
        directory = Path(directory)
        self.state = self.engine.load(directory, load_training_state)
        logger.info("resumed from %s at step %d (record %d)", directory, self.state.step, self.state.position)

    def export(self, directory: str | Path | None = None) -> Path | None:
        """Export in the official layout (LoRA merged unless ``lora_merge_on_export`` is off, then the adapter
        is saved instead). Returns the directory (None on non-main processes)."""
        directory = Path(directory or self.args.export_dir or self.output_dir / "final")
        full = self.engine.full_state_dict()  # collective under sharding: every rank takes part
        if not self.is_main:
            return None
        model = self.base_model
        if self.lora is not None:
            from kimivl.training.lora import export_lora

            return export_lora(self.lora, directory, self.args, sources=self.asset_dirs)
        if self.args.export_dtype:
            dtype = getattr(torch, self.args.export_dtype)
            full = full if full is not None else model.state_dict()
            # the router bias stays float32 in every dtype, as from_pretrained keeps it
            full = {k: v.to(dtype) if v.is_floating_point() and not k.endswith("e_score_correction_bias") else v
                    for k, v in full.items()}
        return export_pretrained(model, directory, sources=self.asset_dirs, state_dict=full)
