"""The LLM job end to end on the real SmolLM2-135M (GGUF): `experiments.llm` and
`experiments.finetune` with a SmolLM2 preset, at tiny sizes. Minutes each: slow."""

import json

import pytest

from experiments import finetune, llm


@pytest.mark.slow
@pytest.mark.lenient
def test_llm_job_sweeps_scores_both_ways_and_writes_its_table(tmp_path, data_dir, capsys):
    out = tmp_path / "llm"
    argv = [
        "--data", str(data_dir), "--train-examples", "16", "--val-examples", "8",
        "--test-examples", "8", "--steps", "3", "--batch-size", "4", "--lr", "1e-3", "3e-3",
        "--scoring", "both", "--methods", "lora-r8", "--out", str(out),
    ]  # fmt: skip
    summary = llm.main(argv)
    rows = {r["method"]: r for r in summary["rows"]}
    assert list(rows) == ["zero-shot", "lora-r8"]
    assert rows["lora-r8"]["lr"] in (1e-3, 3e-3) and set(rows["lora-r8"]["grid"]) == {
        "0.001",
        "0.003",
    }
    for row in rows.values():
        for key in ("acc", "acc_norm", "protocol_acc"):
            assert 0.0 <= row[key] <= 1.0 and row[f"{key}_se"] > 0
    assert summary["chance"] == pytest.approx(0.25)
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [r.get("stage") for r in lines] == [None, "sweep", "sweep", "test"]
    assert all(r["command"].startswith("python -m experiments.llm --data") for r in lines)
    table = capsys.readouterr().out
    assert "| zero-shot | 0 |" in table and "| chance | 0 | | | 25.0 |" in table


@pytest.mark.slow
@pytest.mark.lenient
def test_finetune_cli_takes_the_packaged_gguf_and_scores_by_likelihood(tmp_path, data_dir):
    results = finetune.main(
        [
            "--preset", "smollm2-arc-easy-genlora-r8g16", "--steps", "2", "--eval-limit", "4",
            "--scoring", "both", "--out", str(tmp_path), "--dtype", "float32",
        ]
    )  # fmt: skip
    assert results["model"] == "smollm2" and results["trainable_params"] == 449_280
    assert set(results["likelihood"]) == {"ARC-Easy"} and "ARC-Easy" in results["accuracy"]
    rows = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {"response", "likelihood_choice"} <= set(rows[0])


def test_remat_layers_needs_lean_and_a_count_the_model_has(data_dir, capsys, monkeypatch):
    """``--remat-layers N`` alone is a usage error naming --lean; with --lean, a
    count outside the model's layers stops before any training, naming the range."""
    monkeypatch.setattr(llm, "use_memory_scheduler", lambda: True)  # XLA_FLAGS untouched
    with pytest.raises(SystemExit):
        llm.parse_args(["--remat-layers", "20"])
    assert "--remat-layers N only applies with --lean" in capsys.readouterr().err
    assert llm.parse_args(["--lean", "--remat-layers", "20"]).remat_layers == 20
    with pytest.raises(SystemExit, match=r"remat layers=31 is outside \[0, 30\]"):
        llm.main(["--data", str(data_dir), "--lean", "--remat-layers", "31", "--no-zero-shot"])
