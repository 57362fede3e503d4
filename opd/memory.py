"""Peak memory of a stretch of work: CUDA allocator peak on GPU, resident-set high-water mark on CPU.

On CPU, torch keeps no allocator statistics; Linux does keep the process's RSS high-water mark
(VmHWM in /proc/self/status) and resets it when "5" is written to /proc/self/clear_refs. So
`reset_peak(); work(); peak_mb()` measures the peak RSS of `work` (model weights and everything
else resident included). Where /proc is missing, the process-lifetime ru_maxrss is the fallback.
"""

from __future__ import annotations

import resource
from pathlib import Path

import torch

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def reset_peak(device: torch.device | None = None) -> None:
    """Start a new peak-memory window."""
    if device is not None and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        pass


def peak_mb(device: torch.device | None = None) -> float:
    """Peak memory (MB) since the last `reset_peak`."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB -> MB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
