"""Evaluate a checkpoint on freshly drawn samples of every demo task (greedy, exact match)."""
from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kimivl.demo.tasks import TASKS, is_correct, sample


@dataclass
class TaskResult:
    correct: int = 0
    total: int = 0
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (expected, predicted), first few

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.total, 1)


def answer(model, processor, messages: list[dict], max_new_tokens: int = 8) -> str:
    """Greedy answer of the model to one conversation."""
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                             pixel_values=inputs.get("pixel_values"), image_grid_hws=inputs.get("image_grid_hws"),
                             max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:]
    return processor.decode(new, skip_special_tokens=True)


def evaluate(model, processor, *, samples_per_task: int = 50, seed: int = 12345,
             tasks: Sequence[str] = TASKS) -> dict[str, TaskResult]:
    """Accuracy per task on ``samples_per_task`` new samples drawn with ``seed``."""
    results: dict[str, TaskResult] = {}
    for task in tasks:
        rng = random.Random(f"{seed}-{task}")
        res = TaskResult()
        for _ in range(samples_per_task):
            s = sample(task, rng)
            start = time.perf_counter()
            pred = answer(model, processor, s.to_messages(with_answer=False))
            res.seconds += time.perf_counter() - start
            res.total += 1
            if is_correct(pred, s.answer):
                res.correct += 1
            elif len(res.failures) < 5:
                res.failures.append((s.answer, pred))
        results[task] = res
    return results
