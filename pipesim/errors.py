"""The one base class of everything a user can get wrong, and reading the user's files.

`cli.main` prints a `UserError` as one line, ``pipesim: error: ...``, and exits
with code 2. Every module's own error class (ModelError, ProfileError, ...)
derives from it; a traceback means a bug in pipesim, nothing else.
"""

from __future__ import annotations

from pathlib import Path


class UserError(ValueError):
    """Bad input from the user: one line that names the bad value and what is allowed."""


def read_user_text(path: str | Path, error: type[Exception], what: str) -> str:
    """The UTF-8 text of a file the user named; a file that cannot be read raises `error`."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{what} file not found: {path}") from None
    except IsADirectoryError:
        raise error(f"{what} file {path} is a directory, not a file") from None
    except UnicodeDecodeError as exc:
        raise error(f"{what} file {path} is not UTF-8 text (byte {exc.start}); is it a binary file?") from None
    except OSError as exc:
        raise error(f"cannot read {what} file {path}: {exc.strerror or exc}") from None
