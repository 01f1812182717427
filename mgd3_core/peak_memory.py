"""Peak memory of a stretch of work: RSS high-water mark (Linux) and peak CUDA memory.

``with PeakMemory(device) as m: ...`` resets both marks on entry, so afterwards
``m.rss_mib`` and ``m.device_mib`` describe only the work inside the block.
The RSS mark is the kernel's VmHWM, reset by writing ``5`` to
``/proc/self/clear_refs`` (Linux >= 4.0); elsewhere it is the process peak so far.
"""

from __future__ import annotations

import resource
from pathlib import Path

import torch


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark; False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def status_mib(key: str) -> float:
    """A memory line of ``/proc/self/status`` in MiB (``VmRSS``, ``VmHWM``); NaN without /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def window_peak_rss_mib() -> float:
    """VmHWM: peak RSS (MiB) since the last :func:`reset_peak_rss` (or process start)."""
    peak = status_mib("VmHWM")
    if peak != peak:  # no /proc: the process-lifetime peak (ru_maxrss is KiB on Linux)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return peak


class PeakMemory:
    """Peak RSS and peak CUDA memory (MiB) of the block; ``device_mib`` is None without CUDA."""

    def __init__(self, device: str | torch.device | None = None):
        self.cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
        self.rss_mib = float("nan")
        self.device_mib: float | None = None

    def __enter__(self) -> "PeakMemory":
        reset_peak_rss()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc) -> None:
        self.rss_mib = window_peak_rss_mib()
        if self.cuda:
            self.device_mib = torch.cuda.max_memory_allocated() / 2**20


def current_rss_mib() -> float:
    """Resident set size of this process now (MiB)."""
    return status_mib("VmRSS")
