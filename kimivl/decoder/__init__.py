"""Moonlight / DeepSeek-V3 MoE decoder (the ``language_model`` of Kimi-VL). See docs/decoder.md."""
from __future__ import annotations

from kimivl.decoder.attention import DeepseekV3Attention
from kimivl.decoder.cache import MLACache
from kimivl.decoder.mlp import DeepseekV3MLP
from kimivl.decoder.model import (
    CausalLMOutput,
    DeepseekV3DecoderLayer,
    DeepseekV3ForCausalLM,
    DeepseekV3Model,
    DeepseekV3ModelOutput,
)
from kimivl.decoder.moe import DeepseekV3MoE, MoEGate
from kimivl.decoder.norm import DeepseekV3RMSNorm

__all__ = [
    "CausalLMOutput",
    "DeepseekV3Attention",
    "DeepseekV3DecoderLayer",
    "DeepseekV3ForCausalLM",
    "DeepseekV3MLP",
    "DeepseekV3MoE",
    "DeepseekV3Model",
    "DeepseekV3ModelOutput",
    "DeepseekV3RMSNorm",
    "MLACache",
    "MoEGate",
]
