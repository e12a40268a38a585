"""Training arguments: one dataclass whose fields are the YAML keys of a training config.

``load_training_args(path)`` reads a YAML (or JSON) file; an unknown key is an error that names the
closest known key, so a misspelt option (``freez:``) never silently does nothing. Every field is
documented in ``docs/finetune.md``.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kimivl.fieldtypes import float_strings_to_floats, type_problem

LR_SCHEDULERS = ("cosine", "linear", "constant")
PROGRESS_MODES = ("tqdm", "log", "none")
DISTRIBUTED_MODES = ("auto", "none", "ddp", "fsdp2", "deepspeed")
STAGES = ("sft", "vision")
POOLINGS = ("max_mean", "sum")  # vision-stage heads: see kimivl/training/vision_stage.py


@dataclass
class TrainingArguments:
    """Options of one fine-tuning run (the YAML keys)."""

    # --- model and processor
    model: str | None = None  # checkpoint directory (official layout) or hub id
    from_scratch: bool = False  # build the model from <model>/config.json and initialise it (init_weights)
    processor: str | None = None  # directory with the tokenizer / preprocessor files; default: model
    dtype: str = "float32"  # parameter dtype while training (float32 recommended; bf16 = autocast below)
    device: str = "auto"  # auto = this process's GPU (cuda:LOCAL_RANK) when CUDA is available, else cpu
    # --- what is trained
    stage: str = "sft"  # sft: chat conversations; vision: the vision tower on image labels (vision_stage.py)
    vision_labels: dict[str, list[str]] | None = None  # stage vision: label set -> class names
    vision_pooling: dict[str, str] = field(default_factory=dict)  # label set -> max_mean (default) or sum
    # --- data
    train_file: str | list[str] | None = None  # JSONL file(s): {"messages": [...]} or sharegpt records
    max_seq_len: int | None = None  # longer samples are skipped (logged); None = the model context
    shuffle: bool = True
    # --- output
    output_dir: str = "runs/kimivl-sft"
    export_dir: str | None = None  # default: <output_dir>/final; "" disables the export
    export_dtype: str | None = None  # e.g. "bfloat16"; default: the training dtype
    # --- optimisation
    max_steps: int = 100  # optimizer steps
    batch_size: int = 1  # conversations per micro-batch (per process)
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-5
    min_lr_ratio: float = 0.0  # cosine/linear decay floor as a fraction of learning_rate
    lr_scheduler: str = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0  # applied to >= 2-D weights only (not norms, biases, gate bias)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8
    max_grad_norm: float | None = 1.0  # None or 0 = no clipping
    bf16: bool = False  # torch.autocast(bfloat16) around forward
    gradient_checkpointing: bool = False  # recompute decoder layers / vision blocks in backward
    seed: int = 0
    # --- what to train
    freeze: list[str] = field(default_factory=list)  # parameter-name prefixes, e.g. [vision_tower]
    # --- MoE routing in training (off by default: the checkpoint's noaux_tc routing as is)
    balance_loss_alpha: float = 0.0  # sequence-level balance loss weight (DeepSeek-V3 "seq aux")
    bias_update_speed: float = 0.0  # aux-free e_score_correction_bias update per step (DeepSeek-V3 gamma)
    router_stats: bool = True  # log expert load per MoE layer
    # --- LoRA (peft)
    lora: bool = False
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_targets: str | list[str] | None = None  # None = MLA-correct defaults (docs/finetune.md)
    lora_vision: bool = False  # also adapt the vision tower
    lora_merge_on_export: bool = True
    # --- scale-out
    distributed: str = "auto"  # auto = ddp under torchrun with WORLD_SIZE > 1, else none
    deepspeed_config: str | dict[str, Any] | None = None  # ds config (file or dict); zero_stage fills it
    zero_stage: int = 2
    # --- bookkeeping
    logging_steps: int = 1
    save_steps: int = 0  # 0 = only at the end
    save_total_limit: int | None = 2
    resume_from_checkpoint: str | None = None  # a checkpoint dir, or "latest" (in output_dir)
    progress: str = "tqdm"

    def __post_init__(self) -> None:
        float_strings_to_floats(self)
        if isinstance(self.train_file, str):
            self.train_file = [self.train_file]
        if isinstance(self.freeze, str):
            self.freeze = [self.freeze]
        if self.vision_labels is not None:
            if not isinstance(self.vision_labels, dict) or not all(isinstance(v, (list, tuple))
                                                                   for v in self.vision_labels.values()):
                raise ValueError(f"training config: vision_labels must map label-set names to lists of class names, "
                                 f"got {self.vision_labels!r:.120}")
            # YAML reads `[1, 2, 3]` as numbers; classes are compared as strings
            self.vision_labels = {str(k): [str(c) for c in v] for k, v in self.vision_labels.items()}
        if not isinstance(self.vision_pooling, dict):
            raise ValueError(f"training config: vision_pooling must map label-set names to {POOLINGS}, "
                             f"got {self.vision_pooling!r:.120}")
        for name, pooling in self.vision_pooling.items():
            if pooling not in POOLINGS:
                raise ValueError(f"training config: vision_pooling[{name!r}] = {pooling!r}; expected one of {POOLINGS}")
            if name not in (self.vision_labels or {}):
                raise ValueError(f"training config: vision_pooling names {name!r}, which is not a label set of "
                                 f"vision_labels ({sorted(self.vision_labels or {})})")
        problem = type_problem(self)
        if problem is not None:
            name, value, must = problem
            raise ValueError(f"training config: {name} = {value!r} must be {must}, got {type(value).__name__}")
        checks = [
            (self.max_steps >= 1, "max_steps", self.max_steps, ">= 1"),
            (self.batch_size >= 1, "batch_size", self.batch_size, ">= 1"),
            (self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", self.gradient_accumulation_steps,
             ">= 1"),
            (self.learning_rate >= 0, "learning_rate", self.learning_rate, ">= 0"),
            (self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, ">= 0"),
            (0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", self.min_lr_ratio, "in [0, 1]"),
            (self.lr_scheduler in LR_SCHEDULERS, "lr_scheduler", self.lr_scheduler, f"one of {LR_SCHEDULERS}"),
            (self.stage in STAGES, "stage", self.stage, f"one of {STAGES}"),
            (re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(self.device)) is not None, "device", self.device,
             "auto, cpu, cuda or cuda:N"),
            (self.stage != "vision" or self.distributed in ("auto", "none", "ddp"), "distributed", self.distributed,
             "auto, none or ddp with stage vision"),
            (self.progress in PROGRESS_MODES, "progress", self.progress, f"one of {PROGRESS_MODES}"),
            (self.distributed in DISTRIBUTED_MODES, "distributed", self.distributed, f"one of {DISTRIBUTED_MODES}"),
            (self.zero_stage in (1, 2, 3), "zero_stage", self.zero_stage, "1, 2 or 3"),
            (self.logging_steps >= 1, "logging_steps", self.logging_steps, ">= 1"),
            (self.save_steps >= 0, "save_steps", self.save_steps, ">= 0"),
            (self.balance_loss_alpha >= 0, "balance_loss_alpha", self.balance_loss_alpha, ">= 0"),
            (self.bias_update_speed >= 0, "bias_update_speed", self.bias_update_speed, ">= 0"),
            (self.lora_r >= 1, "lora_r", self.lora_r, ">= 1"),
        ]
        for ok, key, value, rule in checks:
            if not ok:
                raise ValueError(f"training config: {key} = {value!r} must be {rule}")

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingArguments:
        """Build from a mapping; unknown keys raise ``ValueError`` naming the closest valid key."""
        if not isinstance(data, dict):
            raise ValueError(f"a training config is a mapping of keys to values, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in data if k not in names]
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(str(key), names, n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ValueError(f"training config: unknown key(s) {', '.join(hints)}; valid keys: {', '.join(names)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainingArguments:
        """A copy with some fields changed (validated again)."""
        return TrainingArguments.from_dict({**self.to_dict(), **changes})


def load_training_args(path: str | Path, **overrides: Any) -> TrainingArguments:
    """Read a YAML (``.yaml``/``.yml``) or JSON training config; ``overrides`` replace file values."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
    else:
        try:
            import yaml
        except ImportError as e:
            raise ImportError("reading YAML training configs needs pyyaml: pip install 'kimivl[train]'") from e
        data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a training config is a mapping of keys to values, got {type(data).__name__}")
    return TrainingArguments.from_dict({**data, **overrides})
