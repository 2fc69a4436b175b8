"""How many cores this process may run on (its CPU affinity where the OS tells it, else the count)."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """Cores this process may use: a container or `taskset` can allow fewer than the machine has."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1
