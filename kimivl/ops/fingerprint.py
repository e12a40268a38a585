"""A tensor's identity by content: a short digest instead of a copy (frozen-parameter checks, prompt caches)."""
from __future__ import annotations

import hashlib

import torch


def fingerprint(t: torch.Tensor) -> bytes:
    """A 16-byte BLAKE2b digest of ``t``'s dtype, shape and bytes: equal digests mean bit-identical tensors (up to
    a hash collision), and one changed bit changes it. A sharded tensor is gathered first."""
    data = t.detach()
    if hasattr(data, "full_tensor"):
        data = data.full_tensor()
    data = data.reshape(-1).cpu().contiguous()
    h = hashlib.blake2b(f"{data.dtype}{tuple(t.shape)}".encode(), digest_size=16)
    h.update(data.view(torch.uint8).numpy())
    return h.digest()

