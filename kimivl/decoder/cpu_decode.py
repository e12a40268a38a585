"""A bf16 decoder layer's decode step on the CPU in two C++ calls instead of ~100 Python-level ones.

Why: a decode step of one layer is ~25 module calls and ~75 tensor ops around six weight-streaming kernels
(norms, projections, RoPE, the cache write, the router's dozen ops, the expert dispatch). On a 2-core AVX2
CPU that glue cost ~0.8 ms per layer and step, ~0.3 ms with these calls (measured on a width-64 model where the
kernels take no time: docs/performance.md, "A decoder layer's decode step in two C++ calls"); the real 27-layer
model spent ~20 ms of every token in it. :func:`layer_step` runs the same computation as ``DeepseekV3DecoderLayer.forward`` through
``mla_block`` and ``moe_block`` / ``mlp_block`` of :mod:`kimivl.ops.cpu_kernels`, which call the same kernels
with the same roundings in the same order (the router as ``MoEGate`` routes a decode step's rows, in C++; between
the kernels they pass raw rows, not tensors), so the answer is bit-identical to the module path (tested).

It applies to a decode step (one new token per row, at most ``SMALL_M`` rows, a cache, no autograd) of a layer
whose projections are plain bf16 :class:`~kimivl.ops.linear.Linear` layers without bias (not LoRA-wrapped) with
contiguous weights (read by rows), with RMSNorm weights in bf16 and routed experts that can be stacked (:meth:`DeepseekV3MoE.stacked_experts`).
Anything else returns None and the caller runs the modules. :func:`moe_step` is the MoE half alone, for a
``DeepseekV3MoE`` called by itself (router and experts in one call). What a layer or MoE module needs is
gathered once into a :class:`_Plan` kept on it, and checked per step by identity of the modules and
parameters it holds (replacing or wrapping any of them, ``.to()`` or ``load_state_dict`` rebuilds it).

:func:`model_step` goes one further for :func:`kimivl.generation.decode_step`: when every layer is served, the
embedding, all layers' blocks, the final norm and ``lm_head`` run as one call of the extension's ``DecoderStep``
(built from the layers' plans and kept on the model). The Python between the blocks was ~0.8 ms of a ~14 ms step
at the real width (cold: the weights stream the interpreter's working set out of the caches;
docs/performance.md, "The whole decode step in one call").
"""
from __future__ import annotations

import operator
from itertools import repeat
from dataclasses import dataclass

import torch
from torch import nn

from kimivl.decoder.cache import MLACache
from kimivl.decoder.norm import DeepseekV3RMSNorm
from kimivl.ops import cpu_kernels
from kimivl.ops.linear import SMALL_M
from kimivl.ops.moe import (decode_linear, plain_bf16_linear, plain_bf16_mlp, plain_int8_linear, plain_int8_mlp,
                            rows_bf16)
from kimivl.ops.rope import cached_inv_freq
from kimivl.ops.routing import TOPK_METHODS

PLAN = "_cpu_decode_plan"  # attribute of a layer's / MoE's __dict__: not a submodule, not in the state dict
_MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass
class _Plan:
    """A module's arguments for its C++ call (None: the fused step does not serve it) and what they were read
    from: ``refs`` (dict, key, object) hold while ``dict.get(key) is object``, ``versions`` (tensor, _version)
    while the tensors the plan copied (the router weight) are not modified in place."""

    args: tuple | None
    refs: tuple
    versions: tuple = ()

    def __post_init__(self) -> None:
        self._stores, self._keys, self._objects = (tuple(c) for c in zip(*self.refs)) if self.refs else ((), (), ())

    def current(self) -> bool:
        # ~40 identity checks per layer and step, in C loops (a Python generator took ~35 us per layer)
        return (all(map(operator.is_, map(dict.get, self._stores, self._keys), self._objects))
                and all(t._version == v for t, v in self.versions))


def _plan(module: nn.Module, build) -> _Plan:  # noqa: ANN001 (a builder function)
    plan = module.__dict__.get(PLAN)
    if plan is None or not plan.current():
        plan = module.__dict__[PLAN] = build(module)
    return plan


def _decode_rows(x: torch.Tensor) -> bool:
    """x is a decode step's few bf16 rows on the CPU, outside autograd."""
    return (x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.dim() >= 2
            and 0 < x.numel() // x.shape[-1] <= SMALL_M and not torch.is_grad_enabled())


def moe_step(moe: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``DeepseekV3MoE.forward(x)`` for a few tokens in one C++ call (router included: ``moe_forward``), or None
    where it does not apply."""
    if not _decode_rows(x):
        return None
    plan = _plan(moe, _moe_plan)
    ext = cpu_kernels.kernels() if plan.args is not None else None
    return None if ext is None else ext.moe_forward(x, *plan.args)


def layer_step(layer: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               attn_mask: torch.Tensor | None, cache: MLACache | None) -> torch.Tensor | None:
    """``layer(h, cos, sin, attn_mask, cache)`` for a decode step through the C++ blocks, or None where they do
    not apply (see the module docstring). Writes the new latent at ``cache.length`` as the module path does."""
    if cache is None or h.dim() != 3 or h.shape[1] != 1 or not _decode_rows(h):
        return None
    valid = None
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool or tuple(attn_mask.shape) != (h.shape[0], 1, 1, cache.length + 1):
            return None
        valid = attn_mask.view(h.shape[0], -1)
    plan = _plan(layer, _layer_plan)
    if plan.args is None:
        return None
    attn, dims, post, mlp, scales = plan.args
    if mlp is None:  # a MoE layer: its own plan (also used when the MoE module is called alone)
        moe_plan = _plan(layer.mlp, _moe_plan)
        if moe_plan.args is None:
            return None
    ext = cpu_kernels.kernels()
    if ext is None:
        return None
    h = ext.mla_block(h, *attn, cos, sin, cache.data[layer.layer_idx], cache.length, valid, *dims,
                      cpu_kernels.mla_decode_form(ext), scales)  # the form mla_decode takes in the module path too
    return ext.moe_block(h, *post, *moe_plan.args) if mlp is None else ext.mlp_block(h, *post, *mlp)


def model_step(lm: nn.Module, ids: torch.Tensor, cache: MLACache,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """:func:`kimivl.generation.decode_step` of a bf16 ``DeepseekV3ForCausalLM`` in one C++ call: the embedding,
    every layer's two blocks, the final norm and ``lm_head`` (``DecoderStep`` of ``decode_model.cpp``).

    ids: (B, 1) with B <= ``SMALL_M``; attention_mask: (B, cache.length + 1) or None. Returns the next-token
    logits (B, vocab) float32 and advances ``cache`` by one, bit for bit what the modules answer, or None where
    any part of the model is not served by the layer blocks (see the module docstring) or the inputs are not a
    plain decode step; the caller then runs the model, which also raises the errors for bad inputs.
    """
    if (ids.dim() != 2 or ids.shape[1] != 1 or not 0 < ids.shape[0] <= SMALL_M or ids.dtype != torch.int64
            or ids.device.type != "cpu" or torch.is_grad_enabled() or cache.batch_size != ids.shape[0]
            or cache.length >= cache.max_len):
        return None
    plan = _plan(lm, _build_model_plan)
    if plan.args is None or any(map(len, plan.hooks)) or _global_hooks():
        return None
    positions = valid = None
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (ids.shape[0], cache.length + 1) or attention_mask.device.type != "cpu":
            return None
        if not bool(attention_mask.all()):  # left padding: the rows' own positions, and the keys they may see
            from kimivl.decoder.model import causal_padding_mask  # (that module imports this one)

            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, cache.length:]
            valid = causal_padding_mask(attention_mask, cache.length).view(ids.shape[0], -1)
    ext = cpu_kernels.kernels()
    logits = plan.args.step(ids, cache.data, cache.length, positions, valid, cpu_kernels.mla_decode_form(ext))
    if logits is not None:
        cache.advance(1)
    return logits


@dataclass
class _ModelPlan(_Plan):
    """The whole model's plan: ``args`` is the extension's ``DecoderStep`` (or None), ``refs`` / ``versions`` those
    of every layer and MoE plan it was built from (``parts``, each kept in its module's ``__dict__``, ``dicts``),
    so one ``current()`` checks them all; ``hooks`` are the forward (pre-)hook dicts of the modules whose calls the
    one call replaces (any hook: the modules run)."""

    dicts: tuple = ()
    parts: tuple = ()
    hooks: tuple = ()

    def current(self) -> bool:
        # also stale when a layer dropped or rebuilt its own plan (.to() on one layer, say)
        return super().current() and all(map(operator.is_, map(dict.get, self.dicts, repeat(PLAN)), self.parts))


def _global_hooks() -> bool:
    """Forward hooks registered for every module (``nn.modules.module.register_module_forward_hook``)."""
    state = nn.modules.module
    return bool(state._global_forward_hooks or state._global_forward_pre_hooks)


def _build_model_plan(lm: nn.Module) -> _Plan:
    decoder = getattr(lm, "model", None)
    head = getattr(lm, "lm_head", None)
    layers = getattr(decoder, "layers", None)
    refs = [_ref(lm, "model"), _ref(lm, "lm_head")]
    if decoder is None or head is None or layers is None or not len(layers):
        return _Plan(None, tuple(refs))
    refs += [_ref(decoder, "embed_tokens"), _ref(decoder, "norm"), _ref(decoder, "layers")]
    refs += [_ref(decoder.embed_tokens, "weight"), _ref(decoder.norm, "weight")]
    if "weight" in head._parameters:
        refs.append(_ref(head, "weight"))
    from kimivl.decoder.model import DeepseekV3DecoderLayer, DeepseekV3Model  # (that module imports this one)

    if (not plain_bf16_linear(head) or not rows_bf16(decoder.embed_tokens.weight)
            or not rows_bf16(decoder.norm.weight) or type(decoder).forward is not DeepseekV3Model.forward
            or type(decoder.norm).forward is not DeepseekV3RMSNorm.forward):
        return _Plan(None, tuple(refs))
    # The layers' plans (each rebuilt here if stale); their references are this plan's too, so a change that makes
    # a layer servable again (or not) rebuilds it.
    blocks, dicts, parts, versions = [], [], [], []

    def plan_of(module: nn.Module, build) -> _Plan:  # noqa: ANN001 (a builder function)
        plan = _plan(module, build)
        refs.extend(plan.refs)
        versions.extend(plan.versions)
        dicts.append(module.__dict__)
        parts.append(plan)
        return plan

    def stop() -> _Plan:
        return _ModelPlan(None, tuple(refs), tuple(versions), tuple(dicts), tuple(parts))

    for i, layer in enumerate(layers):
        refs.append((decoder.layers._modules, str(i), layer))
        if getattr(layer, "layer_idx", None) != i or type(layer).forward is not DeepseekV3DecoderLayer.forward:
            return stop()
        plan = plan_of(layer, _layer_plan)
        if plan.args is None:
            return stop()
        attn, dims, post, mlp, scales = plan.args
        if mlp is None:
            moe = plan_of(layer.mlp, _moe_plan)
            if moe.args is None:
                return stop()
        blocks.append(((*attn, *dims, scales), (*post, *(mlp if mlp is not None else moe.args)), mlp is None))
    ext = cpu_kernels.kernels()  # only now: a model the blocks do not serve (float32, say) never builds it
    if ext is None:
        return stop()
    cfg = decoder.config
    inv_freq, scale = cached_inv_freq(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling, "cpu")
    step = ext.DecoderStep(decoder.embed_tokens.weight, decoder.norm.weight, decoder.norm.eps, head.weight,
                           inv_freq, scale)
    for attention, second, moe in blocks:
        step.add_attention(*attention)
        (step.add_moe if moe else step.add_mlp)(*second)
    hooks = [m.__dict__[d] for m in (decoder, decoder.embed_tokens, decoder.norm, head, *layers)
             for d in ("_forward_hooks", "_forward_pre_hooks")]
    return _ModelPlan(step, tuple(refs), tuple(versions), tuple(dicts), tuple(parts), tuple(hooks))


def _ref(module: nn.Module, name: str) -> tuple:
    store = next((d for d in (module._parameters, module._buffers) if name in d), module._modules)
    return store, name, store.get(name)


def _weights_of(modules: list) -> list:  # noqa: ANN001 (modules or None)
    """Refs of the tensors the blocks read from these projections: a bf16 layer's weight, an int8 one's weight and
    scales."""
    return [_ref(m, n) for m in modules if isinstance(m, nn.Module)
            for n in ("weight", "weight_scale") if n in m._parameters or n in m._buffers]


def _scales(modules: list) -> list:  # noqa: ANN001 (modules)
    """The blocks' scales argument: each int8 projection's per-row scales (None for a bf16 one), or [] when none
    is int8 (the bf16 kernels as before)."""
    scales = [m.weight_scale.view(-1) if plain_int8_linear(m) else None for m in modules]
    return scales if any(s is not None for s in scales) else []


def _layer_plan(layer: nn.Module) -> _Plan:
    """``mla_block``'s arguments (weights, then dimensions), the post-attention norm's, and the dense MLP's
    weights (None for a MoE layer, whose arguments are the MoE module's own plan)."""
    attn, mlp = layer.self_attn, layer.mlp
    refs = [_ref(layer, "self_attn"), _ref(layer, "mlp"), _ref(layer, "input_layernorm"),
            _ref(layer, "post_attention_layernorm")]
    lora = attn.q_lora_rank is not None
    projections = ("q_a_proj", "q_a_layernorm", "q_b_proj") if lora else ("q_proj",)
    for name in (*projections, "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj"):
        refs.append(_ref(attn, name))
    norms = [layer.input_layernorm, layer.post_attention_layernorm, attn.kv_a_layernorm]
    linears = [attn.kv_a_proj_with_mqa, attn.kv_b_proj, attn.o_proj]
    if lora:
        norms.append(attn.q_a_layernorm)
        linears += [attn.q_a_proj, attn.q_b_proj]
    else:
        linears.append(attn.q_proj)
    moe = hasattr(mlp, "experts")
    if not moe:
        refs += [_ref(mlp, n) for n in _MLP if n in mlp._modules]
        linears += [getattr(mlp, n, None) for n in _MLP]
    refs += _weights_of([*norms, *linears])
    # kv_b_proj is read as two matrices per head by the absorbed attention: bf16 only (never quantized)
    if (not all(decode_linear(m) for m in linears) or not plain_bf16_linear(attn.kv_b_proj)
            or not all(rows_bf16(n.weight) for n in norms)):
        return _Plan(None, tuple(refs))
    q = (None, attn.q_a_proj.weight, attn.q_a_layernorm.weight, attn.q_b_proj.weight) if lora \
        else (attn.q_proj.weight, None, None, None)
    queries = [attn.q_a_proj, attn.q_b_proj] if lora else [attn.q_proj, None]
    scales = _scales([*queries, attn.kv_a_proj_with_mqa, attn.o_proj])
    args = (layer.input_layernorm.weight, layer.input_layernorm.eps, *q, attn.kv_a_proj_with_mqa.weight,
            attn.kv_a_layernorm.weight, attn.kv_a_layernorm.eps, attn.kv_b_proj.weight, attn.o_proj.weight)
    dims = (attn.num_heads, attn.qk_nope_head_dim, attn.qk_rope_head_dim, attn.v_head_dim, float(attn.softmax_scale))
    post = (layer.post_attention_layernorm.weight, layer.post_attention_layernorm.eps)
    dense = None if moe else (*(getattr(mlp, n).weight for n in _MLP), _scales([getattr(mlp, n) for n in _MLP]))
    return _Plan((args, dims, post, dense, scales), tuple(refs))


def _moe_plan(moe: nn.Module) -> _Plan:
    """``moe_forward``'s arguments: the router weight in float32, the bias, the stacked experts, the shared MLP's
    weights, the routing settings and the int8 matrices' scales (experts' gate, up, down, shared MLP's; [] when all
    are bf16)."""
    gate, shared = moe.gate, moe.shared_experts
    refs = [_ref(moe, "gate"), _ref(moe, "shared_experts"), _ref(moe, "experts"), _ref(gate, "weight"),
            _ref(gate, "e_score_correction_bias")]
    for e in (moe.experts[0], moe.experts[-1]):
        refs += [_ref(e, n) for n in _MLP]
    if shared is not None:
        refs += [_ref(shared, n) for n in _MLP]
    int8 = all(plain_int8_mlp(e) for e in moe.experts)
    if ((shared is not None and not (plain_bf16_mlp(shared) or plain_int8_mlp(shared)))
            or gate.topk_method not in TOPK_METHODS or gate.scoring_func not in ("sigmoid", "softmax")
            or not (int8 or all(plain_bf16_mlp(e) for e in moe.experts))):
        return _Plan(None, tuple(refs))
    # re-points the experts' weights to views of the stacks: their refs are taken after it
    stacked = moe.stacked_int8_experts() if int8 else moe.stacked_experts()
    if stacked is None:
        return _Plan(None, tuple(refs))
    for e in (moe.experts[0], moe.experts[-1]):
        refs += _weights_of([getattr(e, n) for n in _MLP])
    shared_mlp = [] if shared is None else [getattr(shared, n) for n in _MLP]
    refs += _weights_of(shared_mlp)
    scales = []
    if int8 or _scales(shared_mlp):
        scales = [*(stacked[3:] if int8 else (None, None, None)), *(_scales(shared_mlp) or [None] * 3)]
    stacked = stacked[:3]
    router, bias = gate.weight, gate.e_score_correction_bias
    if router.dtype not in (torch.bfloat16, torch.float32) or not router.is_contiguous():
        return _Plan(None, tuple(refs))
    shared_weights = (None, None, None) if shared is None else tuple(getattr(shared, n).weight for n in _MLP)
    # the router weight is read in place (bf16 or float32); the bias as float32, a copy where it is not (so its
    # version is checked)
    args = (router.detach(), None if bias is None else bias.detach(), *stacked, *shared_weights, gate.top_k,
            gate.n_group, gate.topk_group, TOPK_METHODS.index(gate.topk_method), gate.scoring_func == "softmax",
            gate.norm_topk_prob, float(gate.routed_scaling_factor), scales)
    return _Plan(args, tuple(refs), () if bias is None else ((bias, bias._version),))
