"""What structured output costs per decode step at the released vocabulary size (163,840 tokens).

``GrammarConstraint`` (kimivl.generation.grammar, llguidance) runs once per step: it feeds each row's new token to
its matcher, fills the (rows, vocab / 32) allowed-token bitmask and masks the logits (``apply_token_bitmask``).
The released tokenizer cannot be downloaded here, so the vocabulary is synthetic: the 256 bytes, then random
2-10-byte tokens (letters, digits, JSON punctuation, a third with a leading space) up to 163,584 ranks, then the
258 special ids (the model has rows for 163,840 of the 163,842 ids, as the released one); llguidance's cost
depends on the vocabulary's size and trie, not on which text the tokens hold.
The constraint is walked through a fixed 90-odd-token answer to a nested JSON Schema, as a decode loop feeds it.

Printed (JSON): the first constraint's build time (llguidance's view of the tokenizer, cached per tokenizer),
a cached build, the per-step median / p90 / max of the whole processor call, the bitmask application alone,
and the step as a fraction of a decode step at a given rate (``--decode-tok-s``, default 50: the A3B's
bf16 CPU decode is in the tens of tokens per second).

Usage: ``python -m benchmarks.bench_grammar [--decode-tok-s 50] [--out FILE]``.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from benchmarks.common import emit, machine_info
from kimivl.generation.grammar import GrammarConstraint
from kimivl.ops.sampling import apply_token_bitmask
from kimivl.processing.tokenizer import KimiVLTokenizer

VOCAB = 163_840  # the released model's rows; its tokenizer has 163,584 ranks + 258 specials = 163,842 ids
RANKS = 163_584
SCHEMA = {"type": "object", "required": ["color", "caption", "objects"],
          "properties": {"color": {"enum": ["red", "green", "blue"]}, "caption": {"type": "string", "maxLength": 200},
                         "objects": {"type": "array", "items": {
                             "type": "object", "required": ["name", "count"],
                             "properties": {"name": {"type": "string"}, "count": {"type": "integer"}}}}}}
ANSWER = ('{"color":"blue","caption":"A blue triangle on a white background, drawn with thick lines.",'
          '"objects":[{"name":"triangle","count":1},{"name":"line","count":3}]}')


def synthetic_tokenizer(seed: int = 0) -> KimiVLTokenizer:
    rng = random.Random(seed)
    ranks = {bytes([i]): i for i in range(256)}
    alphabet = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 _-.,:;\"'{}[]()"
    while len(ranks) < RANKS:
        token = bytes(rng.choice(alphabet) for _ in range(rng.randint(2, 10)))
        ranks.setdefault(b" " + token if rng.random() < 0.3 else token, len(ranks))
    names = {RANKS: "[BOS]", RANKS + 1: "[EOS]", RANKS + 2: "[UNK]", RANKS + 3: "[PAD]", RANKS + 4: "<|im_end|>"}
    return KimiVLTokenizer(ranks, names)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decode-tok-s", type=float, default=50.0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    tokenizer = synthetic_tokenizer()
    start = time.perf_counter()
    constraint = GrammarConstraint.json_schema(tokenizer, SCHEMA, vocab_size=VOCAB)
    first_build = time.perf_counter() - start
    start = time.perf_counter()
    GrammarConstraint.json_schema(tokenizer, SCHEMA, vocab_size=VOCAB)
    cached_build = time.perf_counter() - start

    answer = tokenizer.encode(ANSWER)
    ids, scores, steps = torch.zeros(1, 16, dtype=torch.long), torch.randn(1, VOCAB), []
    for token in answer:
        start = time.perf_counter()
        out = constraint(ids, scores)
        steps.append(time.perf_counter() - start)
        if not torch.isfinite(out[0, token]):
            raise RuntimeError(f"the constraint masked token {token} of a valid answer")
        ids = torch.cat((ids, torch.tensor([[token]])), dim=1)
    mask, applied = torch.full((1, VOCAB // 32), -1, dtype=torch.int32), []
    for _ in range(50):
        start = time.perf_counter()
        apply_token_bitmask(scores, mask)
        applied.append(time.perf_counter() - start)
    median = statistics.median(steps)
    emit({"benchmark": "grammar", "machine": machine_info(torch.get_num_threads()), "vocab": VOCAB,
          "answer_tokens": len(answer), "first_build_s": round(first_build, 3),
          "cached_build_ms": round(cached_build * 1e3, 2), "step_ms_median": round(median * 1e3, 3),
          "step_ms_p90": round(statistics.quantiles(steps, n=10)[-1] * 1e3, 3),
          "step_ms_max": round(max(steps) * 1e3, 3), "apply_bitmask_ms_median": round(
              statistics.median(applied) * 1e3, 3),
          "fraction_of_a_decode_step": round(median * args.decode_tok_s, 4)}, args.out)


if __name__ == "__main__":
    main()
