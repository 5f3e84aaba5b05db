"""Command-line plumbing shared by the entry points: one-line argument errors, value ranges.

Every entry point (``pretrain_angpt.py`` and the tools) builds its parser from
``ArgumentParser``: a flag that cannot work stops the command with one line ``error: ...`` on
stderr and exit status 2 (argparse's status for argument errors), before anything is written.
Run-time errors (a file that cannot be read, a checkpoint that does not fit) print the same
one line and exit with status 1.

The range types below are argparse ``type=`` callables: argparse names the flag, the type the
value and the range (``argument --num-layers: expected an integer >= 1, got '0'``).
"""

from __future__ import annotations

import argparse
import math
import os


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose errors are one line ``error: <message>`` (exit status 2) instead
    of the usage block and ``prog: error: ...``; ``--help`` still shows the usage."""

    def error(self, message: str):
        self.exit(2, f"error: {message}\n")


def int_in(low: int, high: int | None = None):
    """An argparse type: an integer >= `low` (and <= `high` unless None)."""
    want = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
        return value

    parse.__name__ = want
    return parse


positive_int = int_in(1)
nonnegative_int = int_in(0)
seed_int = int_in(0, 2**32 - 1)  # what numpy accepts


def float_in(low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False):
    """An argparse type: a finite number in the interval from `low` to `high` (either end may be
    None: unbounded; ``*_open``: that end excluded)."""
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    want = f"a finite number{' ' + ' and '.join(parts) if parts else ''}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        ok = math.isfinite(value)
        if ok and low is not None:
            ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value < high if high_open else value <= high
        if not ok:
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
        return value

    parse.__name__ = want
    return parse


finite_float = float_in()
positive_float = float_in(0, low_open=True)
nonnegative_float = float_in(0)


def writable_location(path: str) -> str | None:
    """Why nothing can be created at `path` (a file or directory to be made), or None: an
    existing part of its parent path that is not a directory."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is not a directory"
    return None


def output_file(text: str) -> str:
    """An argparse type: a file to write (not an existing directory; its parent can be made)."""
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a directory, expected a file name")
    problem = writable_location(text)
    if problem:
        raise argparse.ArgumentTypeError(f"{text}: {problem}")
    return text


def output_prefix(text: str) -> str:
    """An argparse type: a path prefix whose files are to be written (``{prefix}.model``, ...)."""
    problem = writable_location(text + ".x")
    if problem:
        raise argparse.ArgumentTypeError(f"{text}: {problem}")
    return text


def output_dir(text: str) -> str:
    """An argparse type: a directory to write into (existing, or one that can be made)."""
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a file, expected a directory")
    problem = writable_location(text)
    if problem:
        raise argparse.ArgumentTypeError(f"{text}: {problem}")
    return text
