"""errors.one_line, the one helper that quotes an exception in a one-line message, and bounds.whole, the one
whole-number check of values read from files."""

from __future__ import annotations

import math

import pytest

from ipasdctl.bounds import whole
from ipasdctl.errors import UserError, one_line

TRACEBACK = ("Traceback (most recent call last):\n  File \"worker.py\", line 3, in fetch\n\n"
             "ipasdctl.errors.UserError: cannot decode image a.png\n\n")


@pytest.mark.parametrize("kwargs, expected", [
    ({}, "Traceback (most recent call last): File \"worker.py\", line 3, in fetch ipasdctl.errors.UserError: "
         "cannot decode image a.png"),
    ({"line": 0}, "Traceback (most recent call last):"),
    ({"line": -1}, "ipasdctl.errors.UserError: cannot decode image a.png"),  # blank lines after it not counted
    ({"line": 0, "limit": 9}, "Traceback"),
    ({"line": 0, "limit": 9, "named": True}, "RuntimeError: Traceback"),  # the limit cuts the text, not the name
])
def test_one_line_joins_or_picks_a_line_and_cuts_the_text(kwargs, expected):
    assert one_line(RuntimeError(TRACEBACK), **kwargs) == expected


def test_one_line_of_an_exception_without_text_is_its_class_name():
    assert one_line(OSError()) == "OSError"
    assert one_line(ValueError("  \n "), line=0, named=True) == "ValueError"
    assert one_line(KeyError("step"), named=True) == "KeyError: 'step'"


def test_a_worker_error_keeps_its_own_last_line(tmp_path):
    from ipasdctl.data.file_loader import _worker_error

    error = _worker_error(UserError(TRACEBACK))
    assert str(error) == "cannot decode image a.png"


@pytest.mark.parametrize("value, low, high, expected", [
    (3, 1, 3, True), (1, 1, 3, True), (0, 1, 3, False), (4, 1, 3, False),
    (True, 0, 3, False),  # a bool is an int to Python, never a count in a file
    (2.0, 1, 3, False), ("2", 1, 3, False), (None, 1, 3, False), (10**30, 0, math.inf, True),
])
def test_whole_is_an_int_within_both_bounds(value, low, high, expected):
    assert whole(value, low, high) is expected
