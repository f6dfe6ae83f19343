"""What the ranks send back: frozen dataclasses, gathered over MPI (pickled) and
written to the result file (`wire.to_dict`, read back strictly with `wire.from_dict`).

Times are on each rank's own clock; results.py aligns them. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import median

from ..timeline import MemorySample, Span

# --- the `run` job -------------------------------------------------------------------


@dataclass(frozen=True)
class StepRecord:
    """What one rank saw in one step."""

    start_s: float
    end_s: float
    spans: tuple[Span, ...]
    memory: tuple[MemorySample, ...]  # activation bytes held, from each change on


@dataclass(frozen=True)
class StepMemory:
    """One rank's memory over one probe step (runner/memory_probe.py); None: not measured there."""

    rss_before_bytes: int | None  # resident size just before the step
    rss_increase_bytes: int | None  # VmHWM over the step minus rss_before_bytes
    mmap_threshold_bytes: int | None  # glibc's, when fixed for the job (memory_probe.ENVIRONMENT)
    profiler_peak_bytes: int | None  # torch profiler: peak of allocations minus frees (another step)
    cuda_peak_bytes: int | None  # max_memory_allocated over the step, less what was allocated before


@dataclass(frozen=True)
class RankRun:
    """One rank's measured steps (warm-up left out) and what it ran on."""

    rank: int
    host: str
    device: str
    static_bytes: int
    peak_rss_bytes: int
    records: tuple[StepRecord, ...]
    clock_offset_s: float  # subtract from this rank's times to get rank 0's clock
    step_memory: StepMemory | None = None  # the memory probe's step (None: not probed)


@dataclass(frozen=True)
class RunResult:
    ranks: tuple[RankRun, ...]  # in rank order
    mpi: str


@dataclass(frozen=True)
class RunBatchResult:
    runs: tuple[RunResult, ...]


# --- the `calibrate` job -------------------------------------------------------------


@dataclass(frozen=True)
class ComputeSample:
    """Per-layer times of one (width, micro-batch size) point on one rank."""

    rank: int
    width: int
    microbatch_size: int
    depth: int  # layers in the timed stack
    params_per_layer: int
    flops_per_sample_per_layer: float
    forward_s: tuple[float, ...]
    backward_s: tuple[float, ...]
    input_s: tuple[float, ...]  # B split: the input gradient (I)
    weight_s: tuple[float, ...]  # and the weight gradients (W)
    saved_bytes_per_sample_per_layer: float

    def times_s(self, direction: str) -> tuple[float, ...]:
        """The samples of ``forward``, ``backward``, ``input`` or ``weight``."""
        times: tuple[float, ...] = getattr(self, f"{direction}_s")
        return times


@dataclass(frozen=True)
class KindSample:
    """Times of one layer of a calibration model (runner/kindbench.py) at one micro-batch size."""

    rank: int
    job: int  # which model of the job
    layer: int  # its index in that model
    kind: str
    key: str  # LayerSpec.cost_key
    microbatch_size: int
    forward_s: tuple[float, ...]
    backward_s: tuple[float, ...]
    input_s: tuple[float, ...]
    weight_s: tuple[float, ...]

    def times_s(self, direction: str) -> tuple[float, ...]:
        times: tuple[float, ...] = getattr(self, f"{direction}_s")
        return times


@dataclass(frozen=True)
class OptimizerSample:
    params: int
    times_s: tuple[float, ...]


@dataclass(frozen=True)
class LinkSample:
    """Ping-pong between neighbours ``pair`` with messages of ``bytes``."""

    pair: tuple[int, int]
    bytes: int
    one_way_s: tuple[float, ...]
    both_ways_s: tuple[float, ...] = ()  # both send at once (largest size only), else empty


@dataclass(frozen=True)
class ProgressSample:
    """Does a message of ``bytes`` move while its sender computes? The receiver's wait for it
    (seconds, from a common start) with the sender idle in MPI_Wait (``idle_s``) and with the
    sender computing ``busy_s`` without MPI calls between its MPI_Isend and its MPI_Wait."""

    pair: tuple[int, int]
    bytes: int
    busy_s: float
    idle_s: tuple[float, ...]
    sender_busy_s: tuple[float, ...]

    @property
    def waits_for_sender(self) -> bool:
        """The message moved only once the sender was back in MPI (a rendezvous without
        asynchronous progress): the receiver waited about ``busy_s`` longer."""
        return median(self.sender_busy_s) - median(self.idle_s) > self.busy_s / 2


@dataclass(frozen=True)
class ColdSample:
    """A stack's F and B (whole stack, seconds) back to back with the other rank computing too
    (``warm_*``), and right after this rank waited while the other rank ran its own stack
    (``cold_*``): the cost of finding its weights out of cache (profile.ColdStart)."""

    rank: int
    width: int
    microbatch_size: int
    depth: int
    stack_bytes: int
    warm_forward_s: tuple[float, ...]
    warm_backward_s: tuple[float, ...]
    cold_forward_s: tuple[float, ...]
    cold_backward_s: tuple[float, ...]


@dataclass(frozen=True)
class AllreduceSample:
    """MPI_Allreduce of ``bytes`` (float32 sum, in place) over global ``ranks``."""

    ranks: tuple[int, ...]
    bytes: int
    times_s: tuple[float, ...]


@dataclass(frozen=True)
class RankSamples:
    rank: int
    host: str
    processor: str  # MPI's processor name: the same on ranks of one host
    compute: tuple[ComputeSample, ...]
    optimizer: tuple[OptimizerSample, ...]
    links: tuple[LinkSample, ...]  # the pairs this rank led (the left one)
    kinds: tuple[KindSample, ...] = ()  # layers of other kinds, by shape
    progress: tuple[ProgressSample, ...] = ()  # the pairs this rank led: rendezvous probe
    cold: tuple[ColdSample, ...] = ()  # stacks timed right after a wait (2 ranks or more)


@dataclass(frozen=True)
class MicrobenchResult:
    ranks: tuple[RankSamples, ...]  # in rank order
    mpi: str
    torch: str
    allreduce: tuple[AllreduceSample, ...] = ()  # the whole world as one group (runner/collbench.py)


# --- the `gloo` job (calibrate --transport gloo) ---------------------------------------


@dataclass(frozen=True)
class GlooResult:
    links: tuple[LinkSample, ...]  # ping-pongs over gloo between neighbours
    probe_step_s: tuple[float, ...]  # torch.distributed.pipelining 1F1B steps of the probe pipeline
    torch: str
