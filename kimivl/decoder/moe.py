"""Mixture-of-experts feed-forward of the DeepSeek-V3 decoder (layers ``first_k_dense_replace`` and up).

Spec: ``shared/reference/kimivl-spec.md`` §4 "MoE", §2 keys ``mlp.experts.{e}.*``, ``mlp.gate.weight``,
``mlp.gate.e_score_correction_bias``, ``mlp.shared_experts.*``. Official names: ``DeepseekV3MoE``,
``MoEGate``. The maths lives in :mod:`kimivl.ops.routing` and :mod:`kimivl.ops.moe`.

Deliberate deviations: the gate runs in training mode (selection without gradient, weights with it);
``e_score_correction_bias`` is a parameter with ``requires_grad=False`` (DeepSeek-V3 updates it by a
load-balancing rule, never by gradient); one dispatch path for inference and training, plus faster inference
paths: the C++ pass for a decode step on the CPU and, off the CPU, sync-free forms over stacked expert weights
(the experts' parameters become views of three (E, ., .) tensors the first time, so the weights still exist
once): gathered pairs for a decode step, which a captured CUDA graph can replay
(:mod:`kimivl.generation.cuda_graph`), and grouped GEMMs for more tokens (:meth:`DeepseekV3MoE._accelerator_path`).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from kimivl.configuration import DeepseekV3Config
from kimivl.decoder.cpu_decode import PLAN, moe_step
from kimivl.decoder.mlp import DeepseekV3MLP
from kimivl.ops.linear import Linear, linear
from kimivl.ops.moe import (fused_cpu_moe, grouped_cpu_moe, grouped_int8_moe, grouped_mm_available, moe_dispatch,
                            moe_gathered, moe_grouped, plain_int8_mlp)
from kimivl.ops.routing import route, route_cpu_rows


def gather_capturable(pairs: int, experts: int) -> bool:
    """Whether a MoE layer can run ``pairs`` (token, slot) pairs inside a captured CUDA graph: only its gather
    path is capturable, and it is chosen up to one pair per expert (beyond, it reads more than every expert)."""
    return pairs <= experts


class MoEGate(nn.Module):
    """Router: fp32 logits -> scores -> top-k experts and their weights."""

    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__()
        assert config.n_routed_experts, "MoEGate needs n_routed_experts"
        self.top_k = config.num_experts_per_tok
        self.n_routed_experts = config.n_routed_experts
        self.routed_scaling_factor = config.routed_scaling_factor
        self.scoring_func = config.scoring_func
        self.topk_method = config.topk_method
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(self.n_routed_experts, config.hidden_size))
        if self.topk_method == "noaux_tc":
            # fp32 whatever the model dtype would be at construction; used for selection only
            self.e_score_correction_bias = nn.Parameter(
                torch.zeros(self.n_routed_experts, dtype=torch.float32), requires_grad=False
            )
        else:
            self.register_parameter("e_score_correction_bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.e_score_correction_bias is not None:
            nn.init.zeros_(self.e_score_correction_bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (T, hidden). Returns ``topk_idx`` (T, k) int64, ``topk_weight`` (T, k) fp32, ``scores`` (T, E) fp32."""
        settings = dict(top_k=self.top_k, n_group=self.n_group, topk_group=self.topk_group,
                        topk_method=self.topk_method, scoring_func=self.scoring_func,
                        norm_topk_prob=self.norm_topk_prob, routed_scaling_factor=self.routed_scaling_factor)
        routed = route_cpu_rows(x, self.weight, self.e_score_correction_bias, **settings)
        if routed is not None:  # a decode step's bf16 rows on the CPU: as the fused decode paths route them
            return routed
        logits = F.linear(x.float(), self.weight.float())  # fp32 router, as the official code
        return route(logits, self.e_score_correction_bias, **settings)

    def extra_repr(self) -> str:
        return (f"experts={self.n_routed_experts}, top_k={self.top_k}, method={self.topk_method}, "
                f"groups={self.topk_group}/{self.n_group}")


class DeepseekV3MoE(nn.Module):
    """y = sum_k w_k * expert_k(x) (routed, fp32 accumulation) + shared_experts(x) (unscaled)."""

    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__()
        assert config.n_routed_experts, "DeepseekV3MoE needs n_routed_experts"
        self.experts = nn.ModuleList(
            DeepseekV3MLP(config.hidden_size, config.moe_intermediate_size) for _ in range(config.n_routed_experts)
        )
        self.gate = MoEGate(config)
        self.shared_experts = (
            DeepseekV3MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts else None
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states: (B, S, hidden) -> (B, S, hidden)."""
        fused = moe_step(self, hidden_states)
        if fused is not None:  # a bf16 decode step on the CPU: router and experts in one C++ call
            return fused
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        topk_idx, topk_weight, _ = self.gate(x)
        fused = fused_cpu_moe(x, topk_idx, topk_weight, self.experts, self.shared_experts)
        if fused is not None:  # a decode step on the CPU: routed + shared experts in one C++ call
            return fused.view(shape)
        path = self._accelerator_path(x, topk_idx)
        stacked = self.stacked_experts() if path else None
        if stacked is not None:  # inference on a GPU: no per-expert Python, no host sync (CUDA-graph safe)
            y = (moe_gathered if path == "gather" else moe_grouped)(x, topk_idx, topk_weight, *stacked).view(shape)
        else:
            cpu = self._cpu_stack(x)  # the CPU stack in inference mode, else None
            # on a CPU the routed experts are one C++ call over the stacked weights (bf16 or int8) where it applies
            y = None if cpu is None else grouped_cpu_moe(x, topk_idx, topk_weight, cpu.gate_up, cpu.down)
            if y is None and cpu is None:
                int8 = self._cpu_int8_stack(x)
                y = None if int8 is None else grouped_int8_moe(x, topk_idx, topk_weight, *int8)
            if y is None:
                y = moe_dispatch(x, topk_idx, topk_weight, self.experts if cpu is None else cpu.experts)
            y = y.view(shape)
        if self.shared_experts is not None:
            y = y + self.shared_experts(hidden_states)
        return y

    def _accelerator_path(self, x: torch.Tensor, topk_idx: torch.Tensor) -> str | None:
        """The sync-free expert path for inference off the CPU, or None (the grouped dispatch with its one host
        sync; also under autograd, whose gradients must reach the experts' own parameters).

        Measured on an H100 at the real width (docs/performance.md): gathering each (token, slot) pair's expert
        costs 0.12 ms for one token in a CUDA graph but 0.78 ms for 8 tokens, where ``torch._grouped_mm`` takes
        0.39 ms; grouped GEMMs cannot be captured in a graph (they copy from the host), gathering can. Hence
        ``"gather"`` for up to E / 4 pairs (a decode step) and for any capture of up to E pairs, ``"grouped"``
        where it applies (bf16 CUDA), ``"gather"`` again for up to E pairs without it."""
        if x.device.type == "cpu":
            return None
        if torch.is_grad_enabled() and (x.requires_grad or self.experts[0].gate_proj.weight.requires_grad):
            return None
        pairs, experts = topk_idx.numel(), len(self.experts)
        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
        if pairs <= experts // 4 or (capturing and gather_capturable(pairs, experts)):
            return "gather"
        if grouped_mm_available(x):
            return "grouped"
        return "gather" if pairs <= experts else None

    def _cpu_stack(self, x: torch.Tensor) -> _CpuStack | None:
        """In inference mode on the CPU: the stacked weights (:meth:`stacked_experts`) as the C++ call takes them
        and each expert as ``down(silu(gate) * up)`` with gate and up as ONE matmul over its adjacent (2I, D)
        rows; else None.

        A prefill's experts see ~8-50 rows each, where a GEMM's rate grows with its width: measured on a 2-core
        Xeon (bf16, oneDNN) 2 x 0.80 -> 1.00 ms per expert at 51 rows (docs/performance.md). Same products as the
        module path; the GEMM library may block the wider product differently (last-bit differences).
        Inference mode only: a training or evaluation step under FSDP / DeepSpeed must not re-point sharded
        parameters."""
        if x.device.type != "cpu" or not torch.is_inference_mode_enabled() or self.stacked_experts() is None:
            return None
        return self.__dict__.get("_cpu_stacked")  # made with the stack (None off the CPU)

    def _cpu_int8_stack(self, x: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """:meth:`stacked_int8_experts` for a CPU forward in inference mode (as :meth:`_cpu_stack`), else None."""
        if x.device.type != "cpu" or not torch.is_inference_mode_enabled() or not plain_int8_mlp(self.experts[0]):
            return None
        return self.stacked_int8_experts()

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 (nn.Module's signature)
        # .to() / .cuda() / .half() give every parameter its own new storage: drop the stack so the old one
        # (the experts' previous weights, on their previous device) is freed now, not at the next forward
        self.__dict__.pop("_stacked", None)
        self.__dict__.pop("_stacked_int8", None)
        self.__dict__.pop("_cpu_stacked", None)
        self.__dict__.pop(PLAN, None)  # the fused CPU step's plan holds the stack and a router copy
        return super()._apply(fn, recurse)

    def stacked_experts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The routed experts' weights as ``gate`` (E, I, D), ``up`` (E, I, D) and ``down`` (E, D, I) tensors
        whose slices are the experts' parameters (they are re-pointed to those views on the first call, so the
        memory is not doubled; ``state_dict`` keys and values are unchanged; the Parameter objects stay the same,
        so an optimizer built before keeps training them). On the CPU ``gate`` and ``up`` are
        the two halves of one (E, 2I, D) tensor (each expert's gate rows, then its up rows), which
        :meth:`_cpu_stack` multiplies in one GEMM; elsewhere they are two contiguous tensors. None
        when an expert is not a plain :class:`~kimivl.ops.linear.Linear` MLP (e.g. LoRA-wrapped) or the experts
        differ in dtype / device / shape.
        Rebuilt when the parameters were replaced since (``.to()``, ``load_state_dict(assign=True)``)."""
        stacked = self.__dict__.get("_stacked")
        if stacked is not None and self._still_stacked(stacked):
            return stacked
        weights = [[getattr(e, name) for e in self.experts] for name in ("gate_proj", "up_proj", "down_proj")]
        first = weights[0][0].weight
        num, (inter, dim) = len(self.experts), first.shape
        shapes = ((inter, dim), (inter, dim), (dim, inter))
        if any(type(p) is not Linear or p.bias is not None or p.weight.dtype != first.dtype
               or p.weight.device != first.device or tuple(p.weight.shape) != shape
               or type(p.weight.detach()) is not torch.Tensor  # not a sharded (DTensor) or other subclass
               for row, shape in zip(weights, shapes) for p in row):
            return None
        # inference_mode(False): a first call inside generate() must still give ordinary parameters (inference
        # tensors cannot take part in a later training step)
        with torch.inference_mode(False), torch.no_grad():
            gate_up = None
            if first.device.type == "cpu":
                gate_up = first.new_empty(num, 2 * inter, dim)
                gate, up = gate_up[:, :inter], gate_up[:, inter:]
            else:
                gate, up = first.new_empty(num, inter, dim), first.new_empty(num, inter, dim)
            down = first.new_empty(num, dim, inter)
            for stack, row in zip((gate, up, down), weights):
                for i, p in enumerate(row):  # copy, then re-point: each old weight is freed as it goes
                    stack[i].copy_(p.weight.detach())
                    # the same Parameter object on new storage: an optimizer built earlier keeps training it
                    p.weight.data = stack[i]
        self.__dict__["_cpu_stacked"] = None if gate_up is None else _CpuStack(
            gate_up, down, [_GateUpExpert(gate_up[e], down[e], inter) for e in range(num)])
        self.__dict__["_stacked"] = stacked = (gate, up, down)
        return stacked


    def _still_stacked(self, stacked: tuple[torch.Tensor, ...]) -> bool:
        """Whether the first and last experts' weights are still slices of ``stacked`` (gate, up, down first):
        ``.to()`` or ``load_state_dict(assign=True)`` gives them storage of their own."""
        return all(getattr(e, name).weight.data_ptr() == w[i].data_ptr()
                   for i, e in ((0, self.experts[0]), (len(self.experts) - 1, self.experts[-1]))
                   for name, w in zip(("gate_proj", "up_proj", "down_proj"), stacked))

    def stacked_int8_experts(self) -> tuple[torch.Tensor, ...] | None:
        """For int8 experts (:class:`~kimivl.ops.int8_linear.Int8Linear`, the C++ decode step's operands): ``gate``,
        ``up`` (E, I, D), ``down`` (E, D, I) int8 and their scales (E, I), (E, I), (E, D) float32, the experts'
        buffers re-pointed to views of them as :meth:`stacked_experts` does (one copy; state-dict keys and values
        unchanged). None when an expert is not a plain int8 MLP or they differ in shape or device."""
        stacked = self.__dict__.get("_stacked_int8")
        if stacked is not None and self._still_stacked(stacked):
            return stacked
        if not all(plain_int8_mlp(e) for e in self.experts):
            return None
        layers = [[getattr(e, name) for e in self.experts] for name in ("gate_proj", "up_proj", "down_proj")]
        first = layers[0][0].weight
        num, (inter, dim) = len(self.experts), first.shape
        shapes = ((inter, dim), (inter, dim), (dim, inter))
        if any(tuple(p.weight.shape) != shape or p.weight.device != first.device
               for row, shape in zip(layers, shapes) for p in row):
            return None
        # loaded quantized, the experts' buffers are already views of one stack each (quantize_tensors): adopt them
        adopted = [_stack_of([p.weight for p in row]) for row in layers] \
            + [_stack_of([p.weight_scale for p in row]) for row in layers]
        if all(t is not None for t in adopted):
            stacked = (*adopted[:3], *(s.view(num, -1) for s in adopted[3:]))
            self.__dict__["_stacked_int8"] = stacked
            return stacked
        weights, scales = [], []
        with torch.inference_mode(False), torch.no_grad():
            for row, (rows, cols) in zip(layers, shapes):
                w = first.new_empty(num, rows, cols)
                s = torch.empty(num, rows, dtype=torch.float32, device=first.device)
                for i, p in enumerate(row):  # copy, then re-point: each old buffer is freed as it goes
                    w[i].copy_(p.weight)
                    s[i].copy_(p.weight_scale.view(-1))
                    p.weight, p.weight_scale = w[i], s[i].view(rows, 1)
                weights.append(w)
                scales.append(s)
        self.__dict__["_stacked_int8"] = stacked = (*weights, *scales)
        return stacked


def _stack_of(views: list[torch.Tensor]) -> torch.Tensor | None:
    """The (E, ...) contiguous tensor whose E slices, in order, these tensors are, or None."""
    base = views[0]._base
    if base is None or not base.is_contiguous() or base.shape[0] != len(views):
        return None
    if all(v._base is base and v.data_ptr() == base[i].data_ptr() and v.shape == base.shape[1:]
           for i, v in enumerate(views)):
        return base
    return None


class _CpuStack(NamedTuple):
    """The CPU form of the stacked experts: ``gate_up`` (E, 2I, D) (each expert's gate rows, then its up rows) and
    ``down`` (E, D, I) for :func:`~kimivl.ops.moe.grouped_cpu_moe`, and per-expert callables over the same
    storage for :func:`~kimivl.ops.moe.moe_dispatch` (built once with the stack, not per forward)."""

    gate_up: torch.Tensor
    down: torch.Tensor
    experts: list[Callable[[torch.Tensor], torch.Tensor]]


class _GateUpExpert:
    """One expert of :attr:`_CpuStack.experts`: ``down(silu(h[:, :I]) * h[:, I:])`` with ``h = x @ gate_up.T``."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, inter: int) -> None:
        self.gate_up, self.down, self.inter = gate_up, down, inter

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h = linear(x, self.gate_up)
        return linear(F.silu(h[..., :self.inter]) * h[..., self.inter:], self.down)
