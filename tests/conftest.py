"""Shared test plumbing: accuracy lines that the closing summary prints, pass or fail."""

from __future__ import annotations

import pytest

ACCURACY_LINES: list[str] = []


@pytest.fixture
def report_accuracy():
    """Call with a line to show it in pytest's closing summary (the CI log keeps it)."""
    return ACCURACY_LINES.append


def pytest_terminal_summary(terminalreporter):
    if ACCURACY_LINES:
        terminalreporter.section("accuracy measured on this machine")
        for line in ACCURACY_LINES:
            terminalreporter.write_line(line)
