"""Compressed MLA KV cache: one preallocated tensor of normed latents and rotated rope keys.

Spec: ``shared/reference/kimivl-spec.md`` §4 "MLA attention" items 2-4 and 8. The official code caches the
expanded per-head keys (192 values) and values (128) in a ``DynamicCache``; this cache stores what
:meth:`~kimivl.decoder.attention.DeepseekV3Attention.latent` returns instead: ``kv_a_layernorm(c_kv)``
(``kv_lora_rank`` values) followed by the rotated single-head ``k_pe`` (``qk_rope_head_dim`` values, in the
de-interleaved channel order of :func:`kimivl.ops.rope.apply_rope`) per token and layer.

The cache is state of one generation call, never of a module: it is created by the caller and passed to
every forward (gpt-fast style). It is preallocated to ``max_len`` tokens, so decoding never reallocates.
"""
from __future__ import annotations

import torch

from kimivl.configuration import DeepseekV3Config
from kimivl.errors import KimiVLInputError


def latent_cache_dtype(weight_dtype: torch.dtype, device: torch.device | str | None = None) -> torch.dtype:
    """The dtype a generation cache should use for a model with ``weight_dtype`` weights on ``device``.

    The weights' dtype, except bf16 on a CPU without a bf16 matmul path: the absorbed decode computes in
    float32 there (:func:`kimivl.ops.mla.absorbed_mla_attention`), and a bf16 cache made every step convert
    the layer's whole history (measured ~4 ms per layer at 4K tokens, docs/performance.md); a float32 cache
    converts only the new row. Twice the bytes per token (still the latent: 576 values, not 16 x 320).
    """
    from kimivl.ops.cpu_kernels import cpu_has_fast_bf16

    on_cpu = device is None or torch.device(device).type == "cpu"
    if weight_dtype == torch.bfloat16 and on_cpu and not cpu_has_fast_bf16():
        return torch.float32
    return weight_dtype


class MLACache:
    """Per-layer latent cache ``data``: (num_layers, B, max_len, kv_lora_rank + qk_rope_head_dim).

    Protocol of one model forward over ``S`` new tokens: every layer calls :meth:`update` (which writes at
    ``length`` and returns the layer's whole history including the new tokens), then the model calls
    :meth:`advance` once with ``S``. All rows of the batch share ``length``: left padding keeps them aligned.
    """

    def __init__(self, num_layers: int, batch_size: int, max_len: int, kv_lora_rank: int, qk_rope_head_dim: int,
                 *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        for name, value in (("num_layers", num_layers), ("batch_size", batch_size), ("max_len", max_len),
                            ("kv_lora_rank", kv_lora_rank), ("qk_rope_head_dim", qk_rope_head_dim)):
            if value <= 0:
                raise KimiVLInputError(f"MLACache {name} must be positive, got {value}")
        self.kv_lora_rank = kv_lora_rank
        self.qk_rope_head_dim = qk_rope_head_dim
        self.data = torch.zeros(num_layers, batch_size, max_len, kv_lora_rank + qk_rope_head_dim,
                                dtype=dtype, device=device)
        self.length = 0

    @classmethod
    def from_config(cls, config: DeepseekV3Config, batch_size: int, max_len: int, *,
                    dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> MLACache:
        """A cache sized for ``config`` (``num_hidden_layers``, ``kv_lora_rank``, ``qk_rope_head_dim``)."""
        return cls(config.num_hidden_layers, batch_size, max_len, config.kv_lora_rank, config.qk_rope_head_dim,
                   dtype=dtype, device=device)

    @property
    def num_layers(self) -> int:
        return self.data.shape[0]

    @property
    def batch_size(self) -> int:
        return self.data.shape[1]

    @property
    def max_len(self) -> int:
        return self.data.shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    def bytes_per_token(self) -> int:
        """(kv_lora_rank + qk_rope_head_dim) * num_layers * dtype size, per batch row."""
        return self.data.shape[-1] * self.num_layers * self.data.element_size()

    def check_room(self, new_tokens: int) -> None:
        """Raise if ``new_tokens`` more tokens would not fit."""
        if self.length + new_tokens > self.max_len:
            raise KimiVLInputError(
                f"the KV cache holds {self.length} of max_len={self.max_len} tokens and cannot take {new_tokens} "
                f"more ({self.length + new_tokens} > {self.max_len}); allocate a larger MLACache"
            )

    def update(self, layer_idx: int, c_kv: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
        """Write the new tokens of one layer at ``length``; return that layer's history.

        c_kv: (B, S, kv_lora_rank) normed latent; k_pe: (B, S, qk_rope_head_dim) rotated rope key.
        Returns a view (B, length + S, kv_lora_rank + qk_rope_head_dim) = ``[c_kv | k_pe]`` per token.
        """
        b, s, _ = c_kv.shape
        if b != self.batch_size:
            raise KimiVLInputError(f"the KV cache was allocated for batch size {self.batch_size}, got {b} rows")
        self.check_room(s)
        end = self.length + s
        layer = self.data[layer_idx]
        layer[:, self.length:end, :self.kv_lora_rank] = c_kv
        layer[:, self.length:end, self.kv_lora_rank:] = k_pe
        return layer[:, :end]

    def advance(self, n: int) -> None:
        """Commit ``n`` new tokens; called once per model forward, after every layer has written them."""
        self.check_room(n)
        self.length += n

    def reset(self) -> None:
        """Forget every token (the storage is kept and overwritten by the next prefill)."""
        self.length = 0
