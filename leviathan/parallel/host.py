"""The host process a rank runs in: its CPU threads and how its allocator gives memory back."""

from __future__ import annotations

import ctypes

import torch

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters
KEEP_FREED = 16 * 2**30  # bytes of free heap top kept before any is trimmed: in effect all


def configure_host(threads: int, device: torch.device) -> None:
    """`train.threads` (0: torch's default), and on CPU a steady allocator."""
    if threads:
        torch.set_num_threads(threads)
    if device.type == "cpu":
        keep_freed_memory()


def keep_freed_memory() -> bool:
    """On glibc, stop handing freed memory back to the OS between steps.

    By default glibc maps each block over its mmap threshold (up to 32 MiB: tiny's logits)
    and trims the heap as a step's activations are freed, so every step faults back in
    what the last one returned: on tiny, 15-47k page faults and 4-10% of a CPU step, by an
    amount that differs from process to process (benchmarks/trainer_overhead.py). The
    process keeps its peak step's memory instead, as PyTorch's caching allocator does on
    GPU. Values are untouched; only where memory comes from changes. False where the C
    library is not glibc (nothing is changed).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, KEEP_FREED))
