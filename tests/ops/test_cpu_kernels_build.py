"""Building kimivl's C++ kernels (kimivl/ops/cpu_kernels.py) survives a build that was killed half way."""
from __future__ import annotations

import threading
from pathlib import Path

from kimivl.ops import cpu_kernels


def test_a_lock_left_by_a_killed_build_is_removed(cpu_ext) -> None:
    """torch's lock is a plain file: a process killed while building leaves it, and torch's next load() would
    wait for it forever (a server test hung on it). Under kimivl's flock such a file is known to be stale."""
    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory(cpu_kernels.NAME, False)) / "lock"
    lock.touch()
    cpu_kernels._build.cache_clear()
    results = []
    threads = [threading.Thread(target=lambda: results.append(cpu_kernels.kernels())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert len(results) == 2 and all(r is not None and hasattr(r, "rope_pairs") for r in results)
    assert not lock.exists()
