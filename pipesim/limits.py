"""What pipesim accepts, in one place, with the reason for each limit.

Every number read from the command line, a model, a profile or a grid is
checked where it enters against these ranges, so that nothing that is not a
finite number reaches the simulator. Sizes are checked before any work starts,
so that anything accepted finishes in about a minute within 12 GiB on the
reference machine (2-core VM); tests/test_limits.py tests each limit.
"""

from __future__ import annotations

import math

from .errors import UserError

# --- sizes ---------------------------------------------------------------------

MAX_LAYERS = 100_000
"""Layers in a model, `repeat` included: building and costing 1e5 layers takes about a second."""

MAX_WIDTH = 1 << 20
"""fc features: 2^40 parameters (4 TiB) in one layer is beyond any real layer, and keeps
every byte count and time a finite float."""

MAX_BATCH_SIZE = 1 << 24
"""Samples per mini-batch; also the most micro-batches (each holds at least one sample)."""

MAX_STAGES = 1024
"""Pipeline stages (one rank each); the schedule validator's grid grows as stages squared."""

MAX_OPTIMIZE_STAGES = MAX_STAGES
"""Stages `optimize` searches: its dynamic programmes run bottom-up over stages (no
recursion), in blocks of rows, so the work estimate (`optimize_work_s`) is what binds."""

MAX_COMPUTE_ACTIONS = 8_000_000
"""F and B actions of one step, 2 x pieces x micro-batches (zero-bubble schedules run up to
1.5 times as many, F, I and W). Measured on the reference machine (benchmarks/engine_scale.py):
building, validating and simulating a schedule takes about 1.7 us per action on the fast path
and 5 us when the event simulation runs (`_S_PER_ACTION`), and about 0.5 KiB per action
(`_BYTES_PER_ACTION`): 40 s and 4 GiB at this ceiling, the event simulation included."""

MAX_SPAN_ACTIONS = 500_000
"""F and B actions of a step whose spans are written out (--trace, --gantt): each action makes
about three spans (the action, its send, a wait) and about 4 KiB of objects and trace JSON
(`_BYTES_PER_SPAN_ACTION`): 2 GiB at this ceiling."""

MAX_MEMORY_BYTES = 12 << 30
"""Peak memory of one step's simulation: half of the reference machine's 24 GiB. The action
ceilings above are set so that `step_memory_bytes` stays under it (tests/test_limits.py)."""

MAX_WORK_S = 60.0
"""Estimated single-core seconds of one command's planning and simulation (`work_s`);
sweeps divide theirs by the processes they use."""

MAX_SIMULATIONS = 100_000
"""optimize --max-simulations (the work estimate usually binds first)."""

MAX_JOBS = 256
"""sweep --jobs: processes to start."""

MAX_RANKS_PER_NODE = MAX_STAGES

# --- values --------------------------------------------------------------------

RANK_SPEED = (1e-6, 1e6)
"""--rank-speed factors: a rank a million times slower or faster; beyond that times overflow."""

BANDWIDTH_BPS = (1.0, 1e18)
"""Link bandwidth, bytes per second (--link, profiles): 1 B/s to an exabyte per second."""

MAX_SECONDS = 1e6
"""Any time in a profile or a --link latency (seconds; also each per-parameter, per-sample
and per-FLOP coefficient): about 11 days, so that every product stays finite."""

# Seconds and bytes per unit of work, measured on the reference machine (see `work_s`).
_S_PER_ACTION = 5e-6       # build, validate and simulate one F or B action (event simulation; fast path 1.7e-6)
_BYTES_PER_ACTION = 512    # peak memory per F or B action, the event simulation's lists included
_BYTES_PER_SPAN_ACTION = 4096  # ... and with its spans made for a trace or Gantt chart
_S_PER_SPAN_ACTION = 40e-6  # make the spans of one action and write them as trace JSON
_S_PER_LAYER_COST = 10e-6  # cost one layer's F and B on one rank (balanced partitions)
_S_PER_DP_STEP = 40e-9     # one option of the balanced partition's dynamic programme (numpy)
_S_PER_TABLE_CELL = 25e-9  # optimize: one (stage, first, last) cell of a bound's programme (numpy)
_S_PER_EXPANSION = 60e-6   # optimize: one heap expansion, plus per child (layer it may end at) ...
_S_PER_CHILD = 0.7e-6
_S_PER_SIMULATION = 2e-3   # optimize: resolving costs and metrics of one simulated partition


def check_number(name: str, value, low: float, high: float, low_open: bool = False) -> float:
    """`value` as a float if it is a finite number in [low, high] ((low, high] with
    `low_open`); otherwise a UserError that names `name`."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    try:
        number = float(value) if ok else math.nan
    except OverflowError:
        number = math.inf
    if not (low < number if low_open else low <= number) or not number <= high:
        bracket = "(" if low_open else "["
        raise UserError(f"{name} must be a finite number in {bracket}{low:g}, {high:g}], got {value!r}")
    return number


def dp_steps(num_layers: int, num_stages: int) -> int:
    """Options the balanced partition's dynamic programme examines."""
    free = max(num_layers - num_stages + 1, 1)
    return free + max(num_stages - 2, 0) * free * free // 2


def work_s(num_layers: int, num_stages: int, num_microbatches: int, balanced: bool = True,
           spans: bool = False) -> float:
    """Estimated seconds to plan (cost every rank, cut, build and validate the schedule) and
    simulate one step (with `spans`: and write every span out)."""
    p, m = num_stages, num_microbatches
    seconds = 2 * p * m * (_S_PER_ACTION + (_S_PER_SPAN_ACTION if spans else 0.0))
    if balanced:
        seconds += p * num_layers * _S_PER_LAYER_COST + dp_steps(num_layers, p) * _S_PER_DP_STEP
    return seconds


def optimize_work_s(num_layers: int, num_stages: int, num_microbatches: int,
                    max_simulations: int, max_expansions: int) -> float:
    """Estimated seconds of optimize's search at its budgets: four programmes over
    (stage, first layer, stage size) cells (three bounds and the min-max seed; measured:
    2.7 s for 1,024 layers on 64 stages), every expansion bounds up to (layers - stages + 1)
    children, every simulation runs the step."""
    p, n = num_stages, num_layers
    width = max(n - p + 1, 1)
    partials = math.comb(n - 1, p - 1) * p if n >= p else 0
    expansions = min(max_expansions, partials)
    return (work_s(n, p, num_microbatches) + 4 * p * width * width * _S_PER_TABLE_CELL
            + expansions * (_S_PER_EXPANSION + width * _S_PER_CHILD)
            + max_simulations * (_S_PER_SIMULATION + 2 * p * num_microbatches * _S_PER_ACTION))


def step_memory_bytes(num_stages: int, num_microbatches: int, num_chunks: int = 1,
                      spans: bool = False) -> int:
    """Estimated peak memory of simulating one step (with `spans`: and writing them out)."""
    actions = 2 * num_stages * num_chunks * num_microbatches
    return actions * (_BYTES_PER_ACTION + (_BYTES_PER_SPAN_ACTION if spans else 0))


def check_size(num_layers: int, num_stages: int, num_microbatches: int, num_chunks: int = 1,
               spans: bool = False) -> None:
    """Stages, actions and memory within their ceilings, before any work (pieces <= layers is
    partition.check_stage_count; micro-batches <= batch size is plan.make_plan's). `spans`: the step's spans will be written out (a trace or Gantt chart)."""
    if num_stages > MAX_STAGES:
        raise UserError(f"--stages {num_stages} is beyond the limit of {MAX_STAGES} stages")
    actions = 2 * num_stages * num_chunks * num_microbatches
    ceiling, why = (MAX_SPAN_ACTIONS, " with --trace or --gantt") if spans else (MAX_COMPUTE_ACTIONS, "")
    if actions > ceiling:
        pieces = f"{num_stages} stages" + (f" x {num_chunks} chunks" if num_chunks > 1 else "")
        raise UserError(f"{pieces} x {num_microbatches} micro-batches is {actions:,} F and B "
                        f"actions, beyond the limit of {ceiling:,}{why} (2 x pieces x micro-batches)")


def check_work(seconds: float, what: str, ceiling: float = MAX_WORK_S) -> None:
    if seconds > ceiling:
        raise UserError(f"{what} would take about {seconds:.0f} s (estimated), beyond the limit of "
                        f"{ceiling:.0f} s; use fewer layers, stages or micro-batches")
