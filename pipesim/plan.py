"""A pipeline plan: the model, its partition into P·V pieces and the schedule, resolved once.

Both `pipesim predict` (the simulator) and `pipesim run` (the real runner)
build their work from the same Plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from .costs import CostModel
from .limits import check_size, check_work, work_s
from .lowering import LoweredSchedule, lower
from .model import ModelSpec
from .partition import Partition, check_stage_count, parse_partition
from .schedule import Kind, Schedule, ScheduleError, build_schedule


@dataclass(frozen=True)
class Plan:
    model: ModelSpec
    partition: Partition  # one entry per piece
    schedule: Schedule
    batch_size: int  # the global mini-batch: each of the D replicas trains on batch_size / D samples
    data_parallel: int = 1  # D: pipeline replicas, world = P x D ranks (dataparallel.py)
    placement: str = "stage-major"  # how replicas' ranks are numbered (dataparallel.PLACEMENTS)
    recompute: tuple[int, ...] = ()  # pieces that recompute their activations (see recompute_pieces)

    @property
    def num_stages(self) -> int:
        """P: the ranks."""
        return self.schedule.num_stages

    @property
    def num_chunks(self) -> int:
        return self.schedule.num_chunks

    @property
    def num_microbatches(self) -> int:
        return self.schedule.num_microbatches

    @property
    def microbatch_size(self) -> int:
        return self.batch_size // (self.data_parallel * self.num_microbatches)

    @property
    def world_size(self) -> int:
        return self.num_stages * self.data_parallel

    def layout(self, ranks_per_node: int | None = None):
        """Where each replica's stages run among the P x D global ranks."""
        from .dataparallel import Layout

        return Layout(self.num_stages, self.data_parallel, self.placement, ranks_per_node)

    @cached_property
    def lowered(self) -> LoweredSchedule:
        return lower(self.schedule, allreduce=self.data_parallel > 1)

    def stage_layers(self, piece: int):
        first, last = self.partition.bounds[piece]
        return self.model.layers[first : last + 1]

    def rank_bounds(self, rank: int) -> list[tuple[int, int]]:
        """The layer ranges of the pieces `rank` holds."""
        return [self.partition.bounds[s] for s in self.schedule.pieces_of(rank)]


def layer_costs(model: ModelSpec, costs: CostModel, microbatch_size: int,
                rank: int | None = None, distinct: tuple | None = None) -> list[float]:
    """Forward + backward seconds of each layer at one micro-batch size (on `rank`); asked
    once per distinct layer (a model of 1,000 equal layers asks once). `distinct`:
    `distinct_layers(model)`, when the caller asks for several ranks."""
    layers, index = distinct or distinct_layers(model)
    seconds = [costs.compute_s([layer], Kind.F, microbatch_size, rank=rank)
               + costs.compute_s([layer], Kind.B, microbatch_size, rank=rank) for layer in layers]
    return [seconds[i] for i in index]


def distinct_layers(model: ModelSpec) -> tuple[tuple, list[int]]:
    """The model's distinct layers, and for each layer the index of its equal among them."""
    first: dict = {}
    index = [first.setdefault(layer, len(first)) for layer in model.layers]
    return tuple(first), index


def check_schedule_shape(schedule: Schedule, num_stages: int | None, num_chunks: int | None,
                         num_microbatches: int | None, where: str) -> None:
    """A schedule read from a file must agree with --stages, --chunks and --microbatches when given."""
    for flag, given, found in (("--stages", num_stages, schedule.num_stages),
                               ("--chunks", num_chunks, schedule.num_chunks),
                               ("--microbatches", num_microbatches, schedule.num_microbatches)):
        if given is not None and given != found:
            raise ScheduleError(f"{where} has {found} for {flag}, but {flag} is {given}")


def load_schedule_file(path: str, num_stages: int | None, num_chunks: int | None,
                       num_microbatches: int | None, where: str) -> tuple[Schedule, list[str]]:
    """A schedule file (pipesim text or torch CSV), validated and checked against the
    stages, chunks and micro-batches given; with the reader's notes for the user."""
    from .schedule import validate
    from .torchcsv import read_schedule_file

    schedule, notes = read_schedule_file(path)
    check_schedule_shape(schedule, num_stages, num_chunks, num_microbatches, where)
    validate(schedule)
    return schedule, notes


def recompute_pieces(text: str, num_pieces: int) -> tuple[int, ...]:
    """The pieces `--recompute` names: "none", "all", or piece indices like "0,2" (0..P*V-1)."""
    text = text.strip()
    if text == "auto":
        raise ScheduleError("--recompute auto: only optimize searches recomputation; "
                            "predict and run take none, all or piece indices like 0,2")
    if text == "none":
        return ()
    if text == "all":
        return tuple(range(num_pieces))
    try:
        pieces = sorted({int(item) for item in text.split(",")})
    except ValueError:
        raise ScheduleError(f"--recompute {text!r}: expected none, all or piece indices like 0,2") from None
    if pieces[0] < 0 or pieces[-1] >= num_pieces:
        raise ScheduleError(f"--recompute {text!r}: pieces are 0..{num_pieces - 1} (stages x chunks)")
    return tuple(pieces)


def check_split_backward(model: ModelSpec, cut: Partition, schedule: Schedule) -> None:
    """A piece whose input is token ids (an embedding first) cannot split its backward into I
    and W: torch's split backward, given ids that carry no gradient, finds no weight to keep
    anything for (models/README.md)."""
    split = {a.piece for actions in schedule.ranks for a in actions if a.kind in (Kind.I, Kind.W)}
    for piece in sorted(split):
        first = model.layers[cut.bounds[piece][0]]
        if first.input_dtype != "float32":
            raise ScheduleError(f"schedule {schedule.name} splits the backward of piece {piece} into I and W, "
                                f"but its first layer ({first.kind}) takes {first.input_dtype} input, so its "
                                "backward cannot be split; choose gpipe, 1f1b or interleaved-1f1b")


def make_plan(
    model: ModelSpec,
    num_stages: int,
    num_microbatches: int,
    batch_size: int,
    schedule: str | Schedule = "1f1b",
    partition: str = "balanced",
    costs: CostModel | None = None,
    num_chunks: int | None = None,
    data_parallel: int = 1,
    placement: str = "stage-major",
    recompute: str = "none",
) -> Plan:
    """Build the schedule (or take the one given) and resolve a partition of its P·V pieces.

    `balanced` minimises the slowest piece under `costs`, each piece costed on
    its rank (equal layer costs when no cost model is given). With `data_parallel`
    D > 1, each replica trains on batch_size / D samples in m micro-batches; `costs`
    then sees the ranks of one replica (dataparallel.replica_costs).
    """
    if data_parallel > 1 or placement != "stage-major":
        from .dataparallel import Layout, check_shape

        Layout(num_stages, data_parallel, placement)  # a known placement
        check_shape(batch_size, data_parallel, num_microbatches)
    if batch_size < 1 or num_microbatches < 1 or batch_size % num_microbatches:
        raise ScheduleError(
            f"--batch-size {batch_size} must be a positive multiple of --microbatches {num_microbatches}"
        )
    microbatch_size = batch_size // (data_parallel * num_microbatches)
    if isinstance(schedule, Schedule):
        chunks, name = schedule.num_chunks, schedule.name
    else:
        from .builders import DEFAULT_CHUNKS

        chunks, name = num_chunks or DEFAULT_CHUNKS.get(schedule, 1), schedule
    balanced = partition.strip() == "balanced"
    check_size(model.num_layers, num_stages, num_microbatches, chunks)  # before building anything
    check_stage_count(model.num_layers, num_stages * chunks)  # every piece needs a layer
    check_work(work_s(model.num_layers, num_stages * chunks, num_microbatches, balanced),
               f"planning and simulating {model.num_layers} layers in {num_stages * chunks} pieces")
    if isinstance(schedule, str):
        schedule = build_schedule(name, num_stages, num_microbatches, num_chunks)
    weights = None
    if costs is not None and balanced:
        distinct = distinct_layers(model)
        per_rank = {r: layer_costs(model, costs, microbatch_size, r, distinct) for r in range(schedule.num_stages)}
        weights = [per_rank[schedule.rank_of(s)] for s in range(schedule.num_pieces)]
    cut = parse_partition(partition, model.num_layers, schedule.num_pieces, stage_layer_costs=weights)
    check_split_backward(model, cut, schedule)
    return Plan(model, cut, schedule, batch_size, data_parallel, placement,
                recompute_pieces(recompute, schedule.num_pieces))
