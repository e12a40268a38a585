"""Next-token selection as pure functions of (logits, parameters, generator).

Semantics follow the transformers logits processors users know: repetition penalty (divide
positive / multiply negative logits of seen tokens), temperature, top-k, top-p (smallest set
whose probability reaches p, always at least one token), min-p (drop tokens below
min_p * max prob). No global RNG: sampling draws from an explicit ``torch.Generator``.
"""
from __future__ import annotations

import torch


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits: (B, V) float; seen: (B, V) bool of tokens already in each row's context."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_presence_frequency_penalty(logits: torch.Tensor, counts: torch.Tensor, presence: float,
                                     frequency: float) -> torch.Tensor:
    """OpenAI's penalties: ``logits - frequency * counts - presence * (counts > 0)``; counts (B, vocab) of the
    tokens generated so far."""
    return logits - counts * frequency - (counts > 0).to(logits.dtype) * presence


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Keep the tokens a (B, ceil(V / 32)) int32 bitmask allows (bit ``j`` of word ``w``: token ``32 w + j``, the
    layout grammar engines such as llguidance and xgrammar fill); the others go to -inf."""
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((bitmask.to(logits.device).unsqueeze(-1) >> shifts) & 1).reshape(bitmask.shape[0], -1)
    return logits.masked_fill(allowed[:, :logits.shape[-1]] == 0, float("-inf"))


def filter_logits(logits: torch.Tensor, *, top_k: int | None = None, top_p: float | None = None,
                  min_p: float | None = None) -> torch.Tensor:
    """Set the logits outside the top-k / top-p / min-p support to -inf. logits: (B, V) float."""
    neg_inf = torch.finfo(logits.dtype).min
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, neg_inf)
    if min_p is not None and min_p > 0.0:
        probs = logits.softmax(-1)
        floor = min_p * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < floor, neg_inf)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the mass before it already reaches top_p (keeps at least the first)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, neg_inf)
    return logits


def warp_logits(logits: torch.Tensor, *, do_sample: bool = False, temperature: float = 1.0,
                top_k: int | None = None, top_p: float | None = None, min_p: float | None = None) -> torch.Tensor:
    """The scores the next token is chosen from (transformers' ``scores``): float32 logits as they are for greedy
    decoding; tempered, with the tokens outside the top-k / top-p / min-p support at -inf, for sampling."""
    logits = logits.float()
    if not do_sample:
        return logits
    return filter_logits(logits / temperature, top_k=top_k, top_p=top_p, min_p=min_p)


def pick_token(scores: torch.Tensor, *, do_sample: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Greedy argmax of ``warp_logits``' scores, or a draw from their softmax. Returns (B,) int64."""
    if not do_sample:
        return scores.argmax(dim=-1)
    return torch.multinomial(scores.softmax(-1), num_samples=1, generator=generator).squeeze(-1)


def select_next_token(logits: torch.Tensor, *, do_sample: bool = False, temperature: float = 1.0,
                      top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Greedy argmax, or a draw from the filtered, tempered distribution. Returns (B,) int64."""
    scores = warp_logits(logits, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    return pick_token(scores, do_sample=do_sample, generator=generator)
