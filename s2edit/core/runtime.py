"""Where and how a run computes: device and dtype choices, and process-wide settings for the CPU.

:func:`resolve_device` and :func:`resolve_dtype` turn the `device=` / `precision=` values of the scripts
into torch's (refusing what cannot work in one line).

PyTorch's CPU tensors come from the C allocator. glibc's malloc hands large freed blocks back to the
operating system (``mmap``/``munmap`` above a threshold, heap trimming below it), so every UNet pass
page-faults and zeroes its activations again: on 2 cores that is ~25 % of a full-size SD forward +
backward (BENCHMARKS.md). :func:`retain_freed_memory` keeps freed memory in the process for reuse, as
PyTorch's CUDA caching allocator does on the GPU. It is process-wide, so the scripts (`train.py`,
`infer.py`, the benchmarks) call it; an application embedding the library decides for itself.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

import torch

from editkit.errors import InputError

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
NEVER = 2**31 - 1  # the largest value mallopt accepts: blocks of up to 2 GiB stay in the process


@functools.cache
def retain_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (no mmap for big blocks, no trimming); True if applied.

    Once applied, the process's resident memory stays at its peak until it exits. Where the C library
    is not glibc (macOS, Windows, musl) this is a no-op returning False.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
    except (OSError, TypeError):
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # the mallopt parameters below are glibc's
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(libc.mallopt(M_MMAP_THRESHOLD, NEVER)) and bool(libc.mallopt(M_TRIM_THRESHOLD, NEVER))


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' → cuda when available, else cpu; anything else as torch understands it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise InputError(f"device '{device}' is not a torch device (auto, cpu, cuda, cuda:1, …)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device '{device}' was asked for, but CUDA is not available: use device=cpu")
    return resolved


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """'auto' → bf16 on GPU, fp32 on CPU; fp16 is refused (null-text optimisation fails in it, SPEC §3)."""
    choices = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if precision not in choices:
        raise InputError(
            f"precision '{precision}' must be auto, fp32 or bf16 (fp16 breaks null-text inversion)"
        )
    return choices[precision]
