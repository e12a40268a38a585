"""The MoE router in training: expert-load statistics, sequence-level balance loss, aux-free bias update.

Spec: ``shared/reference/kimivl-spec.md`` §4 "MoE". The gate itself (``kimivl.decoder.moe.MoEGate`` +
``kimivl.ops.routing.route``) already trains the checkpoint's ``noaux_tc`` routing: experts are chosen
from the detached biased scores, the weights are the unbiased scores with their gradient. This module
only *observes* it through forward hooks on every ``MoEGate`` (no decoder change):

- expert load: per MoE layer, how many (token, slot) choices each expert received on real tokens;
- ``balance_loss``: DeepSeek-V3's complementary sequence-wise loss
  ``alpha * mean_seq sum_i f_i P_i`` with ``f_i = E / (K S) * #tokens of the sequence choosing i`` and
  ``P_i`` the mean over the sequence of the scores normalised per token (off unless ``alpha > 0``);
- ``update_bias``: the auxiliary-loss-free rule ``b_i += gamma * sign(mean load - load_i)`` applied to
  ``e_score_correction_bias`` after each optimizer step (off unless ``gamma > 0``).
Hooks record only while ``recording`` is on, so a gradient-checkpointing recompute is not counted twice.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from kimivl.decoder.moe import MoEGate


@dataclass
class _GateRecord:
    name: str
    gate: MoEGate
    load: torch.Tensor  # (E,) float64 counts since the last reset
    scores: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (topk_idx, scores) per forward


class RouterMonitor:
    """Forward hooks on every ``MoEGate`` of ``model``; see the module docstring."""

    def __init__(self, model: nn.Module, *, keep_scores: bool = False) -> None:
        self.keep_scores = keep_scores
        self.recording = False
        self.token_mask: torch.Tensor | None = None  # (B*S,) bool, True = real token
        self.batch_shape: tuple[int, int] | None = None
        self.records: list[_GateRecord] = []
        self._handles = []
        for name, module in model.named_modules():
            if isinstance(module, MoEGate):
                rec = _GateRecord(name, module, torch.zeros(module.n_routed_experts, dtype=torch.float64))
                self.records.append(rec)
                self._handles.append(module.register_forward_hook(self._hook(rec)))

    def _hook(self, rec: _GateRecord):
        def hook(_module: nn.Module, _inputs: tuple, output: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
            if not self.recording:
                return
            topk_idx, _, scores = output
            idx = topk_idx
            if self.token_mask is not None and self.token_mask.numel() == idx.shape[0]:
                idx = idx[self.token_mask.to(idx.device)]
            rec.load += torch.bincount(idx.reshape(-1).cpu(), minlength=rec.load.numel()).double()
            if self.keep_scores:
                rec.scores.append((topk_idx, scores))
        return hook

    def __len__(self) -> int:
        return len(self.records)

    def start(self, attention_mask: torch.Tensor | None) -> None:
        """Record the next forward; ``attention_mask`` (B, S) excludes pads from the statistics."""
        self.recording = True
        self.token_mask = attention_mask.reshape(-1).bool() if attention_mask is not None else None
        self.batch_shape = tuple(attention_mask.shape) if attention_mask is not None else None

    def stop(self) -> None:
        self.recording = False
        for rec in self.records:
            rec.scores.clear()

    def reset_load(self) -> None:
        for rec in self.records:
            rec.load.zero_()

    def all_reduce_load(self) -> None:
        if dist.is_available() and dist.is_initialized() and self.records:
            flat = torch.stack([rec.load for rec in self.records])
            dist.all_reduce(flat)
            for rec, row in zip(self.records, flat):
                rec.load.copy_(row)

    def load_fractions(self) -> dict[str, list[float]]:
        """Per MoE layer: the share of routed choices each expert received (sums to 1)."""
        return {rec.name: (rec.load / rec.load.sum().clamp(min=1)).tolist() for rec in self.records}

    def imbalance(self) -> dict[str, float]:
        """Per MoE layer: max load / mean load (1.0 = perfectly balanced)."""
        return {rec.name: float(rec.load.max() / rec.load.mean().clamp(min=1e-12)) for rec in self.records}

    # ------------------------------------------------------------------ balance loss
    def balance_loss(self, alpha: float) -> torch.Tensor | None:
        """Sequence-wise balance loss of the recorded forward (needs ``keep_scores=True``)."""
        if alpha <= 0 or not self.records or self.batch_shape is None:
            return None
        b, s = self.batch_shape
        mask = self.token_mask.view(b, s).float() if self.token_mask is not None else None
        total = None
        for rec in self.records:
            for topk_idx, scores in rec.scores:
                e, k = scores.shape[-1], topk_idx.shape[-1]
                m = mask.to(scores.device) if mask is not None else scores.new_ones(b, s)
                n_tok = m.sum(-1).clamp(min=1)  # (B,)
                chosen = torch.zeros(b * s, e, device=scores.device).scatter_(1, topk_idx, 1.0).view(b, s, e)
                f = (chosen * m[..., None]).sum(1) * e / (k * n_tok[:, None])  # (B, E)
                p_norm = scores / scores.sum(-1, keepdim=True).clamp(min=1e-20)
                p = (p_norm.view(b, s, e) * m[..., None]).sum(1) / n_tok[:, None]  # (B, E)
                term = (f.detach() * p).sum(-1).mean()
                total = term if total is None else total + term
        return None if total is None else alpha * total

    # ------------------------------------------------------------------ aux-free bias update
    @torch.no_grad()
    def update_bias(self, speed: float) -> None:
        """``b_i += speed * sign(mean load - load_i)`` on every gate with a correction bias (uses the load
        counted since the last ``reset_load``; call ``all_reduce_load`` first under data parallelism)."""
        if speed <= 0:
            return
        for rec in self.records:
            bias = rec.gate.e_score_correction_bias
            if bias is None or rec.load.sum() == 0:
                continue
            delta = (torch.sign(rec.load.mean() - rec.load) * speed).to(bias.device, bias.dtype)
            if isinstance(bias, DTensor):  # FSDP2 shards the bias; every rank holds the same delta
                delta = distribute_tensor(delta, bias.device_mesh, bias.placements)
            bias.add_(delta)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
