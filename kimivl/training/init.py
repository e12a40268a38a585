"""Weight initialisation of a freshly built model (training from scratch).

The rule (DeepSeek-V3 / Hugging Face ``_init_weights`` style, one std for the whole model):
- ``nn.Linear``, ``nn.Conv2d``, ``nn.Embedding`` weights and the MoE router ``gate.weight``:
  normal(0, std) with ``std = text_config.initializer_range`` (0.02) unless given; the embedding
  row of ``padding_idx`` is zeroed;
- biases: zeros; ``e_score_correction_bias``: zeros (routing starts unbiased);
- LayerNorm / RMSNorm weights: ones (LayerNorm biases zeros);
- MoonViT's learnable 2-D position table: a 2-D sine-cosine table (:func:`sincos_2d`: the column in half the
  channels, the row in the other half) at rms ``POS_EMB_RMS``. A random table (normal(0, std), tried
  first) gives every grid cell an unrelated vector, and the demo model's tower then carried no linearly
  readable position at all (a ball's column: chance from its own token, docs/demo-model.md); sine-cosine
  rows make position readable from the start and stay learnable.
A seeded ``torch.Generator`` makes the result depend only on ``seed`` (no global RNG is touched).
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from kimivl.decoder.moe import MoEGate
from kimivl.decoder.norm import DeepseekV3RMSNorm
from kimivl.vision.moonvit import Learnable2DInterpPosEmb


POS_EMB_RMS = 0.1  # about half the rms of a freshly initialised patch embedding of a light image


def sincos_2d(height: int, width: int, dim: int) -> torch.Tensor:
    """(height, width, dim) table: channels [0, dim/2) encode the column, [dim/2, dim) the row, each as
    sin/cos pairs at geometric frequencies (1 .. 1/10000, the Transformer's); rms 1/sqrt(2)."""
    if dim % 4:
        raise ValueError(f"a 2-D sine-cosine table needs dim divisible by 4, got {dim}")
    quarter = dim // 4
    freqs = 1.0 / (10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter))

    def encode(n: int) -> torch.Tensor:  # (n, dim/2)
        angles = torch.arange(n, dtype=torch.float64)[:, None] * freqs[None]
        return torch.cat((angles.sin(), angles.cos()), dim=-1)

    cols = encode(width)[None].expand(height, width, 2 * quarter)
    rows = encode(height)[:, None].expand(height, width, 2 * quarter)
    return torch.cat((cols, rows), dim=-1).float()


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
            h, w, d = module.weight.shape
            module.weight.copy_(sincos_2d(h, w, d).mul_(POS_EMB_RMS * 2 ** 0.5).to(module.weight.dtype))
        for p in module.parameters(recurse=False):
            done.add(id(p))
    return model


def golden_recipe_tensors(shapes: dict[str, torch.Size], seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """:func:`golden_recipe_state_dict`'s tensors one at a time, in ``shapes``' order (the same values: a writer can
    stream a checkpoint larger than memory)."""
    g = torch.Generator().manual_seed(seed)
    for name, shape in shapes.items():
        if name.endswith("embed_tokens.weight"):
            yield name, torch.randn(shape, generator=g)
        elif len(shape) == 2:
            yield name, torch.randn(shape, generator=g) * shape[1] ** -0.5
        elif name.endswith("e_score_correction_bias"):
            yield name, torch.randn(shape, generator=g) * 0.1
        else:
            yield name, 1 + torch.randn(shape, generator=g) * 0.1


def golden_recipe_state_dict(shapes: dict[str, torch.Size], seed: int) -> dict[str, torch.Tensor]:
    """Random tensors for the given key -> shape map, drawn the way the shared golden sets were made:
    N(0, 1/fan_in) matrices, N(0, 1) token embeddings, N(0, 0.1^2) router bias, 1 + N(0, 0.1^2) for
    every other vector (norm gains). For parity tests and benchmarks, where weights far from a trained
    model's scale would hide numerical differences; not a training init (see ``init_weights``)."""
    return dict(golden_recipe_tensors(shapes, seed))
