"""Reading TOML files (model specs, validation grids) with one-line errors."""

from __future__ import annotations

import tomllib
from pathlib import Path

from .errors import read_user_text


def read_toml(path: str | Path, error: type[Exception], what: str) -> dict:
    """Parse `path`; a missing or malformed file raises `error` with a one-line message."""
    path = Path(path)
    text = read_user_text(path, error, what)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path}: not valid TOML: {exc}") from None
