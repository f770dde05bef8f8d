"""Argument types and result rows shared by the command-line entry points.

Each converter rejects a bad number while the arguments are parsed, so a
command with ``--lr -1`` or ``--batch-size 0`` stops with argparse's usage
line and one message naming the flag, before anything loads.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path


def _number(text: str, kind: type) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not {'an integer' if kind is int else 'a number'}"
        ) from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_int(text: str) -> int:
    """An integer ≥ 1 (steps, batch size, lengths, ranks)."""
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer ≥ 1, got {value}")
    return value


def count(text: str) -> int:
    """An integer ≥ 0 (where 0 means 'off' or 'all', as the flag's help says)."""
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer ≥ 0, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (learning rates)."""
    value = _number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {value}")
    return value


def results_recorder(out: Path, command: str) -> Callable[[dict], dict]:
    """``record(row)``: adds ``command`` to the row, prints it and appends it to
    ``out/results.jsonl`` at once (an interrupted job keeps what finished)."""

    def record(row: dict) -> dict:
        row = {**row, "command": command}
        print(json.dumps(row))
        with (out / "results.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        return row

    return record
