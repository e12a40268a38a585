"""Prompt caching across ``generate`` calls: a conversation's next turn re-reads the latents of the prefix it
shares with the last call instead of prefilling (and re-encoding the images of) the whole history again.

A :class:`PromptCache` keeps the latent cache (:class:`~kimivl.decoder.cache.MLACache`) of one row after a
generation, with the token ids it holds (the prompt and the new tokens that were fed back) and a digest of each
image whose placeholders it holds. The next call with ``prompt_cache=`` reuses the longest common prefix of ids,
cut back to the start of any image whose pixels differ (same placeholders, another picture) or that the prefix
would split, and always leaves at least one prompt token to prefill (its logits start the answer). Only the rest
is prefilled, with the pixel values of the images in it alone. The latents of a prefix are those of a full
prefill: causal attention makes position ``i`` depend on tokens ``<= i`` only (chunked and whole prefills differ
by float rounding, as two GEMM shapes do).

One row, no padding, ids (not ``inputs_embeds``): a chat. What the cache can reuse of a conversation's next turn is
what the chat template renders again unchanged: the earlier turns, and the last answer up to where its
re-rendered text tokenizes differently from the generated ids (e.g. a Thinking model's reasoning, which is not
re-sent).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kimivl.decoder.cache import MLACache
from kimivl.ops.fingerprint import fingerprint


@dataclass(frozen=True)
class ImageSpan:
    """An image's placeholder positions [start, end) in the ids and a digest of its pixel values."""

    start: int
    end: int
    digest: bytes


def image_spans(input_ids: torch.Tensor, pixel_values: torch.Tensor | None, image_grid_hws: torch.Tensor | None,
                media_token_id: int, merge: tuple[int, int]) -> list[ImageSpan]:
    """One span per image of a (1, S) prompt: its run of placeholders, in order, and the digest of its patches."""
    if pixel_values is None or image_grid_hws is None or pixel_values.numel() == 0:
        return []
    positions = (input_ids[0] == media_token_id).nonzero().flatten().tolist()
    spans, token, patch = [], 0, 0
    for h, w in image_grid_hws.tolist():
        tokens, patches = h * w // (merge[0] * merge[1]), h * w
        if token + tokens > len(positions):
            return []  # not a prompt the model would accept either: no reuse, the forward names the problem
        digest = fingerprint(pixel_values[patch:patch + patches])
        spans.append(ImageSpan(positions[token], positions[token + tokens - 1] + 1, digest))
        token, patch = token + tokens, patch + patches
    return spans


@dataclass
class PromptCache:
    """The latents of the last generation of one conversation (see the module docstring). Pass the same object
    to each turn's ``generate(..., prompt_cache=...)`` / ``stream``; ``reused`` reports how many prompt tokens
    the last call took from it."""

    cache: MLACache | None = None
    ids: list[int] = field(default_factory=list)
    spans: list[ImageSpan] = field(default_factory=list)
    reused: int = 0

    def usable_prefix(self, ids: list[int], spans: list[ImageSpan], cache_dtype: torch.dtype,
                      device: torch.device) -> int:
        """How many leading tokens of ``ids`` (with ``spans``) can be read from this cache."""
        if self.cache is None or self.cache.dtype != cache_dtype or self.cache.data.device != device:
            return 0
        common = min(common_prefix(self.ids, ids), len(ids) - 1, self.cache.length)
        cached = {(s.start, s.end): s.digest for s in self.spans}
        for span in spans:
            if span.start >= common:
                break
            if span.end > common or cached.get((span.start, span.end)) != span.digest:
                return span.start  # split by the prefix, or another picture behind the same placeholders
        return common

    def reset(self) -> None:
        self.cache, self.ids, self.spans, self.reused = None, [], [], 0

    @property
    def nbytes(self) -> int:
        """Bytes the kept latents occupy (the cache's whole allocation)."""
        return 0 if self.cache is None else self.cache.data.numel() * self.cache.data.element_size()


def images_after(spans: list[ImageSpan], start: int, pixel_values: torch.Tensor | None,
                 image_grid_hws: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The pixel values and grids of the images whose placeholders lie at or after ``start``."""
    if not spans or pixel_values is None or image_grid_hws is None:
        return pixel_values, image_grid_hws
    first = next((i for i, span in enumerate(spans) if span.start >= start), len(spans))
    patches = int(image_grid_hws[:first].prod(dim=-1).sum())
    return pixel_values[patches:], image_grid_hws[first:]


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading ids ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class PromptCachePool:
    """Up to ``size`` prompt caches, one per recent conversation, for a server answering several in turn.

    :meth:`pick` returns the cache whose ids the new prompt continues (the longest shared prefix, when it covers
    at least half of what that cache holds: less means another conversation that merely shares the chat
    template or a system prompt); otherwise an unused cache, or the least recently used one, which is taken
    over. The cache picked becomes the most recent. :meth:`trim` keeps the caches' bytes within ``max_bytes``
    (None: no bound), emptying the least recently used first."""

    def __init__(self, size: int, max_bytes: int | None = None) -> None:
        if size < 1:
            raise ValueError(f"a prompt cache pool needs size >= 1, got {size}")
        self.caches = [PromptCache() for _ in range(size)]  # least recently used first
        self.max_bytes = max_bytes

    def trim(self) -> None:
        """Empty caches, least recently used first, until their bytes fit ``max_bytes``."""
        if self.max_bytes is None:
            return
        for cache in self.caches:  # one over the bound alone would empty the others for nothing
            if cache.nbytes > self.max_bytes:
                cache.reset()
        for cache in self.caches:
            if sum(c.nbytes for c in self.caches) <= self.max_bytes:
                return
            cache.reset()

    def pick(self, ids: list[int]) -> PromptCache:
        shared = [common_prefix(cache.ids, ids) for cache in self.caches]
        best = max(range(len(self.caches)), key=lambda i: shared[i])
        if not (shared[best] and 2 * shared[best] >= len(self.caches[best].ids)):
            best = next((i for i, cache in enumerate(self.caches) if cache.cache is None), 0)
        cache = self.caches.pop(best)
        self.caches.append(cache)
        return cache
