"""Argument types, result rows and tables shared by the command-line entry points.

Each converter rejects a bad number while the arguments are parsed, so a
command with ``--lr -1`` or ``--batch-size 0`` stops with argparse's usage
line and one message naming the flag, before anything loads.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from collections.abc import Callable, Iterable, Sequence
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


def add_sweep_args(
    parser: argparse.ArgumentParser,
    *,
    train_examples: int,
    train_help: str,
    val_examples: int,
    val_help: str,
    lr_help: str | None = None,
) -> None:
    """The arguments every learning-rate-sweeping job shares: the training and
    validation slices, ``--lr`` (one rate or a grid), ``--seeds``; check them
    with `parse_sweep_args`."""
    parser.add_argument("--train-examples", type=count, default=train_examples, help=train_help)
    parser.add_argument("--val-examples", type=count, default=val_examples, help=val_help)
    parser.add_argument("--lr", type=positive_float, nargs="+", default=None, help=lr_help)
    parser.add_argument("--seeds", type=count, nargs="+", default=[0])


def parse_sweep_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parses ``argv`` and stops with a usage error on repeated ``--seeds``, or
    on a ``--lr`` grid without ``--val-examples`` to choose on (the jobs of
    `experiments.classify` and `experiments.llm` never choose on the
    evaluation split)."""
    args = parser.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds repeats a seed: {args.seeds}")
    if args.lr and len(args.lr) > 1 and not args.val_examples:
        parser.error(
            "a learning-rate sweep needs a validation slice to choose on; "
            "set --val-examples > 0 (the evaluation split is never used to choose)"
        )
    return args


def command_line(module: str, argv=None) -> str:
    """The command as typed: ``python -m <module> <arguments>``, for result rows."""
    return f"python -m {module} " + shlex.join(sys.argv[1:] if argv is None else argv)


def job_folder(out: str | Path) -> Path:
    """``out``, created, with JAX's persistent compilation cache in
    ``out/.jax_cache``: runs that differ only in seed or rate compile the same
    programs, and reuse them."""
    import jax

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str((out / ".jax_cache").absolute()))
    return out


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


def markdown_table(header: Sequence[str], align: str, rows: Iterable[Sequence[str]]) -> str:
    """A Markdown table: the header, its alignment row, then ``rows``.

    Args:
        header: the column titles.
        align: one letter per column, ``l`` (``---``) or ``r`` (``---:``).
        rows: cells as text; a row may be shorter than the header, and an
            empty cell renders as ``| |``.
    """
    if len(align) != len(header) or set(align) - {"l", "r"}:
        raise ValueError(f"align={align!r}: one of 'l' or 'r' per column of {list(header)}.")

    def line(cells: Sequence[str]) -> str:
        return "|" + "".join(f" {cell} |" if cell else " |" for cell in cells)

    separator = ["---:" if a == "r" else "---" for a in align]
    return "\n".join([line(header), line(separator), *map(line, rows)])
