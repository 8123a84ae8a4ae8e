"""Peak-RSS measurement shared by the benchmarks (Linux; a fallback elsewhere)."""

from __future__ import annotations

import contextlib
import gc
import resource


def status_kib(name: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``, …)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {name}")


def reset_peak_rss(trim: bool = False) -> str:
    """Make the peak RSS start from the current RSS: write 5 to ``/proc/self/clear_refs`` (Linux
    4.0+), which resets ``VmHWM``. ``ru_maxrss`` cannot be reset and, after ``exec``, starts at the
    *parent's* peak (the kernel carries the old address space's high-water mark over), so a child of
    a parent that holds torch and the data reads several hundred MiB of "peak" before doing anything.
    With ``trim``, heap memory that is free but still mapped goes back to the system first (glibc
    ``malloc_trim``): otherwise steps that follow bigger work reuse those pages and show no growth.
    Returns the source :func:`peak_kib` should read."""
    if trim:
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "VmHWM"
    except OSError:
        return "ru_maxrss"


def peak_kib(source: str) -> int:
    return status_kib("VmHWM") if source == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
