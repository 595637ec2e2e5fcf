"""Keep freed memory inside the process during CPU training (glibc only).

A training step on CPU allocates and frees the same large tensors every step: logits and their gradient
(batch x sequence x vocabulary), the embedding's gradient, activations. glibc serves every block above its
mmap threshold (at most 32 MiB) with a fresh `mmap` and returns it with `munmap` when freed, so each step
faults all of those pages in again: about 450,000 minor page faults per step on smollm2-135m at 8 x 128
tokens. On a virtual machine whose balloon reports freed pages to the host, each fault is dearer still, and
dearer the more memory the process holds: a mitigation that keeps a 0.5 GB copy of the weights slowed the
forward and backward passes by 10-25% although its own work was under 3% of the step.

`cached` (the default for CPU runs) tells glibc to serve large blocks from its heap and never to hand the
heap's free top back to the system (`mallopt(M_MMAP_MAX, 0)`, `mallopt(M_TRIM_THRESHOLD, 2 GiB - 1)`): the
second step reuses the first step's pages. It is process-wide and stays for the rest of the process; the
cost is that memory freed after the peak is kept by the process (the resident size stays near its peak).
Measured in `bench/overhead.py`. On other C libraries (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import sys
from typing import Literal

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_TRIM_MAX = 2**31 - 1  # mallopt takes an int

_applied: str | None = None


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def set_cpu_allocator(mode: Literal["cached", "system"]) -> bool:
    """Apply `train.cpu_allocator`. Returns True when glibc took the `cached` settings. `system` leaves
    the C library as it is (a process that already switched to `cached` keeps it: glibc's own defaults
    are dynamic and cannot be put back)."""
    global _applied
    if mode != "cached":
        return _applied == "cached"
    if _applied == "cached":
        return True
    libc = _libc()
    if libc is None:
        return False
    ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, _TRIM_MAX) == 1
    if ok:
        _applied = "cached"
    return ok


def cpu_allocator_state() -> str:
    """What summary.json records: `cached` once applied in this process, else `system`."""
    return _applied or "system"
