"""Where each cost a validation case uses comes from: a measured cell of the profile,
an interpolation between cells, or an extrapolation beyond them.

`ProfileCostModel` (costs.py) reads a layer's time from the profile's table of
measured widths x micro-batch sizes (profile.Table: piecewise linear in the
micro-batch size, extended linearly past the ends; across widths, time per
parameter interpolated in log width, the nearest width's outside), or from a
fitted affine law. Calibration times stacks of layers whose weights add up to
``metadata.settings.stack_bytes`` (the working set; costs.py does not vary with
it), and the optimizer step at measured parameter counts. For every piece of a
case this module names, per dimension, how its cost was obtained, and the
case's status is the worst table cell its pieces used (by width and micro-batch
size: measured < interpolated < extrapolated); the working set and the
optimizer step are reported beside it.
The validation report prints it per case and builds its "Held out." paragraph
from it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from .profile import Affine, Profile, Table
from .schedule import Kind

MEASURED, FITTED, INTERPOLATED, EXTRAPOLATED = "measured", "fitted", "interpolated", "extrapolated"
ORDER = (MEASURED, FITTED, INTERPOLATED, EXTRAPOLATED)  # best first
WORKING_SET_TOLERANCE = 0.10  # a working set within 10 % of a measured stack counts as that stack


def worst(statuses) -> str:
    return max(statuses, key=ORDER.index, default=MEASURED)


def on_axis(value: float, measured: tuple, tolerance: float = 0.0) -> str:
    """measured (on a measured value, within `tolerance` relative), interpolated (between two)
    or extrapolated (outside them)."""
    if any(abs(value - m) <= tolerance * m for m in measured):
        return MEASURED
    return INTERPOLATED if min(measured) < value < max(measured) else EXTRAPOLATED


@dataclass(frozen=True)
class PieceSource:
    """How the compute cost of one piece was obtained, per dimension."""

    piece: int
    width: int  # of the square fc layer its largest layer is sized like
    microbatch_size: int
    working_set_bytes: int  # the piece's weights
    width_status: str
    microbatch_status: str
    working_set_status: str

    @property
    def status(self) -> str:
        """The table cell's: by width and micro-batch size."""
        return worst((self.width_status, self.microbatch_status))

    def describe(self) -> str:
        short = {MEASURED: "m", FITTED: "f", INTERPOLATED: "i", EXTRAPOLATED: "x"}
        return (f"w{self.width}({short[self.width_status]}) b{self.microbatch_size}"
                f"({short[self.microbatch_status]}) {self.working_set_bytes / 2**20:.1f}MiB"
                f"({short[self.working_set_status]})")


@dataclass(frozen=True)
class CaseSources:
    pieces: tuple[PieceSource, ...]
    optimizer_status: str  # the optimizer step's cost at each rank's parameter count
    overhead_probe: bool  # the case is the calibration's own overhead probe pipeline

    @property
    def status(self) -> str:
        """The worst table cell any piece's compute cost came from."""
        return worst(p.status for p in self.pieces)

    @property
    def working_set_status(self) -> str:
        return worst(p.working_set_status for p in self.pieces)

    def describe(self) -> str:
        seen = list(dict.fromkeys(p.describe() for p in self.pieces))
        return "; ".join(seen) + f"; optimizer {self.optimizer_status}"


def stack_sizes(profile: Profile) -> tuple[int, ...]:
    """The weight working sets calibration timed its stacks at (empty: not recorded)."""
    settings = (profile.extra.get("metadata") or {}).get("settings") or {}
    value = settings.get("stack_bytes")
    values = value if isinstance(value, list) else [value] if value else []
    return tuple(int(v) for v in values if isinstance(v, (int, float)) and v > 0)


def _law_axes(profile: Profile, layer_kind: str, kinds: set[Kind]) -> tuple[tuple, tuple] | None:
    """Measured widths and micro-batch sizes common to the tables of the action kinds used
    (None: some law is affine, fitted rather than tabled)."""
    from .costs import ProfileCostModel

    costs = ProfileCostModel(profile)
    laws = [costs.law(layer_kind, kind) for kind in kinds]
    if any(isinstance(law, Affine) for law in laws):
        return None
    tables = [law for law in laws if isinstance(law, Table)]
    widths = tuple(sorted(set.intersection(*(set(t.widths) for t in tables))))
    sizes = tuple(sorted(set.intersection(*(set(t.microbatch_sizes) for t in tables))))
    return widths, sizes


def case_sources(plan, profile: Profile) -> CaseSources:
    """Per piece of `plan` (plan.Plan), how its compute cost was obtained from `profile`."""
    from .calibrate import (
        OVERHEAD_LAYERS_PER_STAGE,
        OVERHEAD_MB_SIZE,
        OVERHEAD_MICROBATCHES,
        OVERHEAD_WIDTH,
    )

    kinds = {a.kind for row in plan.schedule.ranks for a in row}
    mbs = plan.microbatch_size
    stacks = stack_sizes(profile)
    pieces = []
    for piece in range(plan.schedule.num_pieces):
        layers = plan.stage_layers(piece)
        biggest = max(layers, key=lambda layer: layer.params)
        width = round(((1 + 4 * biggest.params) ** 0.5 - 1) / 2)
        working_set = sum(layer.params for layer in layers) * 4
        by_shape = _by_shape_status(profile, layers, mbs)
        axes = None if by_shape else _law_axes(profile, biggest.kind, kinds)
        if by_shape is not None:
            width_status, mbs_status = by_shape
        elif axes is None:
            ranges = profile.ranges.get(biggest.kind, {})
            width_status = _fitted(width, ranges.get("width"))
            mbs_status = _fitted(mbs, ranges.get("microbatch_size"))
        else:
            width_status, mbs_status = on_axis(width, axes[0]), on_axis(mbs, axes[1])
        set_status = on_axis(working_set, stacks, WORKING_SET_TOLERANCE) if stacks else EXTRAPOLATED
        pieces.append(PieceSource(piece, width, mbs, working_set, width_status, mbs_status, set_status))
    counts = plan.partition.counts
    probe = (plan.schedule.name == "1f1b" and plan.num_microbatches == OVERHEAD_MICROBATCHES and mbs == OVERHEAD_MB_SIZE
             and all(c == OVERHEAD_LAYERS_PER_STAGE for c in counts)
             and all(layer.params == OVERHEAD_WIDTH * OVERHEAD_WIDTH + OVERHEAD_WIDTH for layer in plan.model.layers))
    return CaseSources(tuple(pieces), _optimizer_status(plan, profile), probe)


def _by_shape_status(profile: Profile, layers, mbs: int) -> tuple[str, str] | None:
    """A piece holding layer kinds timed by shape (kindcosts.py): (shape status, micro-batch
    status) over its layers: a shape is measured or extrapolated by its kind's law (or, for
    fc, beyond the width table), a micro-batch size on, between or beyond those its shape was
    timed at. None when no layer of the piece is timed by shape."""
    from .kindcosts import extrapolations, priced_by_shape

    sizes = [costs.measured(layer.cost_key) for layer in layers
             if (costs := priced_by_shape(profile, layer.kind)) is not None]
    if not sizes:
        return None
    shape = EXTRAPOLATED if extrapolations(profile, layers) else MEASURED
    return shape, worst(on_axis(mbs, s.microbatch_sizes) if s else EXTRAPOLATED for s in sizes)


def _fitted(value: float, measured_range) -> str:
    if not measured_range:
        return EXTRAPOLATED
    low, high = measured_range
    return FITTED if low <= value <= high else EXTRAPOLATED


def _optimizer_status(plan, profile: Profile) -> str:
    params = [sum(sum(layer.params for layer in plan.stage_layers(s)) for s in plan.schedule.pieces_of(r))
              for r in range(plan.num_stages)]
    if profile.optimizer_table is None:
        return FITTED
    return worst(on_axis(p, profile.optimizer_table[0], 0.02) for p in params)


def held_out_paragraph(sources: list[CaseSources], profile: Profile) -> str:
    """The report's "Held out." paragraph, from the cases' sources."""
    n = len(sources)
    counts = Counter(s.status for s in sources)
    pieces = [p for s in sources for p in s.pieces]
    off = {name: sum(getattr(p, f"{name}_status") != MEASURED for p in pieces)
           for name in ("width", "microbatch", "working_set")}
    stacks = stack_sizes(profile)
    stack_text = ", ".join(f"{b / 2**20:g} MiB" for b in stacks) if stacks else "not recorded in the profile"
    optimizer = Counter(s.optimizer_status for s in sources)
    probes = sum(s.overhead_probe for s in sources)
    cells = ", ".join(f"{counts[status]} {status}" for status in ORDER if counts[status])
    text = (f"**Held out.** Compute costs, per case the worst table cell its pieces used: {cells} "
            f"(of {n} cases; measured: a width and micro-batch size the profile's tables measured; "
            f"interpolated: between measured ones; extrapolated: beyond them). Of {len(pieces)} pieces, "
            f"{off['width']} are off the measured widths and {off['microbatch']} off the measured "
            f"micro-batch sizes; {off['working_set']} hold weights (a working set) more than "
            f"{WORKING_SET_TOLERANCE:.0%} away from the stacks calibration timed ({stack_text}), which the "
            f"costs do not depend on. Optimizer steps: "
            + ", ".join(f"{optimizer[s]} {s}" for s in ORDER if optimizer[s]) + ". ")
    text += ("The per-action overhead was fitted on a probe pipeline (width 256, 4 layers per stage, "
             "8 micro-batches of 4); " + (f"{probes} case(s) below are that probe. " if probes
                                           else "no case below is that probe. "))
    return text + "No measurement of any case was used to fit the profile."
