"""Smoke test of the benchmark suite's table on `--quick` settings (no timing claims)."""

from __future__ import annotations

import math
import re

import pytest

from benchmarks import suite

METHODS = ["LoRA r=8", "GenLoRA r=8 G=16"]


@pytest.mark.lenient
def test_quick_suite_table(tmp_path):
    skipped = suite.peer_unavailable()
    out = tmp_path / "BENCHMARKS.md"
    out.write_text(f"# Benchmarks\n\n{suite.BEGIN}\nstale\n{suite.END}\n\nprose kept\n")
    argv = ["--quick", "--no-rss", "--methods", ",".join(METHODS), "--out", str(out)]
    table = suite.main(argv + (["--no-peer"] if skipped else []))

    text = out.read_text()
    assert text.startswith("# Benchmarks\n") and text.endswith("prose kept\n")
    assert "stale" not in text and table in text
    rows = {
        cells[0]: cells[1:]
        for line in table.splitlines()
        if line.startswith("| ") and not line.startswith("| ---")
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }
    assert rows["candidate"] == [
        "trainable",
        "median ms",
        "vs LoRA r=8",
        "vs PEFT LoRA",
        "compile s",
        "peak RSS MiB",
    ]
    expected = [*METHODS, suite.BASE, suite.MERGED] + ([] if skipped else [suite.PEER])
    for name in expected:
        median_ms = float(rows[name][1])
        assert math.isfinite(median_ms) and median_ms > 0, name
    for name in METHODS:
        assert math.isfinite(float(rows[name][4])), name
    assert float(rows["LoRA r=8"][2]) == 1.0
    ratio_rows = [
        label for label, num, den, _ in suite.GOALS if num in expected and den in expected
    ]
    for label in ratio_rows:
        measured, target, met = rows[label]
        assert math.isfinite(float(measured)) and re.fullmatch(r"≤ [\d.]+", target)
        assert met in ("yes", "**no**")
    if skipped:
        pytest.skip(f"table checked without the PyTorch peer: {skipped}")


def test_unknown_method_names_the_choices(capsys):
    with pytest.raises(SystemExit):
        suite.main(["--methods", "LoRA r=9"])
    assert "choose from" in capsys.readouterr().err
