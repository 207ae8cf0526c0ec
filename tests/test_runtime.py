"""retain_freed_memory: freed tensor memory stays in the process (glibc), measured with mallinfo2."""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

import torch

from s2edit.core.runtime import retain_freed_memory

MIB = 2**20


class MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
            "keepcost",
        )
    ]  # fmt: skip


def heap() -> MallInfo2:
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallinfo2.restype = MallInfo2
    return libc.mallinfo2()


def test_freed_tensor_memory_stays_in_the_process() -> None:
    applied = retain_freed_memory()
    assert applied == (platform.libc_ver()[0] == "glibc")
    if not applied:  # nothing to measure without glibc (the call is a documented no-op there)
        return
    assert retain_freed_memory() is True  # idempotent
    before = heap()
    block = torch.ones(256 * MIB, dtype=torch.uint8)  # far above the default mmap threshold (≤ 32 MiB)
    during = heap()
    assert during.hblkhd == before.hblkhd  # not mmapped: taken from the heap
    assert during.uordblks >= before.uordblks + 256 * MIB
    del block
    after = heap()
    assert after.fordblks >= 256 * MIB  # freed but kept in the heap for the next pass ...
    assert after.arena >= during.arena  # ... which is not trimmed
