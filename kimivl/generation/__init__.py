"""Generation: decoding defaults, the prefill/decode loop over an MLA latent cache, text streaming.

See docs/generation.md.
"""
from __future__ import annotations

from kimivl.generation.config import GenerationConfig
from kimivl.generation.detokenize import IncrementalDetokenizer
from kimivl.generation.generate import (
    GenerateOutput,
    decode_step,
    generate,
    prefill,
    resolve_generation_config,
    stream,
)
from kimivl.generation.grammar import GrammarConstraint
from kimivl.generation.processors import LogitBias, PresenceFrequencyPenalty
from kimivl.generation.prompt_cache import PromptCache

__all__ = [
    "GenerateOutput",
    "GenerationConfig",
    "GrammarConstraint",
    "IncrementalDetokenizer",
    "LogitBias",
    "PresenceFrequencyPenalty",
    "PromptCache",
    "decode_step",
    "generate",
    "prefill",
    "resolve_generation_config",
    "stream",
]
