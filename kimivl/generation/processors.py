"""OpenAI-style logits processors for ``generate(logits_processor=[...])``: presence / frequency penalties and
logit bias, with the meaning the OpenAI API (and vLLM's sampling parameters) give them.

transformers' ``LogitsProcessor`` call: ``(ids so far (B, S + t), scores (B, vocab) float32) -> scores``.
Pure tensor work in :mod:`kimivl.ops.sampling`; these objects hold the settings. ``kimivl serve`` builds them
from a request's ``presence_penalty`` / ``frequency_penalty`` / ``logit_bias``.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from kimivl.errors import KimiVLInputError
from kimivl.ops.sampling import apply_presence_frequency_penalty


class PresenceFrequencyPenalty:
    """``scores[j] -= frequency * count[j] + presence * (count[j] > 0)``, counting the tokens generated so far
    (the ids after the first ``prompt_length``), per row, as vLLM does. Positive values discourage repeats."""

    def __init__(self, prompt_length: int, presence: float = 0.0, frequency: float = 0.0) -> None:
        for name, value in (("presence_penalty", presence), ("frequency_penalty", frequency)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not -2.0 <= value <= 2.0:
                raise KimiVLInputError(f"{name} must be a number in [-2, 2], got {value!r}")
        self.prompt_length = prompt_length
        self.presence = float(presence)
        self.frequency = float(frequency)

    def __call__(self, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        new = ids[:, self.prompt_length:]
        if new.shape[1] == 0 or (self.presence == 0.0 and self.frequency == 0.0):
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, new, torch.ones_like(new, dtype=scores.dtype))
        return apply_presence_frequency_penalty(scores, counts, self.presence, self.frequency)


class LogitBias:
    """OpenAI's ``logit_bias``: ``{token id: bias}`` added to those tokens' logits every step (bias in
    [-100, 100]: -100 bans a token, 100 all but forces it)."""

    def __init__(self, bias: Mapping[int, float], vocab_size: int) -> None:
        for token, value in bias.items():
            if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < vocab_size:
                raise KimiVLInputError(f"logit_bias token {token!r} is not a token id of this model "
                                       f"(0..{vocab_size - 1})")
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not -100.0 <= value <= 100.0:
                raise KimiVLInputError(f"logit_bias[{token}] must be a number in [-100, 100], got {value!r}")
        self.ids = torch.tensor(sorted(bias), dtype=torch.long)
        self.values = torch.tensor([float(bias[t]) for t in sorted(bias)], dtype=torch.float32)

    def __call__(self, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.ids.device != scores.device:
            self.ids, self.values = self.ids.to(scores.device), self.values.to(scores.device)
        return scores.index_add(1, self.ids, self.values.to(scores.dtype).expand(scores.shape[0], -1))
