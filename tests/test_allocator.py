"""The ranks' allocator settings: freed memory stays in the heap (pipesim/runner/allocator.py).

Each case runs in a fresh Python process (mallopt changes the process for good) that
allocates forty 1 MiB blocks and one of 40 MiB, writes them and frees them, three times over, and counts
the page faults of the third cycle: glibc's defaults hand the memory back to the kernel
and fault it in again (about 256 per block); with the settings, the third cycle reuses
the heap's pages.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from pipesim.runner import allocator

pytestmark = pytest.mark.skipif(allocator.libc() is None, reason="glibc only (mallopt)")

_CYCLES = textwrap.dedent("""
    import ctypes, resource, sys
    from pipesim.runner import allocator
    said = allocator.keep_freed_memory() if sys.argv[1] == "keep" else "defaults"
    c = allocator.libc()
    c.malloc.restype = ctypes.c_void_p
    c.free.argtypes = [ctypes.c_void_p]
    def cycle():
        sizes = [1 << 20] * 40 + [40 << 20]
        blocks = [c.malloc(size) for size in sizes]
        for b, size in zip(blocks, sizes):
            ctypes.memset(b, 1, size)
        for b in blocks:
            c.free(b)
    cycle(); cycle()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    cycle()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, said)
""")


def _faults(mode: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    import os

    out = subprocess.run([sys.executable, "-c", _CYCLES, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **(env or {})}).stdout.split(maxsplit=1)
    return int(out[0]), out[1].strip()


def test_glibc_defaults_fault_the_freed_blocks_in_again():
    faults, _ = _faults("defaults")
    assert faults > 40 * 128  # the premise: most of the 40 x 256 pages fault again


def test_keeping_freed_memory_reuses_the_heap():
    # the 40 MiB block too: above glibc's largest mmap threshold, it comes from the heap
    faults, said = _faults("keep")
    assert faults < 40 * 8, said
    assert "no mmap per block" in said


def test_an_environment_setting_is_left_alone():
    faults, said = _faults("keep", {"MALLOC_TRIM_THRESHOLD_": "4096"})
    assert said == "glibc, as the environment sets it"
    assert faults > 40 * 128


def test_pipesim_malloc_default_keeps_glibc_defaults():
    faults, said = _faults("keep", {"PIPESIM_MALLOC": "default"})
    assert said == "glibc defaults (PIPESIM_MALLOC=default)"
    assert faults > 40 * 128
