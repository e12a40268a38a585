"""Mixture-of-experts feed-forward of the DeepSeek-V3 decoder (layers ``first_k_dense_replace`` and up).

Spec: ``shared/reference/kimivl-spec.md`` §4 "MoE", §2 keys ``mlp.experts.{e}.*``, ``mlp.gate.weight``,
``mlp.gate.e_score_correction_bias``, ``mlp.shared_experts.*``. Official names: ``DeepseekV3MoE``,
``MoEGate``. The maths lives in :mod:`kimivl.ops.routing` and :mod:`kimivl.ops.moe`.

Deliberate deviations: the gate runs in training mode (selection without gradient, weights with it);
``e_score_correction_bias`` is a parameter with ``requires_grad=False`` (DeepSeek-V3 updates it by a
load-balancing rule, never by gradient); one dispatch path for inference and training.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kimivl.configuration import DeepseekV3Config
from kimivl.decoder.mlp import DeepseekV3MLP
from kimivl.ops.moe import fused_cpu_moe, moe_dispatch
from kimivl.ops.routing import route


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
        logits = F.linear(x.float(), self.weight.float())  # fp32 router, as the official code
        return route(
            logits, self.e_score_correction_bias, top_k=self.top_k, n_group=self.n_group,
            topk_group=self.topk_group, topk_method=self.topk_method, scoring_func=self.scoring_func,
            norm_topk_prob=self.norm_topk_prob, routed_scaling_factor=self.routed_scaling_factor,
        )

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
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        topk_idx, topk_weight, _ = self.gate(x)
        fused = fused_cpu_moe(x, topk_idx, topk_weight, self.experts, self.shared_experts)
        if fused is not None:  # a decode step on the CPU: routed + shared experts in one C++ call
            return fused.view(shape)
        y = moe_dispatch(x, topk_idx, topk_weight, self.experts).view(shape)
        if self.shared_experts is not None:
            y = y + self.shared_experts(hidden_states)
        return y
