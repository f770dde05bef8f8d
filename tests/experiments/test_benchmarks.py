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


# ---------------------------------------------------------------- benchmarks.isolated


def test_ratio_interval_is_the_geometric_mean_with_a_t_interval():
    from benchmarks.isolated import ratio_interval

    mean, lo, hi = ratio_interval([1.0, 1.0, 1.0])
    assert (mean, lo, hi) == (1.0, 1.0, 1.0)
    mean, lo, hi = ratio_interval([0.9, 1.1])
    assert mean == pytest.approx(math.sqrt(0.99))
    # two rounds: t(0.975, 1) = 12.71 times the standard error of the log ratios
    half = 12.71 * abs(math.log(1.1) - math.log(0.9)) / math.sqrt(2) / math.sqrt(2)
    assert math.log(hi / mean) == pytest.approx(half)
    assert lo < 0.9 < 1.1 < hi
    assert math.isnan(ratio_interval([1.2])[1])


def test_isolated_table_names_every_ratio_and_whether_its_target_is_met():
    from benchmarks.isolated import render

    def rows(*ms):
        return [{"median_s": m / 1e3, "compile_s": 2.0, "peak_rss_mib": 100.0} for m in ms]

    table = render(
        {
            "minilm/lora-r8": rows(100, 102, 98),
            "minilm/genlora-r8g16": rows(100, 101, 99),  # ratio ~1.0: met
            "minilm/genlora-r64g16": rows(120, 125, 118),  # ~1.21: not met
        },
        header="- test",
    )
    lines = {line.split("|")[1].strip(): line for line in table.splitlines() if "` / `" in line}
    assert set(lines) == {
        "`minilm/genlora-r8g16` / `minilm/lora-r8`",
        "`minilm/genlora-r64g16` / `minilm/lora-r8`",
    }
    assert "| yes" in lines["`minilm/genlora-r8g16` / `minilm/lora-r8`"]
    assert "**no**" in lines["`minilm/genlora-r64g16` / `minilm/lora-r8`"]
    assert "| `minilm/lora-r8` | jax step, LoRA r=8 | 100 (98–102) | 2.0 (2.0–2.0) | – | 100 |" in (
        table.replace("100 (100–100)", "100")
    )


def test_isolated_table_gives_peak_rss_ratios_with_and_without_a_target():
    from benchmarks.isolated import render

    def rows(rss):
        return [{"median_s": 1.0, "compile_s": 2.0, "peak_rss_mib": r} for r in rss]

    table = render(
        {
            "smollm2/genlora-r8g16": rows([1000, 1000]),
            "smollm2/genlora-r8g16-lean": rows([600, 600]),
            "smollm2/genlora-r8g16-q4-lean": rows([400, 400]),
        },
        header="- test",
    )
    rss = table.split("ratio of peak RSS")[1]
    assert "| `smollm2/genlora-r8g16-q4-lean` / `smollm2/genlora-r8g16` | 0.400 |" in rss
    assert "| ≤ 0.45 | yes |" in rss
    lean = (
        "| `smollm2/genlora-r8g16-lean` / `smollm2/genlora-r8g16` | 0.600 | 0.600–0.600 | – | – |"
    )
    assert lean in rss


def test_an_isolated_child_reports_its_measurements():
    """One real child process (MiniLM LoRA, 1 call): the protocol, not the speed."""
    from benchmarks.isolated import run_child

    row = run_child("minilm/lora-r8", warmup=0, steps=1, timeout=300)
    assert row["name"] == "minilm/lora-r8"
    assert row["median_s"] > 0 and row["compile_s"] > 0 and row["peak_rss_mib"] > 50


# ------------------------------------------------------------- benchmarks.step_memory


def test_step_memory_table_totals_each_step_against_the_float_default():
    from benchmarks.step_memory import render

    def row(base, chunk, remat, scheduler, temp):
        return dict(base=base, chunk=chunk, remat=remat, scheduler=scheduler, temp_mib=temp,
                    base_mib=600.0 if base == "float" else 200.0, other_args_mib=5.0)  # fmt: skip

    table = render(
        [
            row("float", 0, False, "default", 1995.0),
            row("q4", 128, True, "memory", 595.0),
        ],
        "python -m benchmarks.step_memory",
    )
    lines = [line for line in table.splitlines() if line.startswith("| float") or "| q4" in line]
    assert lines[0].endswith("| 2,600 | 1.000 |")
    assert "| 128-token chunks | yes | memory | 200 | 595 | 800 | 0.308 |" in lines[1]
