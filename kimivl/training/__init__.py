"""Fine-tuning Kimi-VL: data, collation, freezing, initialisation, routing statistics, the loop, export.

Usage and every config key: ``docs/finetune.md``. Nothing below ``kimivl/training`` is imported by
the model code.
"""
from __future__ import annotations

from kimivl.training.collate import collate
from kimivl.training.config import TrainingArguments, load_training_args
from kimivl.training.data import (ConversationDataset, SampleStream, SFTExample, encode_conversation, read_jsonl,
                                  sharegpt_to_messages, to_messages)
from kimivl.training.export import PROCESSOR_FILES, copy_processor_files, export_pretrained
from kimivl.training.freeze import assert_unchanged, freeze, parameter_summary, snapshot, trainable_parameters
from kimivl.training.init import init_weights
from kimivl.training.routing import RouterMonitor
from kimivl.training.run import build_model, build_processor, train
from kimivl.training.trainer import Trainer, TrainResult, enable_gradient_checkpointing, lr_lambda, token_loss_sum

__all__ = [
    "PROCESSOR_FILES", "ConversationDataset", "RouterMonitor", "SFTExample", "SampleStream", "TrainResult", "Trainer",
    "TrainingArguments", "assert_unchanged", "build_model", "build_processor", "collate", "copy_processor_files",
    "enable_gradient_checkpointing", "encode_conversation", "export_pretrained", "freeze", "init_weights",
    "load_training_args", "lr_lambda", "parameter_summary", "read_jsonl", "sharegpt_to_messages", "snapshot",
    "token_loss_sum", "to_messages", "train", "trainable_parameters",
]
