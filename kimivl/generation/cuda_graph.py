"""Decode steps replayed from captured CUDA graphs: one launch per token instead of hundreds.

On a GPU a real-width decode step is a few hundred small kernels (norms, projections, rope, the absorbed
attention, the gate, the experts), and at one token per step the host's launch overhead, not the GPU, sets
the pace. Capturing the step once into a ``torch.cuda.CUDAGraph`` and replaying it removes that overhead
(gpt-fast and vLLM do the same). A graph replays fixed shapes and addresses and may not synchronise with the
host, so the captured step differs from :func:`kimivl.generation.generate.decode_step` in three ways:

- its inputs live in static buffers (the token ids, the position ids, the cache slot it writes), filled before
  each replay;
- the cache write is an ``index_copy_`` at a device-side slot (:class:`_SlotWriter`) and the attention reads a
  fixed window of the cache under a mask ``key <= slot`` (plus the prompt's padding), so one graph serves
  every step whose slot lies in its window; windows grow geometrically (:func:`window_for`), one capture each;
- the MoE layers take their sync-free gather path (:meth:`kimivl.decoder.moe.DeepseekV3MoE.stacked_experts`),
  which they choose by themselves for a few tokens on a GPU.

:class:`GraphDecoder` is the runner; ``capture=False`` runs the same static step eagerly (how the CPU tests
check it against the plain decode step). :func:`graph_decoder_for` keeps one runner per model so repeated
``generate`` calls of the same shape reuse their graphs; a runner held by a running generation is never
handed to another one (:func:`release` frees it).
"""
from __future__ import annotations

import logging
import math
import os
import threading
import weakref

import torch
from torch import nn

from kimivl.decoder.cache import MLACache
from kimivl.decoder.moe import gather_capturable
from kimivl.ops.rope import rope_cos_sin

logger = logging.getLogger(__name__)

ENV_SWITCH = "KIMIVL_CUDA_GRAPHS"  # "0" turns graph capture off (generate then runs plain decode steps)
# "1": the static step is compiled with torch.compile (inductor fuses its ~200 small kernels) before capture.
# Opt-in: the first call pays the compilation (tens of seconds to minutes), see docs/performance.md.
COMPILE_SWITCH = "KIMIVL_COMPILE_DECODE"
MIN_WINDOW = 256  # the smallest cache window a graph attends over
WINDOW_GROWTH = 1.25  # each next window is this much larger (rounded up to MIN_WINDOW / 2): <= 25 % wasted reads


def enabled() -> bool:
    """False when ``KIMIVL_CUDA_GRAPHS`` is 0 / false / off."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "off", "no")


def window_for(slot: int, max_len: int) -> int:
    """The cache window (number of leading slots attended) of the graph that serves a step writing ``slot``:
    the smallest of MIN_WINDOW * 1.25^i (rounded up to a multiple of MIN_WINDOW / 2) above ``slot``, at most
    ``max_len``."""
    window = MIN_WINDOW
    step = MIN_WINDOW // 2
    while window <= slot:
        window = math.ceil(window * WINDOW_GROWTH / step) * step
    return min(window, max_len)


def applies(lm: nn.Module, batch_size: int, device: torch.device) -> bool:
    """Whether generate() should decode ``lm`` through graphs: CUDA, switched on, and every MoE layer can take
    its capturable path for ``batch_size`` rows (:func:`kimivl.decoder.moe.gather_capturable`)."""
    if device.type != "cuda" or not enabled():
        return False
    cfg = lm.config
    return not cfg.n_routed_experts or gather_capturable(batch_size * cfg.num_experts_per_tok, cfg.n_routed_experts)


class _SlotWriter:
    """Stands in for an :class:`MLACache` inside the captured step: writes each layer's new latent at the
    device-side ``slot`` and hands the layer the first ``window`` slots of its cache."""

    def __init__(self, cache: MLACache, slot: torch.Tensor, window: int) -> None:
        self.cache, self.slot, self.window = cache, slot, window

    def update(self, layer_idx: int, c_kv: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
        layer = self.cache.data[layer_idx]
        layer.index_copy_(1, self.slot, torch.cat((c_kv, k_pe), dim=-1).to(layer.dtype))
        return layer[:, :self.window]


class GraphDecoder:
    """One-token decode steps of ``lm`` (a :class:`~kimivl.decoder.DeepseekV3ForCausalLM`) over ``cache``,
    replayed from CUDA graphs captured per cache window.

    Protocol: prefill into :attr:`cache` as usual, call :meth:`start` with the prompt's padding mask, then
    :meth:`step` once per new token; each step writes slot ``cache.length`` and advances the cache by one.
    """

    def __init__(self, lm: nn.Module, batch_size: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str, *, capture: bool = True) -> None:
        self.lm = lm
        self.capture = capture
        self.cache = MLACache.from_config(lm.config, batch_size, max_len, dtype=dtype, device=device)
        device = self.cache.data.device
        self.ids = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.key_mask = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        self.key_index = torch.arange(max_len, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.busy = False  # held by a running generation (graph_decoder_for / release)
        self.weights: int | None = None  # _weights_key of the model when the graphs were made
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.forward = self._forward
        if os.environ.get(COMPILE_SWITCH, "0").strip().lower() in ("1", "true", "on", "yes"):
            # one compilation for every window: the window length is a symbolic size
            self.forward = torch.compile(self._forward, dynamic=True)

    @property
    def key(self) -> tuple[int, int, torch.dtype, torch.device]:
        return self.cache.batch_size, self.cache.max_len, self.cache.dtype, self.cache.data.device

    def start(self, attention_mask: torch.Tensor | None) -> None:
        """Call after the prefill: ``attention_mask`` (B, cache.length) is the prompt's padding mask (or None)."""
        n = self.cache.length
        self.key_mask.fill_(True)
        if attention_mask is not None:
            self.key_mask[:, :n].copy_(attention_mask.bool())
            # the next position of each row is its number of real tokens (positions are cumsum(mask) - 1)
            self.positions.copy_(attention_mask.long().sum(dim=-1, keepdim=True))
        else:
            self.positions.fill_(n)

    @torch.inference_mode()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Feed ``token`` (B,) at slot ``cache.length``; returns the next-token logits (B, vocab) float32."""
        slot = self.cache.length
        self.cache.check_room(1)
        self.ids.copy_(token.view(-1, 1))
        self.slot.fill_(slot)
        window = window_for(slot, self.cache.max_len)
        captured = self.graphs.get(window) or (self._capture(window) if self.capture else None)
        if captured is not None:
            graph, logits = captured
            graph.replay()
            logits = logits.clone()  # the static output buffer is overwritten by the next replay
        else:
            logits = self.forward(window)
        self.positions.add_(1)
        self.cache.advance(1)
        return logits

    def _forward(self, window: int) -> torch.Tensor:
        """The static step: reads ids / positions / slot from their buffers, writes the cache at ``slot``."""
        lm = self.lm
        model, cfg = lm.model, lm.config
        h = model.embed_tokens(self.ids)
        cos, sin = rope_cos_sin(self.positions, cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling,
                                dtype=h.dtype)
        visible = self.key_mask[:, :window] & (self.key_index[:window] <= self.slot)  # (B, window)
        attn_mask = visible[:, None, None, :]
        writer = _SlotWriter(self.cache, self.slot, window)
        for layer in model.layers:
            h = layer(h, cos, sin, attn_mask, writer)
        return lm.lm_head(model.norm(h)[:, -1]).float()

    def _capture(self, window: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor] | None:
        """Capture the step for ``window``; None (and eager steps from then on, with a warning) when the step
        cannot be captured, e.g. a layer that synchronises with the host (LoRA-wrapped experts)."""
        try:
            return self._try_capture(window)
        except RuntimeError as e:
            logger.warning("CUDA graph capture of the decode step failed (%s); decoding without graphs "
                           "(set %s=0 to skip the attempt)", str(e).splitlines()[0], ENV_SWITCH)
            self.capture = False
            return None

    def _try_capture(self, window: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Warm up on a side stream first (lazy initialisations, cuBLAS workspaces, the MoE weight stacking);
        # the warm-up writes the same cache slot the replay will write, with the same values.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.forward(window)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.forward(window)
        self.graphs[window] = (graph, logits)
        return graph, logits


_RUNNERS: weakref.WeakKeyDictionary[nn.Module, GraphDecoder] = weakref.WeakKeyDictionary()
_RUNNERS_LOCK = threading.Lock()


def graph_decoder_for(lm: nn.Module, batch_size: int, max_len: int, dtype: torch.dtype,
                      device: torch.device) -> GraphDecoder:
    """A runner for these shapes (``max_len`` rounded up to a multiple of MIN_WINDOW), marked busy until
    :func:`release`: the model's kept runner (its graphs with
    it) when it has these shapes and is free, else a new one, which is kept in its place when that one is
    free. A generation still holding the kept runner (another thread, an unfinished ``stream``) gets a private
    runner, so two generations never share a cache."""
    # Cache lengths are rounded up so that prompts of similar lengths share one runner and its graphs (a chat
    # server's every request has its own prompt length); the extra slots are never attended.
    max_len = math.ceil(max_len / MIN_WINDOW) * MIN_WINDOW
    key = (batch_size, max_len, dtype, torch.device(device))
    weights = _weights_key(lm)
    with _RUNNERS_LOCK:
        kept = _RUNNERS.get(lm)
        if kept is not None and not kept.busy and kept.key == key and kept.weights == weights:
            runner = kept
        else:
            runner = GraphDecoder(lm, batch_size, max_len, dtype, device, capture=torch.device(device).type == "cuda")
            runner.weights = weights
            if kept is None or not kept.busy:  # replaces (and frees) a free runner of other shapes
                _RUNNERS[lm] = runner
        runner.busy = True
    runner.cache.reset()
    return runner


def _weights_key(lm: nn.Module) -> int:
    """Where the parameters live: captured graphs read the weights at fixed addresses, so parameters that were
    replaced since (``.to()``, ``load_state_dict(assign=True)``, LoRA-wrapped layers) need new graphs; in-place
    updates (``load_state_dict`` copies, optimizer steps) keep the addresses and the graphs. Those replacements
    touch every layer, so the embedding, the final norm, the head, the first and the last decoder layer stand
    for all, and in a MoE layer its first and last expert for the 64: ``parameters()`` over the released
    model's MoE layer alone (~200 tensors) took 0.6 ms of every ``generate`` call (a fifth of a 512-token prefill
    on an H100)."""
    layers = lm.model.layers
    ptrs: list[int] = []
    for part in (lm.model.embed_tokens, lm.model.norm, lm.lm_head, layers[0], layers[-1]):
        _collect_pointers(part, ptrs)
    return hash(tuple(ptrs))


def _collect_pointers(module: nn.Module, out: list[int]) -> None:
    out.extend(p.data_ptr() for p in module._parameters.values() if p is not None)
    for name, child in module._modules.items():
        if child is None:
            continue
        if name == "experts" and isinstance(child, nn.ModuleList) and len(child) > 2:
            child = (child[0], child[-1])  # experts are moved, loaded and wrapped together
            for expert in child:
                _collect_pointers(expert, out)
        else:
            _collect_pointers(child, out)


def release(runner: GraphDecoder) -> None:
    """The generation using ``runner`` ended (its cache and graphs may serve the next one)."""
    runner.busy = False
