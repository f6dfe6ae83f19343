"""Checks of the command line's inputs and outputs that need no argparse: output paths
checked before any work, options that have no effect, results that must be finite.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

from .errors import UserError

FIGURE_FORMATS = (".png", ".svg", ".pdf")


def output_file(text: str, option: str, make_parents: bool = False) -> Path:
    """A file the command will write: not a folder, in a folder that exists (or, with
    `make_parents`, under a path whose existing part is a folder). Checked before any work."""
    path = Path(text)
    if path.is_dir():
        raise UserError(f"{option} {text}: is a folder; name a file")
    parent = path.parent
    while make_parents and not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise UserError(f"{option} {text}: {parent} is a file, not a folder")
    if not parent.is_dir():
        raise UserError(f"{option} {text}: folder {path.parent} does not exist")
    return path


def output_folder(text: str, option: str) -> Path:
    """A folder the command writes into, created now (before any work) if needed."""
    path = Path(text)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{option} {text}: {existing} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{option} {text}: cannot create the folder: {exc.strerror or exc}") from None
    return path


def figure_file(text: str, option: str) -> Path:
    """A figure path: .png, .svg or .pdf; no suffix means .png (and the name says so)."""
    path = Path(text)
    if not path.suffix:
        path = path.with_name(path.name + ".png")
    elif path.suffix.lower() not in FIGURE_FORMATS:
        raise UserError(f"{option} {text}: a figure is written as {', '.join(FIGURE_FORMATS)}; "
                        f"got {path.suffix!r}")
    return output_file(str(path), option)


def warn_no_effect(message: str) -> None:
    """One `pipesim: warning:` line (cli.main formats warnings so)."""
    warnings.warn(f"{message} (the option has no effect)", stacklevel=2)


def warn_unused_what_ifs(links, ranks_per_node: int | None, num_ranks: int, layout=None) -> None:
    """--link between ranks that never exchange a message (only neighbours do, and with
    data parallelism (`layout`) the neighbours of an all-reduce ring), and a
    --ranks-per-node that puts the whole pipeline on one node, change nothing."""
    used = None if layout is None else _used_pairs(layout)
    for (a, b), _ in links:
        if used is not None and (a, b) not in used:
            warn_no_effect(f"--link {a}-{b}: ranks {a} and {b} never exchange a message: they are neither "
                           "neighbours in a replica's pipeline nor in an all-reduce ring")
        elif used is None and b - a != 1:
            warn_no_effect(f"--link {a}-{b}: ranks {a} and {b} never exchange a message; only "
                           f"neighbouring ranks (like {a}-{a + 1}) do")
    if ranks_per_node is not None and ranks_per_node >= num_ranks:
        warn_no_effect(f"--ranks-per-node {ranks_per_node} puts all {num_ranks} ranks on one node, "
                       "so no link uses the profile's inter_node costs")


def _used_pairs(layout) -> set[tuple[int, int]]:
    from .collectives import ring_edges

    pairs = set()
    for d in range(layout.data_parallel):
        ranks = layout.replica_ranks(d)
        pairs |= {(ranks[s], ranks[(s + 1) % len(ranks)]) for s in range(len(ranks))}
    for s in range(layout.num_stages):
        pairs |= set(ring_edges(layout.group(s)))
    return {(min(a, b), max(a, b)) for a, b in pairs if a != b}


def finite_json(data) -> str:
    """JSON that any strict parser reads: a NaN or infinity is a bug upstream, not output."""
    return json.dumps(data, indent=2, allow_nan=False)


def check_finite_time(seconds: float, what: str) -> None:
    """Results must be finite and > 0: a profile whose costs are all zero predicts nothing."""
    if not (math.isfinite(seconds) and seconds > 0):
        raise UserError(f"{what} is {seconds!r} s: the profile's costs give no finite, positive time "
                        "(are all its compute costs zero?)")
