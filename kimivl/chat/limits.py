"""``ServerLimits``: the bounds and media permissions of one ``kimivl serve`` server (stdlib only, so the CLI
can read the defaults without importing the server stack).

Field names are the ``kimivl serve`` flags with underscores, and the ``code`` of the 4xx error a request over the
bound gets (see :mod:`kimivl.chat.policy` and docs/serving.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServerLimits:
    """Bounds of one server; a request over one gets a 4xx naming it."""

    max_body_bytes: int = 16 * 2**20
    max_images: int = 8
    max_videos: int = 2
    max_documents: int = 2
    max_image_pixels: int = 4096 * 4096
    max_queue: int = 32
    allow_remote_images: bool = False
    allowed_local_media_path: str | None = None
    remote_timeout_s: float = 10.0
    default_max_tokens: int | None = None  # None: the model's generation_config max_new_tokens
    prompt_caches: int = 4  # conversations whose latents the worker keeps for their next turn (0: none)
    prompt_cache_gib: float = 4.0  # the kept latents' bound in GiB (least recently used emptied first)

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_images", "max_videos", "max_documents", "max_image_pixels", "max_queue"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.prompt_cache_gib, (int, float)) or not self.prompt_cache_gib > 0:
            raise ValueError(f"prompt_cache_gib must be > 0, got {self.prompt_cache_gib!r}")
        if not isinstance(self.prompt_caches, int) or self.prompt_caches < 0:
            raise ValueError(f"prompt_caches must be an integer >= 0, got {self.prompt_caches!r}")
        if self.default_max_tokens is not None and self.default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be a positive integer, got {self.default_max_tokens!r}")
        if self.remote_timeout_s <= 0:
            raise ValueError(f"remote_timeout_s must be > 0, got {self.remote_timeout_s!r}")
        if self.allowed_local_media_path is not None and not Path(self.allowed_local_media_path).is_dir():
            raise ValueError(f"allowed_local_media_path {self.allowed_local_media_path!r} is not a directory")
