"""LoRA through peft with MLA-correct default targets, adapter save / load, merge, merged export.

Default targets are regexes over the official module names (peft matches them with ``re.fullmatch``):
- decoder attention (MLA): ``q_proj`` (``q_lora_rank: null``) or ``q_a_proj`` / ``q_b_proj``,
  ``kv_a_proj_with_mqa``, ``kv_b_proj``, ``o_proj`` (MLA has no ``k_proj`` / ``v_proj``);
- decoder MLPs: the dense ``gate_proj`` / ``up_proj`` / ``down_proj``, every routed expert's and the shared
  expert's (``mlp.experts.{e}.*``, ``mlp.shared_experts.*``); the router ``mlp.gate`` is not adapted;
- projector: ``linear_1``, ``linear_2``;
- MoonViT (only with ``lora_vision``): ``wqkv``, ``wo``, ``mlp.fc0``, ``mlp.fc1``.
The merged export adds ``scaling * B @ A`` (peft's ``get_delta_weight``) to each base weight in a new
state dict under the official keys, leaving the training model untouched.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kimivl.training.config import TrainingArguments
from kimivl.training.export import copy_processor_files, export_pretrained

logger = logging.getLogger(__name__)

DECODER_TARGETS = (r"language_model\.model\.layers\.\d+\.(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa"
                   r"|kv_b_proj|o_proj)|mlp\.((experts\.\d+\.|shared_experts\.)?(gate_proj|up_proj|down_proj)))")
PROJECTOR_TARGETS = r"multi_modal_projector\.(linear_1|linear_2)"
VISION_TARGETS = r"vision_tower\.encoder\.blocks\.\d+\.(wqkv|wo|mlp\.fc0|mlp\.fc1)"


def _require_peft() -> Any:
    try:
        import peft
    except ImportError as e:
        raise ImportError("LoRA needs peft: pip install 'kimivl[train]'") from e
    return peft


def default_lora_targets(*, vision: bool = False) -> str:
    """The default ``target_modules`` regex (see the module docstring)."""
    parts = [DECODER_TARGETS, PROJECTOR_TARGETS] + ([VISION_TARGETS] if vision else [])
    return "(" + "|".join(parts) + ")"


def apply_lora(model: nn.Module, args: TrainingArguments) -> nn.Module:
    """Wrap ``model`` in a peft ``PeftModel`` (base frozen, LoRA A/B trainable, B = 0 so outputs start equal)."""
    peft = _require_peft()
    targets = args.lora_targets if args.lora_targets is not None else default_lora_targets(vision=args.lora_vision)
    config = peft.LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                             target_modules=targets, bias="none")
    wrapped = peft.get_peft_model(model, config)
    n = sum(1 for m in wrapped.modules() if isinstance(m, peft.tuners.lora.LoraLayer))
    logger.info("LoRA r=%d alpha=%g on %d modules", args.lora_r, args.lora_alpha, n)
    return wrapped


def save_adapter(peft_model: nn.Module, directory: str | os.PathLike[str]) -> Path:
    """``adapter_config.json`` + ``adapter_model.safetensors`` (peft format)."""
    directory = Path(directory)
    peft_model.save_pretrained(str(directory))
    return directory


def load_adapter(base_model: nn.Module, directory: str | os.PathLike[str], *, trainable: bool = False) -> nn.Module:
    """A ``PeftModel`` of ``base_model`` with the adapter saved in ``directory``."""
    peft = _require_peft()
    return peft.PeftModel.from_pretrained(base_model, str(directory), is_trainable=trainable)


@torch.no_grad()
def merged_state_dict(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """Official-key state dict of base + adapter (``W + scaling * B @ A`` per adapted module).

    Non-destructive: the peft model and its base weights are left exactly as they are.
    """
    peft = _require_peft()
    base = peft_model.get_base_model()
    out: dict[str, torch.Tensor] = {}
    for key, value in base.state_dict().items():
        if ".lora_" in key or key.endswith(".lora_magnitude_vector"):
            continue
        out[key.replace(".base_layer.", ".")] = value
    for name, module in base.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer) and not module.merged:
            weight = module.get_base_layer().weight
            delta = sum(module.get_delta_weight(a) for a in module.active_adapters if a in module.lora_A)
            out[f"{name}.weight"] = (weight + delta).to(weight.dtype)
    return out


def merge_lora(peft_model: nn.Module) -> nn.Module:
    """peft's ``merge_and_unload``: the plain model with merged weights (the wrapper is consumed)."""
    return peft_model.merge_and_unload()


def export_lora(peft_model: nn.Module, directory: str | os.PathLike[str], args: TrainingArguments, *,
                sources: Sequence[str | os.PathLike[str] | None] = ()) -> Path:
    """With ``lora_merge_on_export``: the merged model in the official layout (and the adapter in
    ``<directory>/adapter``); otherwise the adapter alone (+ processor files) in ``directory``."""
    directory = Path(directory)
    if not args.lora_merge_on_export:
        save_adapter(peft_model, directory)
        copy_processor_files(directory, sources)
        return directory
    state = merged_state_dict(peft_model)
    if args.export_dtype:
        dtype = getattr(torch, args.export_dtype)
        state = {k: v.to(dtype) if v.is_floating_point() and not k.endswith("e_score_correction_bias") else v
                 for k, v in state.items()}
    export_pretrained(peft_model.get_base_model(), directory, sources=sources, state_dict=state)
    save_adapter(peft_model, directory / "adapter")
    return directory
