"""Peer implementations the benchmark suite compares kimivl against, each optional.

A peer module raises :class:`PeerUnavailable` (one human-readable line) when it cannot be used here (a
missing tool, a failed download or build); the suite reports the reason and skips that column. Peers are
never part of the test suite.
"""
from __future__ import annotations


class PeerUnavailable(RuntimeError):
    """The peer cannot be used on this machine; ``str(error)`` says why in one line."""


__all__ = ["PeerUnavailable"]
