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
            "minilm/lora-r64": rows(100, 100, 100),
            "minilm/genlora-r64g16": rows(120, 125, 118),  # ~1.21: not met
        },
        header="- test",
    )
    lines = {line.split("|")[1].strip(): line for line in table.splitlines() if "` / `" in line}
    assert set(lines) == {
        "`minilm/genlora-r8g16` / `minilm/lora-r8`",
        "`minilm/genlora-r64g16` / `minilm/lora-r64`",
        "`minilm/genlora-r64g16` / `minilm/lora-r8`",
    }
    assert "| yes" in lines["`minilm/genlora-r8g16` / `minilm/lora-r8`"]
    assert "**no**" in lines["`minilm/genlora-r64g16` / `minilm/lora-r64`"]
    # across ranks the rank's own matmuls are in the ratio: reported without a target
    assert lines["`minilm/genlora-r64g16` / `minilm/lora-r8`"].endswith("| – | – |")
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
    assert 50 < row["floor_rss_mib"] < row["built_rss_mib"]
    assert row["above_floor_mib"] == row["peak_rss_mib"] - row["floor_rss_mib"]


def test_only_torch_candidates_keep_torch_importable():
    from benchmarks.isolated import CANDIDATES, uses_torch

    torch_ones = {name for name in CANDIDATES if uses_torch(name)}
    assert torch_ones == {
        "smollm2/peft-lora-r8",
        "smollm2/decode-torch",
        "minilm/peft-lora-r8",
    }


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
    assert lines[0].endswith("| 2,600 | 1.000 | – |")
    assert "| 128-token chunks | yes | memory | 200 | 595 | 800 | 0.308 | – |" in lines[1]
    flops = render([{**row("float", 0, False, "default", 1995.0), "gflops": 1234.4}], "cmd")
    assert "| 2,600 | 1.000 | 1,234 |" in flops


def test_step_memory_remat_curve_compiles_the_lean_q4_step_per_count(monkeypatch):
    """``--remat-curve 0,12`` asks the memory-scheduler child for the lean q4
    step (the loss by vocabulary slices; with ``--fused``, fused chunks) at
    each count, and the default child for the float reference only; the
    table labels each count."""
    import benchmarks.step_memory as sm

    asked = []

    def fake(scheduler, configs=sm.CONFIGS):
        asked.append((scheduler, [tuple(c) for c in configs]))
        rows = []
        for base, chunk, remat, *rest in configs:
            temp = 200.0 if base == "float" else 100.0
            row = dict(base=base, chunk=chunk, remat=remat, scheduler=scheduler, temp_mib=temp)
            row["fused"] = rest[0] if rest else False
            row["vocab_rows"] = rest[1] if len(rest) > 1 else 0
            rows.append({**row, "base_mib": 10.0, "other_args_mib": 0.0})
        return rows

    monkeypatch.setattr(sm, "run_scheduler", fake)
    table = sm.main(["--remat-curve", "0,12"])
    chunk, rows = sm.LEAN_LOSS_CHUNK, sm.LEAN_VOCAB_ROWS
    curve = [("q4", 0, 0, False, rows), ("q4", 0, 12, False, rows)]
    assert asked == [("default", [sm.CONFIGS[0]]), ("memory", curve)]
    assert "--remat-curve 0,12" in table
    assert "| q4 | 6144-word vocabulary slices | no | memory |" in table
    sliced = "| q4 | 6144-word vocabulary slices |"
    assert f"{sliced} first 12 | memory | 10 | 100 | 110 | 0.524 |" in table
    asked.clear()
    table = sm.main(["--remat-curve", "30", "--fused"])
    assert asked[1] == ("memory", [("q4", chunk, 30, True)])
    assert "`python -m benchmarks.step_memory --remat-curve 30 --fused`" in table
    assert "| q4 | 128-token chunks, fused | first 30 | memory |" in table


# ---------------------------------------------------------------- benchmarks.paired


def test_abba_block_ratio_cancels_a_linear_drift():
    from benchmarks.paired import block_ratios

    # A is exactly 1.1 × B; every call is 0.05 s slower than the one before it
    drift = [0.05 * i for i in range(8)]
    a = [(1.1 + drift[0]), (1.1 + drift[3]), (1.1 + drift[4]), (1.1 + drift[7])]
    b = [(1.0 + drift[1]), (1.0 + drift[2]), (1.0 + drift[5]), (1.0 + drift[6])]
    ratios = block_ratios([(a[0], a[1]), (a[2], a[3])], [(b[0], b[1]), (b[2], b[3])])
    # (2.2 + d0 + d3) / (2.0 + d1 + d2): equal drift sums, so only the 0.2 s gap remains
    assert ratios == pytest.approx([(2.2 + 0.15) / (2.0 + 0.15), (2.2 + 0.55) / (2.0 + 0.55)])
    assert all(r > 1 for r in ratios)


def test_interference_check_compares_each_call_after_the_other_with_after_itself():
    from benchmarks.paired import interference

    # A is slowed by 20 % right after B; B is never slowed
    a = [(1.0, 1.2), (1.0, 1.2), (1.0, 1.2)]
    b = [(2.0, 2.0), (2.0, 2.0), (2.0, 2.0)]
    check = interference(a, b)
    assert check["num"] == pytest.approx([1.2, 1.2])  # A₂ (after B) / next A₁ (after A₂)
    assert check["den"] == pytest.approx([1.0, 1.0, 1.0])


def test_stopping_rule_waits_for_enough_blocks_and_a_narrow_interval():
    from benchmarks.paired import MIN_BLOCKS, resolved

    assert not resolved([1.0] * (MIN_BLOCKS - 1), 0.01)
    assert resolved([1.0] * MIN_BLOCKS, 0.01)
    assert not resolved([0.9, 1.1] * MIN_BLOCKS, 0.01)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("smollm2/genlora-r8g16", "is not NUM:DEN"),
        ("smollm2/genlora-r8g16:smollm2/peft-lora-r8", "not a JAX step candidate"),
        ("smollm2/genlora-r8g16-lean:smollm2/genlora-r8g16", "mixes a -lean candidate"),
        ("smollm2/genlora-r8g16-q4-lean24:smollm2/genlora-r8g16", "mixes a -lean candidate"),
        (" , ", "no pairs given"),
    ],
)
def test_paired_refuses_bad_pairs_with_the_fix(text, message):
    from benchmarks.paired import parse_pairs

    with pytest.raises(ValueError, match=message):
        parse_pairs(text)


def test_paired_takes_two_lean_steps_of_any_depth():
    from benchmarks.paired import parse_pairs

    pair = ("smollm2/genlora-r8g16-q4-lean24", "smollm2/genlora-r8g16-q4-lean")
    assert parse_pairs(":".join(pair)) == [pair]


def test_paired_table_says_whether_the_interval_clears_the_target():
    from benchmarks.paired import render

    def result(num, den, ratio, n=8):
        a = [(ratio * (1 + 0.01 * (i % 2)), ratio) for i in range(n)]
        return {"num": num, "den": den, "a": a, "b": [(1.0, 1.0)] * n}

    table = render(
        [
            result("minilm/genlora-r8g16", "minilm/lora-r8", 1.0),
            result("minilm/genlora-r64g16", "minilm/lora-r64", 1.2),
        ],
        header="- test",
    )
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if "` / `" in line}
    r8 = rows["`minilm/genlora-r8g16` / `minilm/lora-r8`"]
    # block ratios alternate 1.005 and 1: geometric mean √1.005, t-interval with 7 df
    assert "| 8 | 1000 | 1000 | 1.002 (1.000–1.005) | ≤ 1.01 | yes |" in r8
    assert "| ≤ 1.03 | **no** |" in rows["`minilm/genlora-r64g16` / `minilm/lora-r64`"]


def test_paired_main_writes_its_table_between_its_markers(tmp_path, monkeypatch):
    from benchmarks import paired

    def fake_pair(num, den, args):
        return {"num": num, "den": den, "a": [(1.0, 1.0)] * 6, "b": [(1.0, 1.0)] * 6}

    monkeypatch.setattr(paired, "run_pair", fake_pair)
    out = tmp_path / "BENCHMARKS.md"
    out.write_text(f"# B\n\n{paired.BEGIN}\nstale\n{paired.END}\n\nprose kept\n")
    table = paired.main(["--pairs", "minilm/genlora-r8g16:minilm/lora-r8", "--out", str(out)])
    text = out.read_text()
    assert "stale" not in text and text.endswith("prose kept\n") and table in text
    assert "- command: `python -m benchmarks.paired --pairs minilm/genlora-r8g16" in table
    assert "| 1.000 (1.000–1.000) | ≤ 1.01 | yes |" in table


# ------------------------------------------------------------ benchmarks.rss_stages


def test_rss_stages_table_gives_what_each_stage_adds_and_the_peaks_ratio():
    from benchmarks.rss_stages import STAGES, render

    def rows(anon_steps, file_steps, peak):
        anon, file, out = 100.0, 50.0, []
        for label, a, f in zip(STAGES, anon_steps, file_steps, strict=True):
            anon, file = anon + a, file + f
            out.append({"stage": label, "rss": anon + file, "anon": anon, "file": file})
        out[-1]["peak"] = peak
        return out

    compile_pages = [0, 0, 0, 0, 80, 0, 0]
    float_rows = rows([0, 600, 10, 200, 300, -100, 0], compile_pages, 3000.0)
    q4_rows = rows([0, 200, 10, 200, 300, -100, 0], [0] * 7, 1500.0)
    table = render(
        {"smollm2/genlora-r8g16": float_rows, "smollm2/genlora-r8g16-q4-lean": q4_rows},
        "python -m benchmarks.rss_stages",
    )
    load = next(line for line in table.splitlines() if line.startswith("| load "))
    assert load.startswith("| load | 750 | +600 +0 | 350 | +200 +0 |")
    calls = next(line for line in table.splitlines() if line.startswith("| calls "))
    # float: 1,240 resident before the calls, peak 3,000; q4-lean: 760 and 1,500
    assert calls == "| calls | peak 3,000 | +1,760 | peak 1,500 | +740 |"
    assert "genlora-r8g16-q4-lean / smollm2/genlora-r8g16: 0.500" in table
    assert "without the import floor: 0.474" in table


def test_rss_stages_refuses_what_is_not_a_smollm2_jax_training_step(capsys):
    from benchmarks.rss_stages import main

    for name in ("minilm/lora-r8", "smollm2/peft-lora-r8", "smollm2/decode-jax", "smollm2/nope"):
        with pytest.raises(SystemExit):
            main(["--candidates", name])
        assert "not a SmolLM2 JAX training step" in capsys.readouterr().err
