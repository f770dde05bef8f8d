"""experiments.classify: batching by length, the sweep protocol, and a tiny real run."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from conftest import assert_f32_close

import genlora_jax as gl
from experiments import classify, evaluate, models, presets
from experiments import data as data_lib

# ---------------------------------------------------------------- batching


def test_length_grouped_order_is_a_seeded_permutation_with_the_remainder_last():
    lengths = np.random.default_rng(0).integers(1, 60, size=1003)
    order = data_lib.length_grouped_order(lengths, seed=3, epoch=0, batch_size=8, megabatch=5)
    assert sorted(order.tolist()) == list(range(1003))
    again = data_lib.length_grouped_order(lengths, seed=3, epoch=0, batch_size=8, megabatch=5)
    np.testing.assert_array_equal(order, again)
    other = data_lib.length_grouped_order(lengths, seed=3, epoch=1, batch_size=8, megabatch=5)
    assert not np.array_equal(order, other)
    # 1003 = 125 full batches of 8 + 3: the 3 left over (the last, sorted
    # mega-batch of 3) close the epoch, so every full batch stays whole.
    tail = lengths[order[1000:]]
    assert len(tail) == 3 and np.all(np.diff(tail) <= 0)


def test_length_grouped_batches_are_much_tighter_than_random_ones():
    lengths = np.random.default_rng(1).integers(1, 60, size=4000)
    grouped = data_lib.length_grouped_order(lengths, seed=0, epoch=0, batch_size=32)
    random = np.random.default_rng(0).permutation(4000)

    def mean_spread(order):
        batches = lengths[order[:3968]].reshape(-1, 32)
        return float((batches.max(1) - batches.min(1)).mean())

    assert mean_spread(grouped) < 0.25 * mean_spread(random)


def test_stream_with_a_custom_order_resumes_at_any_position():
    lengths = np.random.default_rng(2).integers(1, 40, size=100)

    def order(epoch):
        return data_lib.length_grouped_order(lengths, 7, epoch, batch_size=4, megabatch=3)

    whole = data_lib.stream_indices(100, 7, 0, 260, order=order)
    parts = [data_lib.stream_indices(100, 7, s, 20, order=order) for s in range(0, 260, 20)]
    np.testing.assert_array_equal(whole, np.concatenate(parts))
    np.testing.assert_array_equal(whole[:100], order(0))
    np.testing.assert_array_equal(whole[100:200], order(1))


def test_trim_padding_cuts_to_the_bucket_that_holds_the_longest_row():
    mask = np.zeros((3, 64), np.int32)
    mask[0, :5], mask[1, :17], mask[2, :9] = 1, 1, 1
    batch = {"attention_mask": mask, "input_ids": mask * 7, "labels": np.array([0, 1, 0])}
    out = data_lib.trim_padding(batch, multiple=16)
    assert out["attention_mask"].shape == out["input_ids"].shape == (3, 32)
    np.testing.assert_array_equal(out["labels"], batch["labels"])
    assert out["attention_mask"].sum() == mask.sum()
    mask[1, :] = 1
    assert data_lib.trim_padding(batch, multiple=48)["input_ids"].shape == (3, 64)
    with pytest.raises(ValueError, match="multiple must be a positive"):
        data_lib.trim_padding(batch, multiple=0)


@pytest.fixture(scope="module")
def minilm(minilm_path):
    from transformers import AutoTokenizer, FlaxAutoModelForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    model = FlaxAutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2)
    return tokenizer, model


@pytest.mark.lenient
def test_trimmed_batches_give_the_encoder_the_same_logits(minilm, data_dir):
    tokenizer, model = minilm
    dev = data_lib.load_sst2(data_dir, "dev").select(range(8))
    arrays = data_lib.tokenize_classification(dev, tokenizer, 64)
    trimmed = data_lib.trim_padding(arrays, 16)
    assert trimmed["input_ids"].shape[1] < 64

    def logits(a):
        return model(a["input_ids"], a["attention_mask"], a["token_type_ids"]).logits

    # masked keys drop out of the softmax sums: float32 rounding through 6 layers (FFN 1536)
    assert_f32_close(logits(trimmed), logits(arrays), terms=1536, layers=6)


# ---------------------------------------------------------------- protocol


def _row(lr, val, seed=0, dev=0.5, diverged=False):
    return {
        "method": "m",
        "trainable": 10,
        "lr": lr,
        "seed": seed,
        "val_accuracy": None if diverged else val,
        "dev_accuracy": None if diverged else dev,
        "diverged": diverged,
        "step_ms": 100.0 + seed,
    }


def test_select_lr_takes_the_best_validation_accuracy_ties_to_the_smaller_rate():
    rows = [_row(1e-3, 0.8), _row(3e-3, 0.9), _row(1e-2, 0.9), _row(3e-2, None, diverged=True)]
    assert classify.select_lr(rows)["lr"] == 3e-3
    with pytest.raises(ValueError, match="every learning rate diverged"):
        classify.select_lr([_row(1e-2, None, diverged=True)])


def test_summary_averages_over_seeds_and_lists_divergence():
    sweep = [_row(1e-3, 0.8, dev=0.7), _row(1e-2, None, diverged=True)]
    runs = [sweep[0], _row(1e-3, None, seed=1, dev=0.9), _row(1e-3, None, seed=2, diverged=True)]
    row = classify.summarize("m", sweep, runs)
    assert row["seeds"] == [0, 1] and row["diverged_seeds"] == [2]
    assert row["dev_mean"] == pytest.approx(0.8)
    assert row["dev_std"] == pytest.approx(np.std([0.7, 0.9], ddof=1))
    assert row["diverged_in_grid"] == ["0.01"]
    table = classify.format_table({"rows": [row], "majority_dev_accuracy": 0.5})
    assert "0.01: diverged" in table and "(+1 diverged)" in table and "80.00 ± 14.14%" in table


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lr", "1e-3", "3e-3", "--val-examples", "0"], "needs a validation slice"),
        (["--seeds", "0", "0"], "repeats a seed"),
    ],
)
def test_bad_protocols_are_refused_with_the_reason(argv, message, capsys):
    with pytest.raises(SystemExit):
        classify.parse_args(argv)
    assert message in capsys.readouterr().err


def test_every_method_has_a_default_learning_rate_per_task():
    for task in ("sst2", "boolq"):
        assert set(classify.LEARNING_RATES[task]) == set(classify.METHODS)
    assert set(classify.DEFAULT_METHODS) <= set(classify.METHODS)


@pytest.mark.lenient
def test_each_seed_draws_its_own_classification_head(minilm):
    _, model = minilm
    a = classify.init_head(dict(model.params), model, 0)["classifier"]
    b = classify.init_head(dict(model.params), model, 1)["classifier"]
    assert not np.allclose(a["kernel"], b["kernel"])
    np.testing.assert_array_equal(a["bias"], 0)
    assert float(np.std(a["kernel"])) == pytest.approx(model.config.initializer_range, rel=0.3)


@pytest.mark.lenient
def test_evaluator_serves_adapters_that_cannot_merge_through_the_interceptor(minilm, data_dir):
    tokenizer, model = minilm
    dev = data_lib.load_sst2(data_dir, "dev").select(range(40))
    arrays = data_lib.tokenize_classification(dev, tokenizer, 32)
    accuracy = evaluate.ClassificationAccuracy(model, batch_size=16)
    base = dict(model.params)
    # At init both adapters are the identity, so both must score like the base.
    aurora = gl.wrap(base, ["query", "value"], gl.AuroRAConfig(rank=4), rng=jax.random.key(0))
    lora = gl.wrap(base, ["query", "value"], gl.LoRAConfig(rank=4), rng=jax.random.key(0))
    pred = np.argmax(model(arrays["input_ids"], arrays["attention_mask"]).logits, -1)
    expected = float(np.mean(pred == arrays["labels"]))
    assert accuracy(aurora, arrays) == accuracy(lora, arrays) == expected


# ---------------------------------------------------------------- a real run


@pytest.mark.lenient
def test_tiny_sweep_records_every_run_and_keeps_the_best_validated_rate(
    tmp_path, data_dir, monkeypatch
):
    real_train = classify.train

    def train_that_diverges_at_3e_3(params, loss_fn, batches, cfg, **kw):
        if cfg.lr == 3e-3:
            raise classify.NonFiniteLoss("loss is nan at step 0")
        return real_train(params, loss_fn, batches, cfg, **kw)

    monkeypatch.setattr(classify, "train", train_that_diverges_at_3e_3)
    argv = [
        "--methods", "lora",
        "--data", str(data_dir),
        "--steps", "2",
        "--warmup", "1",
        "--batch-size", "8",
        "--train-examples", "64",
        "--val-examples", "24",
        "--dev-examples", "24",
        "--lr", "1e-3", "3e-3",
        "--seeds", "0", "1",
        "--out", str(tmp_path),
    ]  # fmt: skip
    summary = classify.main(argv)
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [(r["lr"], r["seed"], r["diverged"]) for r in rows] == [
        (1e-3, 0, False),
        (3e-3, 0, True),
        (1e-3, 1, False),
    ]
    assert all(r["command"].startswith("python -m experiments.classify --methods") for r in rows)
    saved = json.loads((tmp_path / "sst2-summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    (row,) = saved["rows"]
    assert row["lr"] == 1e-3 and row["seeds"] == [0, 1] and row["diverged_in_grid"] == ["0.003"]
    assert row["dev_accuracy"] == [rows[0]["dev_accuracy"], rows[2]["dev_accuracy"]]
    assert saved["train_examples"] == 64 and saved["dev_examples"] == 24
    config = presets.adapter_config("lora")
    expected = 6 * 3 * gl.count_params(
        gl.wrap({"q": {"kernel": np.zeros((384, 384))}}, ["q"], config)
    ).trainable + (384 * 2 + 2)
    assert row["trainable"] == expected
    assert (tmp_path / "sst2-lora-lr0.001-seed1-steps2" / "loss.png").is_file()


@pytest.mark.lenient
@pytest.mark.slow  # the loop's own resume is tested in test_train_loop and test_checkpoint
def test_an_interrupted_run_resumes_to_the_same_adapters(
    tmp_path, data_dir, minilm, monkeypatch, capsys
):
    def argv(out):
        return [
            "--methods", "lora",
            "--data", str(data_dir),
            "--steps", "3",
            "--warmup", "1",
            "--batch-size", "8",
            "--train-examples", "48",
            "--val-examples", "8",
            "--dev-examples", "8",
            "--checkpoint-every", "1",
            "--out", str(out),
        ]  # fmt: skip

    straight = classify.main(argv(tmp_path / "straight"))
    real_trim, calls = data_lib.trim_padding, []

    def ctrl_c_before_the_third_batch(batch, multiple):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_trim(batch, multiple)

    monkeypatch.setattr(data_lib, "trim_padding", ctrl_c_before_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        classify.main(argv(tmp_path / "resumed"))
    monkeypatch.undo()
    resumed = classify.main(argv(tmp_path / "resumed"))
    assert "at step 2" in capsys.readouterr().out
    assert resumed["rows"][0]["dev_accuracy"] == straight["rows"][0]["dev_accuracy"]

    _, model = minilm
    template = gl.wrap(
        classify.init_head(dict(model.params), model, 0),
        models.ATTENTION_TARGETS["bert"],
        presets.adapter_config("lora"),
        rng=jax.random.key(0),
        extra_trainable=["classifier"],
    )
    final = []
    for run in ("straight", "resumed"):
        name = f"sst2-lora-lr{straight['rows'][0]['lr']:g}-seed0-steps3"
        directory = tmp_path / run / name / "checkpoints"
        with gl.AdapterCheckpointer(directory) as ckpt:
            assert ckpt.latest_step() == 3
            final.append(gl.split(ckpt.restore(template).params)[1])
    jax.tree.map(np.testing.assert_array_equal, *final)
