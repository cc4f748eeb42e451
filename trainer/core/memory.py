"""Memory facts that automatic chunk and batch sizes rest on: what counts as running out of
memory, how much a device has left, and the peak a block of work used. CUDA and CPU alike: on a
CPU the limit is the smaller of the memory the kernel says is available and what an address-space
limit (`ulimit -v`, RLIMIT_AS) leaves this process."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource
from pathlib import Path

import torch

# The CPU allocator's, the C++ runtime's, and oneDNN's: its kernels (e.g. GELU) report a failed
# scratch allocation only as a primitive they could not create.
_CPU_OOM_MESSAGES = ("can't allocate memory", "cannot allocate memory", "out of memory", "std::bad_alloc",
                     "could not create a primitive")


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA's torch.OutOfMemoryError, the CPU allocator's "can't allocate memory", Python's
    MemoryError."""
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(err, RuntimeError) and any(m in str(err).lower() for m in _CPU_OOM_MESSAGES)


def release(device: torch.device) -> None:
    """Give back what a failed step left behind: Python's cycles, CUDA's cached blocks, and on a
    CPU the free pages of glibc's heap (malloc_trim)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim  # glibc only
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _glibc()


def release_freed_memory() -> None:
    """Hand the free pages of the process's heaps back to the OS: glibc's (malloc_trim) and Arrow's
    memory pool (mimalloc by default), which keep what was freed for reuse, counted in RSS for the
    rest of the run. Reading 1M pairs through Arrow or tokenising 1M texts frees hundreds of MB of
    small objects; without this, 100-400 MB of them stayed resident."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    import sys

    if "pyarrow" in sys.modules:  # Arrow's pool, if Arrow was ever used
        sys.modules["pyarrow"].default_memory_pool().release_unused()


def _proc_status(field: str) -> int | None:
    """A `kB` field of /proc/self/status in bytes (None off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


HEADROOM = 0.85
"""Share of the free memory that a probed size or kept graphs may plan to use: the rest absorbs
what a plan does not see (fragmentation, the allocator's rounding, another process)."""


def bytes_in_use(device: torch.device) -> int:
    """What this process holds on `device` now: CUDA's allocator count (host-side, no sync), or on
    a CPU its resident memory."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _proc_status("VmRSS") or 0


def available_bytes(device: torch.device) -> int:
    """Memory this process can still take on `device`: on CUDA the device's free memory plus what
    torch's caching allocator holds unused; on a CPU the smaller of MemAvailable and the
    address-space limit minus the process's current size."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    limits = [m for m in (_mem_available(),) if m is not None]
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    size = _proc_status("VmSize")
    if soft != resource.RLIM_INFINITY and size is not None:
        limits.append(max(soft - size, 0))
    return min(limits) if limits else 1 << 62


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op off CUDA): before a timer or a memory reading."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Bytes in use at the peak of a block, above what was in use when it began (None if this
    platform cannot tell): CUDA's allocator statistics, or on Linux the process's peak RSS, which
    /proc/self/clear_refs resets."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.bytes: int | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._start = _proc_status("VmRSS") if _reset_peak_rss() else None
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        elif self._start is not None:
            peak = _proc_status("VmHWM")
            self.bytes = None if peak is None else max(peak - self._start, 0)


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
