"""The model worker: one thread that owns the model and serves queued generation jobs one at a time.

Each :class:`Job` carries its own prepared inputs, settings, detokenizer and event queue, so answers of
concurrent requests cannot mix. The worker runs :func:`kimivl.generation.generate` with a streamer that turns
each new token into a text delta on the job's asyncio queue; a cancelled job (its client went away) makes the
streamer raise, which ends the generation at the next token and frees the worker for the next job.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from kimivl.chat.protocol import logprob_entry
from kimivl.generation import IncrementalDetokenizer, generate
from kimivl.generation.prompt_cache import PromptCachePool

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    """What a job reports: ``delta`` (text, logprobs) and ``end`` (finish_reason, completion_tokens) of answer
    ``index`` (one ``end`` per answer), ``error``, ``cancelled``."""

    kind: str
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    logprobs: tuple[dict[str, Any], ...] = ()  # entries of the tokens whose text this delta completes
    index: int = 0
    cached_tokens: int = 0  # (end) prompt tokens read from the worker's prompt cache


class QueueFull(Exception):
    """The worker's queue holds ``max_queue`` jobs already."""


class _Cancelled(Exception):
    pass


class StopTrimmer:
    """Cuts the text at the first stop string (OpenAI leaves it out) and holds back a possible partial one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.buffer = ""
        self.hit = False

    def push(self, delta: str) -> str:
        if self.hit:
            return ""
        self.buffer += delta
        found = [i for i in (self.buffer.find(s) for s in self.stops) if i >= 0]
        if found:
            self.hit = True
            out, self.buffer = self.buffer[:min(found)], ""
            return out
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.buffer.endswith(s[:k])), default=0)
        out, self.buffer = self.buffer[:len(self.buffer) - hold], self.buffer[len(self.buffer) - hold:]
        return out

    def flush(self) -> str:
        out, self.buffer = ("" if self.hit else self.buffer), ""
        return out


@dataclass
class Job:
    """One request's generation: processor inputs, ``generate`` settings and the channel back to the client."""

    inputs: dict[str, Any]
    settings: dict[str, Any]
    stops: list[str]
    eos_ids: list[int]
    loop: asyncio.AbstractEventLoop
    top_logprobs: int | None = None  # None: no logprobs; k: each token's logprob and its k best alternatives
    choices: int = 1  # answers asked for (n)
    copies: bool = False  # greedy: one row is generated and its answer given ``choices`` times
    processors: list[Any] = field(default_factory=list)  # logits processors (penalties, bias, a JSON grammar)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, event: Event) -> None:
        """Thread-safe: hand an event to the request's event loop (dropped if that loop is gone)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:
            self.cancelled.set()

    def cancel(self) -> None:
        """The client is gone: stop at the next token (or skip the job if it has not started)."""
        if not self.cancelled.is_set():
            self.cancelled.set()
            self.emit(Event("cancelled"))


class LogprobRecorder:
    """A ``logits_processor`` that only looks: keeps the last step's log-softmax (the raw logits, before
    temperature and the filters) so each new token's logprob entry can be made when the streamer gets it."""

    def __init__(self, tokenizer: Any, top: int) -> None:
        self.tokenizer = tokenizer
        self.top = top
        self.latest: torch.Tensor | None = None

    def __call__(self, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.latest = scores.float().log_softmax(-1)
        return scores

    def _described(self, token: int) -> tuple[str, bytes]:
        return self.tokenizer.convert_ids_to_tokens(token), self.tokenizer.token_bytes(token)

    def entry(self, row: int, token: int) -> dict[str, Any]:
        assert self.latest is not None
        top: list[tuple[str, bytes, float]] = []
        if self.top:
            values, ids = self.latest[row].topk(self.top)
            top = [(*self._described(int(i)), float(v)) for v, i in zip(values.tolist(), ids.tolist())]
        return logprob_entry(*self._described(token), float(self.latest[row, token]), top)


class _Answer:
    """One row's text on its way out: detokenizer, stop trimming, logprob entries not sent yet, tokens."""

    def __init__(self, decode: Any, stops: list[str]) -> None:
        self.detokenizer = IncrementalDetokenizer(decode)
        self.trimmer = StopTrimmer(stops)
        self.pending: list[dict[str, Any]] = []
        self.tokens: list[int] = []
        self.stopped = False  # a stop id or a stop string ended it (later ids of the row are padding)


class _JobStreamer:
    """``generate`` streamer: each row's token ids in, text deltas out to the job (one answer per row, or one row
    copied to every answer); raises once the job is cancelled."""

    def __init__(self, job: Job, decode: Any, rows: int, recorder: LogprobRecorder | None = None) -> None:
        self.job = job
        self.answers = [_Answer(decode, job.stops) for _ in range(rows)]
        self.prompt_seen = False
        self.recorder = recorder

    @property
    def tokens(self) -> list[int]:
        return [t for a in self.answers for t in a.tokens]

    def put(self, value: torch.Tensor) -> None:
        if self.job.cancelled.is_set():
            raise _Cancelled
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            answer = self.answers[row]
            if answer.stopped:
                continue
            answer.tokens.append(token)
            if token in self.job.eos_ids:  # a stop id adds no content
                answer.stopped = True
                continue
            if self.recorder is not None:
                answer.pending.append(self.recorder.entry(row, token))
            text = answer.trimmer.push(answer.detokenizer.push(token))
            answer.stopped = answer.trimmer.hit
            if text:
                self._emit(row, text)

    def end(self) -> None:
        for row, answer in enumerate(self.answers):
            text = answer.trimmer.push(answer.detokenizer.flush()) + answer.trimmer.flush()
            if text or answer.pending:
                self._emit(row, text)

    def finish(self, cached_tokens: int = 0) -> None:
        """One ``end`` event per answer: ``stop`` (a stop id or string) or ``length``."""
        for row, answer in enumerate(self.answers):
            reason = "stop" if answer.stopped else "length"
            for index in self._indices(row):
                self.job.emit(Event("end", finish_reason=reason, completion_tokens=len(answer.tokens), index=index,
                                    cached_tokens=cached_tokens))

    def _indices(self, row: int) -> range:
        return range(self.job.choices) if self.job.copies else range(row, row + 1)

    def _emit(self, row: int, text: str) -> None:
        answer = self.answers[row]
        for index in self._indices(row):
            self.job.emit(Event("delta", text, logprobs=tuple(answer.pending), index=index))
        answer.pending = []


class ModelWorker:
    """A daemon thread running jobs from a bounded queue on one model; ``stats`` counts outcomes."""

    def __init__(self, model: Any, processor: Any, max_queue: int, prompt_caches: int = 4,
                 prompt_cache_bytes: int | None = None) -> None:
        self.model = model
        self.processor = processor
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._run, name="kimivl-model-worker", daemon=True)
        self._lock = threading.Lock()
        self.stats = {"completed": 0, "cancelled": 0, "failed": 0}
        self._current: Job | None = None
        # the latents of the last one-row generations of a few conversations: a conversation's next turn
        # prefills only what is new (None: off)
        self.prompt_caches = PromptCachePool(prompt_caches, prompt_cache_bytes) if prompt_caches else None

    def start(self) -> None:
        self._thread.start()

    @property
    def current(self) -> Job | None:
        """The job being generated now, if any."""
        return self._current

    @property
    def busy(self) -> bool:
        return self._current is not None

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel the running job (it ends at its next token) and the waiting ones, end the thread."""
        current = self._current
        if current is not None:
            current.cancel()
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            logger.warning("model worker queue still full at shutdown")
        self._thread.join(timeout)

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def submit(self, job: Job) -> None:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull from None

    def _count(self, outcome: str) -> None:
        with self._lock:
            self.stats[outcome] += 1

    def _run(self) -> None:
        decode = lambda ids: self.processor.tokenizer.decode(list(ids), skip_special_tokens=True)  # noqa: E731
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.cancelled.is_set():
                self._count("cancelled")
                continue
            self._current = job
            try:
                self._generate(job, decode)
            finally:
                self._current = None

    def _generate(self, job: Job, decode: Any) -> None:
        recorder = None if job.top_logprobs is None else LogprobRecorder(self.processor.tokenizer, job.top_logprobs)
        rows = 1 if job.copies else job.choices
        streamer = _JobStreamer(job, decode, rows, recorder)
        start = time.perf_counter()
        inputs = job.inputs
        cache = None
        if rows == 1 and self.prompt_caches is not None:
            cache = self.prompt_caches.pick(inputs["input_ids"][0].tolist())
        try:
            generate(self.model, inputs["input_ids"], inputs.get("attention_mask"), inputs.get("pixel_values"),
                     inputs.get("image_grid_hws"), streamer=streamer, tokenizer=self.processor,
                     logits_processor=([recorder] if recorder is not None else []) + job.processors,
                     num_return_sequences=rows, prompt_cache=cache, **job.settings)
        except _Cancelled:
            self._count("cancelled")
            logger.info("request cancelled by its client after %d tokens", len(streamer.tokens))
            return
        except Exception as e:  # the request's own failure; the worker goes on with the next job
            self._count("failed")
            logger.exception("generation failed")
            job.emit(Event("error", text=f"generation failed: {type(e).__name__}: {e}"))
            return
        if self.prompt_caches is not None:
            self.prompt_caches.trim()
        self._count("completed")
        cached = cache.reused if cache is not None else 0
        logger.info("generated %d tokens in %.2f s (%d prompt tokens from the prompt cache)", len(streamer.tokens),
                    time.perf_counter() - start, cached)
        streamer.finish(cached)
