"""Weight-only int8 for the decoder's linear layers: one symmetric scale per output channel, activations unchanged.

Why: the released Kimi-VL-A3B is 16.4 B parameters, 30.6 GiB in bf16: it does not fit a 24 GiB machine, and a
decode step streams ~5.2 GB of active weights per token from memory. With the decoder's linear layers in int8
(routed and shared experts, the dense MLP, the attention projections) it is 16.4 GiB, and a decode step reads about
half the bytes (shared/reference/performance-notes.md §1.5). The layer and its arithmetic are
:mod:`kimivl.ops.int8_linear`'s; this module says which layers of a model are quantized, and how a checkpoint
records it.

What stays in the checkpoint's dtype: the embedding, ``lm_head`` (``model.dtype`` and the logits read it), each
layer's ``kv_b_proj`` (the absorbed MLA decode reads it as two matrices per head; 15 % of the attention's weights),
the router, the norms, the whole vision tower and projector (compute-bound: int8 weights would not speed them up).

State-dict keys follow compressed-tensors' ``int-quantized`` layout: ``<module>.weight`` int8 (out, in),
``<module>.weight_scale`` float32 (out, 1); :func:`quantization_config` is what ``config.json`` records.
"""
from __future__ import annotations

import re
from collections.abc import Iterator

import torch
from torch import nn

from kimivl.ops.int8_linear import Int8Linear, quantize_weight
from kimivl.ops.linear import Linear

METHODS = ("int8",)
# modules of the language model kept in their dtype (see the module docstring)
IGNORE = ("lm_head", "re:.*kv_b_proj$")


def check_method(method: str) -> str:
    """``method`` if it is a supported weight quantization, else a ValueError that lists them."""
    if method not in METHODS:
        raise ValueError(f"quantization={method!r} is not supported: choose one of {', '.join(METHODS)} (weight-only, "
                         "per output channel)")
    return method


def _ignored(name: str, ignore: tuple[str, ...]) -> bool:
    for pattern in ignore:
        if pattern.startswith("re:"):
            if re.match(pattern[3:], name):
                return True
        elif name == pattern or name.endswith("." + pattern):
            return True
    return False


def quantizable(model: nn.Module, ignore: tuple[str, ...] = IGNORE) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` of the language model's plain :class:`~kimivl.ops.linear.Linear` layers that int8 takes
    (names relative to ``model``); the vision tower and projector are never included."""
    language_model = getattr(model, "language_model", model)
    prefix = "language_model." if language_model is not model else ""
    for name, module in language_model.named_modules():
        if type(module) is Linear and not _ignored(name, ignore):
            yield prefix + name, module


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _drop_caches(model: nn.Module) -> None:
    """Forget what the fast paths built from the replaced layers (the experts' stacked weights, the C++ decode
    step's plans): they hold the old weights, and rebuild from the new modules when they still apply."""
    for module in model.modules():
        for key in ("_stacked", "_stacked_int8", "_cpu_stacked", "_cpu_decode_plan"):
            module.__dict__.pop(key, None)


def replace_linears(model: nn.Module, ignore: tuple[str, ...] = IGNORE) -> list[str]:
    """Swap every quantizable layer for an empty :class:`Int8Linear` on the meta device (what ``from_pretrained``
    builds before reading a checkpoint). Returns the names replaced."""
    names = []
    for name, module in list(quantizable(model, ignore)):
        _set(model, name, Int8Linear(module.in_features, module.out_features, module.bias is not None, "meta"))
        names.append(name)
    return names


@torch.no_grad()
def quantize_model(model: nn.Module, method: str = "int8", ignore: tuple[str, ...] = IGNORE) -> nn.Module:
    """Quantize ``model``'s language model in place, as ``from_pretrained(..., quantization="int8")`` does on load:
    the same :func:`quantize_tensors` pass over the model's own weights, each float weight freed as its int8 copy
    is made (the peak is the model plus one weight's float32 copy), the routed experts' int8 weights written into
    their stacks. Returns ``model``, with its ``config`` recording the scheme (``save_pretrained`` writes it;
    ``from_pretrained`` reads it back)."""
    check_method(method)
    layers = dict(quantizable(model, ignore))
    if not layers:
        return model
    weights = {name + ".weight": layer.weight for name, layer in layers.items()}
    replace_linears(model, ignore)  # from here on only `weights` holds the float weights
    for name, layer in layers.items():
        if layer.bias is not None:
            model.get_submodule(name).bias = layer.bias.detach().clone()
    del layers

    def drain() -> Iterator[tuple[str, torch.Tensor]]:
        while weights:  # popped as read: each float weight is freed once quantized
            key = next(iter(weights))
            yield key, weights.pop(key).detach()

    for key, tensor in quantize_tensors(drain(), set(weights), device=None):
        module_name, _, attr = key.rpartition(".")
        setattr(model.get_submodule(module_name), attr, tensor)
    _drop_caches(model)
    config = getattr(model, "config", None)
    if config is not None:
        config.extra["quantization_config"] = quantization_config(ignore)
    return model


def quantization_config(ignore: tuple[str, ...] = IGNORE) -> dict:
    """``config.json``'s ``quantization_config`` for this scheme, in compressed-tensors' terms (W8A16, symmetric,
    per channel, stored int8); ``ignore`` names modules of the language model kept in their dtype."""
    return {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "group_size": None,
                        "dynamic": False},
            "input_activations": None,
            "output_activations": None,
        }},
        "ignore": ["re:vision_tower.*", "re:multi_modal_projector.*",
                   *(p if p.startswith("re:") else "language_model." + p for p in ignore)],
        "kv_cache_scheme": None,
    }


def method_of(config: dict | None) -> tuple[str | None, tuple[str, ...]]:
    """``(method, ignore)`` of a checkpoint's ``quantization_config`` (``(None, ())`` when there is none); anything
    but the scheme :func:`quantization_config` writes is refused by name."""
    if config is None:
        return None, ()
    group = (config.get("config_groups") or {}).get("group_0") or {}
    weights = group.get("weights") or {}
    if (config.get("quant_method") != "compressed-tensors" or config.get("format") != "int-quantized"
            or len(config.get("config_groups") or {}) != 1 or group.get("input_activations") is not None
            or weights.get("num_bits") != 8 or weights.get("type") != "int" or not weights.get("symmetric")
            or weights.get("strategy") != "channel"):
        summary = {k: config.get(k) for k in ("quant_method", "format")}
        raise ValueError(f"config.json's quantization_config is not one kimivl loads: {summary}, weights {weights}, "
                         "input_activations " + repr(group.get("input_activations"))
                         + "; supported: compressed-tensors int-quantized, 8-bit symmetric per-channel weights, "
                           "unquantized activations (what kimivl's quantization='int8' writes)")
    ignore = []
    for pattern in config.get("ignore") or []:
        if pattern in ("re:vision_tower.*", "re:multi_modal_projector.*"):
            continue
        ignore.append(pattern if pattern.startswith("re:") else pattern.removeprefix("language_model."))
    return "int8", tuple(ignore)


# A routed expert's projection: the loader writes the experts' int8 weights into one (E, N, K) stack per layer and
# projection, which the C++ decode step reads as it is (DeepseekV3MoE.stacked_int8_experts adopts it: no copy)
EXPERT_WEIGHT = re.compile(r"^(.*\.experts)\.(\d+)\.((?:gate|up|down)_proj)\.weight$")


def quantize_tensors(tensors: Iterator[tuple[str, torch.Tensor]], weight_keys: set[str],
                     device: torch.device | str | None = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """A checkpoint's ``(key, tensor)`` stream with each float ``weight_keys`` tensor replaced by its int8 weight and
    ``weight_scale`` on ``device``, the rest as they come; int8 tensors (an already quantized checkpoint) pass as
    they are (``device`` None: each on its tensor's device). Routed experts' weights come as views of one stack per
layer and projection (see ``EXPERT_WEIGHT``).

    Only the results are new memory: the float weight (a view of the reader's scratch buffer, see
    :func:`kimivl.checkpoint.iter_checkpoint_tensors`) and the float32 work buffer are reused from tensor to tensor.
    Freed per-tensor copies would leave holes between the kept int8 tensors that the heap cannot hand back: a
    full-depth real-width load held 23.3 GB for 15.5 GB of weights that way, and stacking the experts after the load
    needed their size again (docs/performance.md)."""
    experts: dict[tuple[str, str], int] = {}
    for key in weight_keys:
        match = EXPERT_WEIGHT.match(key)
        if match:
            group = (match[1], match[3])
            experts[group] = max(experts.get(group, 0), int(match[2]) + 1)
    stacks: dict[tuple[str, str, str], torch.Tensor] = {}

    def place(weight_key: str, part: str, t: torch.Tensor, copy: bool) -> torch.Tensor:
        """``t`` (an int8 weight or its scales) on ``device``: in its slot of the experts' stack for a routed expert
        (allocated at the first expert seen), else as is (``copy``: it is a view of the reader's scratch)."""
        match = EXPERT_WEIGHT.match(weight_key)
        if match:
            group = (match[1], match[3], part)
            stack = stacks.get(group)
            if stack is None:
                stack = stacks[group] = torch.empty(experts[group[:2]], *t.shape, dtype=t.dtype,
                                                    device=device or t.device)
            if tuple(stack.shape[1:]) == tuple(t.shape) and stack.dtype == t.dtype:
                return stack[int(match[2])].copy_(t)
        return t.to(device or t.device, copy=copy)

    work = torch.empty(0, dtype=torch.float32)
    for key, tensor in tensors:
        weight_key = key.removesuffix("_scale")
        if weight_key not in weight_keys:
            yield key, tensor
        elif key != weight_key:  # an int8 checkpoint's stored scales
            yield key, place(weight_key, "scale", tensor, copy=False)
        elif not tensor.is_floating_point():  # an int8 checkpoint's weight, as stored
            yield key, place(key, "weight", tensor, copy=True)
        else:
            if work.numel() < tensor.numel():
                work = torch.empty(0, dtype=torch.float32)  # free the old one before growing
                work = torch.empty(tensor.numel(), dtype=torch.float32)
            q, scale = quantize_weight(tensor, key, work if tensor.device.type == "cpu" else None)
            del tensor
            yield key, place(key, "weight", q, copy=False)
            yield key + "_scale", place(key, "scale", scale, copy=False)
