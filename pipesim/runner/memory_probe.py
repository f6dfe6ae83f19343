"""Memory measured independently of the simulator's ledger, per rank, over one step.

Three views of one (unrecorded) step after the others:

- **RSS high-water**: Linux's ``VmHWM`` (``/proc/self/status``) after resetting
  it to the current resident size (writing ``5`` to ``/proc/self/clear_refs``)
  just before the step, minus the resident size then: how many bytes the step
  made resident on top of what was already there. It follows the live tensors
  only when freed memory goes back to the kernel: glibc keeps freed blocks in
  its heap (its mmap threshold grows to the largest block freed), and a step
  then reuses pages made resident by earlier steps (the high-water shows too
  little) or touches new ones while freed blocks sit unused (too much: every
  block the step used, not the peak of those alive at once). So the probe runs
  in its own job whose ranks start with ``MALLOC_MMAP_THRESHOLD_`` fixed
  (`ENVIRONMENT`): every block of a page or more gets its own mapping,
  unmapped when freed; the heap is trimmed (``malloc_trim(0)``) before the
  step. (At 64 KiB, micro-batches of 36 x 448 floats, 63 KiB, still came from
  the heap and the high-water read 37-42 % above the tensors alive at once.)
  Smaller blocks, page rounding and MPI's own buffers remain in the
  measurement; a receive buffer (``torch.empty``) becomes resident only when
  its message lands, not when it is posted. The timed runs keep freed memory in
  the heap instead (`allocator`: an mmap per tensor costs page faults).
- **torch's profiler** (``profile_memory=True``, optional, on a further step:
  its own buffers would show in the RSS): the peak of the running sum of the
  allocations and frees torch reports, relative to the step's start: tensors
  only, no MPI or Python buffers.
- **CUDA**: ``torch.cuda.max_memory_allocated`` over the step, less what was
  allocated before it.

Linux and glibc only for the RSS view; elsewhere it is None.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import allocator
from .records import StepMemory

MMAP_THRESHOLD_BYTES = 4096  # blocks this large or larger get their own mmap (glibc: 128 KiB, then dynamic)
ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD_BYTES)}  # for the probe job's ranks
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def status_bytes(field: str, text: str | None = None) -> int | None:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM) in bytes; None where there is none."""
    try:
        text = _STATUS.read_text() if text is None else text
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name == field:
            number, _, unit = value.strip().partition(" ")
            return int(number) * (1024 if unit.strip() == "kB" else 1)
    return None


def reset_high_water() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def trim_heap() -> bool:
    """Hand freed heap pages back to the kernel; False without glibc."""
    libc = allocator.libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def mmap_threshold_bytes() -> int | None:
    """glibc's mmap threshold when fixed for this process (`ENVIRONMENT`), else None."""
    value = os.environ.get("MALLOC_MMAP_THRESHOLD_", "")
    return int(value) if value.isdigit() else None


def running_peak_bytes(changes: list[tuple[int, int]]) -> int:
    """Peak of the running sum of (time, bytes allocated or, negative, freed) in time order."""
    held = peak = 0
    for _, change in sorted(changes):
        held += change
        peak = max(peak, held)
    return peak


def profiler_changes(prof: Any) -> list[tuple[int, int]]:
    """(time_ns, bytes) of every allocation and free torch's profiler saw (its kineto
    events named ``[memory]``; torch's FunctionEvents fold most of them into their ops)."""
    events = prof.profiler.kineto_results.events()
    return [(e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"]


def probe_step(run_step: Callable[[], object], cuda_device: Any | None = None,
               profile: bool = False) -> StepMemory:
    """Run one step under the RSS (and CUDA) probes and, when `profile`, one more under
    torch's profiler (its own buffers would show in the RSS); what they measured."""
    import torch

    gc.collect()
    trim_heap()
    cuda_before = None
    if cuda_device is not None:
        torch.cuda.synchronize(cuda_device)
        torch.cuda.reset_peak_memory_stats(cuda_device)
        cuda_before = torch.cuda.memory_allocated(cuda_device)
    reset = reset_high_water()
    rss_before = status_bytes("VmRSS")
    run_step()
    high_water = status_bytes("VmHWM") if reset else None
    cuda_peak = None
    if cuda_device is not None and cuda_before is not None:
        torch.cuda.synchronize(cuda_device)
        cuda_peak = torch.cuda.max_memory_allocated(cuda_device) - cuda_before
    torch_peak = None
    if profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                    profile_memory=True) as prof:
            run_step()
        torch_peak = running_peak_bytes(profiler_changes(prof))
    increase = None if high_water is None or rss_before is None else high_water - rss_before
    return StepMemory(rss_before_bytes=rss_before, rss_increase_bytes=increase, mmap_threshold_bytes=mmap_threshold_bytes(),
                      profiler_peak_bytes=torch_peak, cuda_peak_bytes=cuda_peak)
