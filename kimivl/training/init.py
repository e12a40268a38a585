"""Weight initialisation of a freshly built model (training from scratch).

The rule (DeepSeek-V3 / Hugging Face ``_init_weights`` style, one std for the whole model):
- ``nn.Linear``, ``nn.Conv2d``, ``nn.Embedding`` weights and the MoE router ``gate.weight``:
  normal(0, std) with ``std = text_config.initializer_range`` (0.02) unless given; the embedding
  row of ``padding_idx`` is zeroed;
- biases: zeros; ``e_score_correction_bias``: zeros (routing starts unbiased);
- LayerNorm / RMSNorm weights: ones (LayerNorm biases zeros);
- MoonViT's learnable 2-D position table: normal(0, std).
A seeded ``torch.Generator`` makes the result depend only on ``seed`` (no global RNG is touched).
"""
from __future__ import annotations

import torch
from torch import nn

from kimivl.decoder.moe import MoEGate
from kimivl.decoder.norm import DeepseekV3RMSNorm
from kimivl.vision.moonvit import Learnable2DInterpPosEmb


@torch.no_grad()
def init_weights(model: nn.Module, *, std: float | None = None, seed: int = 0) -> nn.Module:
    """Initialise every parameter of ``model`` in place (rule in the module docstring); returns it."""
    if std is None:
        config = getattr(model, "config", None)
        text = getattr(config, "text_config", config)
        std = float(getattr(text, "initializer_range", 0.02))
    g = torch.Generator(device="cpu").manual_seed(seed)

    def normal_(t: torch.Tensor) -> None:
        t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float32).mul_(std).to(t.dtype))

    done: set[int] = set()
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            if id(module.weight) not in done:
                normal_(module.weight)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            if id(module.weight) not in done:
                normal_(module.weight)
                if module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, MoEGate):
            normal_(module.weight)
            if module.e_score_correction_bias is not None:
                module.e_score_correction_bias.zero_()
        elif isinstance(module, (nn.LayerNorm, DeepseekV3RMSNorm)):
            module.weight.fill_(1.0)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, Learnable2DInterpPosEmb):
            normal_(module.weight)
        for p in module.parameters(recurse=False):
            done.add(id(p))
    return model
