"""Freezing by parameter-name prefix, and the check that frozen parameters did not change.

Prefixes are the official state-dict prefixes (``vision_tower``, ``multi_modal_projector``,
``language_model``, or any deeper one such as ``language_model.model.embed_tokens``). A prefix that
matches no parameter is an error: a freezing flag is never silently ignored. ``snapshot`` +
``assert_unchanged`` verify after training that frozen parameters are bit-identical, by a digest of each
parameter's bytes rather than a copy: a frozen 16B-parameter decoder would otherwise be held twice.
"""
from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from kimivl.ops.fingerprint import fingerprint

TOWERS = ("vision_tower", "multi_modal_projector", "language_model")


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _strip_wrappers(name: str) -> str:
    """Parameter name without peft / DDP wrapper prefixes, so prefixes stay the official ones."""
    for wrapper in ("module.", "base_model.model."):
        if name.startswith(wrapper):
            name = name[len(wrapper):]
    return name


def freeze(model: nn.Module, prefixes: Iterable[str]) -> list[str]:
    """Set ``requires_grad=False`` on every parameter under each prefix. Returns the frozen names.

    Raises ``ValueError`` for a prefix that matches nothing (naming the valid top-level prefixes).
    """
    prefixes = [p.strip().rstrip(".") for p in prefixes]
    named = [(n, _strip_wrappers(n), p) for n, p in model.named_parameters()]
    frozen: list[str] = []
    for prefix in prefixes:
        hits = [(n, p) for n, clean, p in named if _matches(clean, prefix)]
        if not hits:
            tops = sorted({clean.split(".")[0] for _, clean, _ in named})
            raise ValueError(f"freeze: prefix {prefix!r} matches no parameter (top-level prefixes: {tops})")
        for n, p in hits:
            p.requires_grad_(False)
            frozen.append(n)
    return frozen


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def parameter_summary(model: nn.Module) -> dict[str, dict[str, int]]:
    """Total and trainable parameter counts per top-level prefix (after unwrapping)."""
    out: dict[str, dict[str, int]] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        top = _strip_wrappers(name).split(".")[0]
        row = out.setdefault(top, {"total": 0, "trainable": 0})
        row["total"] += p.numel()
        row["trainable"] += p.numel() if p.requires_grad else 0
    return out


def snapshot(model: nn.Module, prefixes: Iterable[str] | None = None) -> dict[str, bytes]:
    """:func:`fingerprint` of each parameter under ``prefixes`` (default: every frozen parameter)."""
    prefixes = list(prefixes) if prefixes is not None else None
    out = {}
    for name, p in model.named_parameters():
        clean = _strip_wrappers(name)
        take = (not p.requires_grad) if prefixes is None else any(_matches(clean, x) for x in prefixes)
        if take:
            out[name] = fingerprint(p)
    return out


def assert_unchanged(model: nn.Module, reference: dict[str, bytes]) -> None:
    """Raise ``AssertionError`` listing every parameter whose bytes differ from its ``reference`` :func:`snapshot`."""
    current = dict(model.named_parameters())
    changed = [n for n, ref in reference.items() if n not in current or fingerprint(current[n]) != ref]
    if changed:
        raise AssertionError(f"{len(changed)} frozen parameter(s) changed: {changed[:8]}")
