"""Bad input to the experiments: NaN gradients with a finite loss, corrupted
checkpoints mid-run, nonsense numbers on the command lines, malformed data
files. Each gets a clear error or a safe recovery, never a silent wrong result.
The library's half is ``tests/library/test_validation.py``.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_validation
from test_training import Tiny, X

import genlora_jax as gl
from experiments import data as data_lib
from experiments.train import NonFiniteLoss, TrainConfig, train

# the library half's fixtures
base, wrapped = test_validation.base, test_validation.wrapped


# ---------------------------------------------------------------- training faults


def _loss(params, batch, rng):
    return jnp.mean((gl.apply(Tiny(), params, batch["x"], adapter_rng=rng) - 1.0) ** 2)


def _batches(step):
    return {"x": np.asarray(X)}


CFG = TrainConfig(steps=4, lr=1e-2, warmup_steps=1, log_every=1)


@jax.custom_vjp
def _poison(x, flag):
    return x


def _poison_fwd(x, flag):
    return x, flag


def _poison_bwd(flag, g):
    return jnp.where(flag > 0, jnp.nan, 1.0) * g, jnp.zeros_like(flag)


_poison.defvjp(_poison_fwd, _poison_bwd)


def test_nan_gradients_with_a_finite_loss_are_not_applied(tmp_path, wrapped):
    """At step 2 the loss is finite but every gradient of q_proj's A is NaN."""

    def loss(params, batch, rng):
        a = params["q_proj"][gl.ADAPTER_KEY].a
        return _loss(params, batch, rng) + 0.0 * _poison(a, batch["poison"]).sum()

    def batches(step):
        return {"x": np.asarray(X), "poison": np.float32(step == 2)}

    cfg = TrainConfig(steps=4, lr=1e-2, warmup_steps=1, log_every=1, checkpoint_every=1)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(NonFiniteLoss, match=r"a gradient or update is NaN or inf at step 2"):
        train(wrapped, loss, batches, cfg, checkpoint_dir=ckpt)
    checkpointer = gl.AdapterCheckpointer(ckpt)
    assert checkpointer.all_steps() == [1, 2]
    saved = checkpointer.restore(wrapped)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(gl.split(saved.params)[1]))


def test_a_corrupted_latest_checkpoint_falls_back_to_the_previous(tmp_path, wrapped):
    cfg = TrainConfig(steps=4, lr=1e-2, warmup_steps=1, log_every=1, checkpoint_every=2)
    ckpt = tmp_path / "ckpt"
    straight = train(wrapped, _loss, _batches, cfg)
    train(wrapped, _loss, _batches, TrainConfig(**{**vars(cfg), "steps": 2}), checkpoint_dir=ckpt)
    (tmp_path / "ckpt" / "4").mkdir()  # a stray step-like folder, newer than step 2
    with pytest.warns(UserWarning, match=r"skipping step 4: .* no readable metadata"):
        resumed = train(wrapped, _loss, _batches, cfg, checkpoint_dir=ckpt)
    assert resumed.step == 4
    # the unreadable step was set aside, so the resumed run could save step 4 again
    assert (tmp_path / "ckpt" / "4.corrupt").is_dir()
    assert gl.AdapterCheckpointer(ckpt).all_steps() == [2, 4]
    for a, b in zip(
        jax.tree.leaves(straight.adapters), jax.tree.leaves(resumed.adapters), strict=True
    ):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": -1e-3}, r"lr must be a finite number ≥ 0"),
        ({"lr": 0.0}, r"lr=0 trains nothing"),
        ({"lr": float("nan")}, r"lr must be a finite number"),
        ({"steps": 0}, r"steps must be an integer ≥ 1"),
        ({"steps": -3}, r"steps must be an integer ≥ 1"),
        ({"grad_accum": 0}, r"grad_accum must be an integer ≥ 1"),
        ({"warmup_steps": -1}, r"warmup_steps must be an integer ≥ 0"),
        ({"log_every": 0}, r"log_every must be an integer ≥ 1"),
    ],
)
def test_train_config_refuses_nonsense(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{"steps": 10, "lr": 1e-3, **kwargs})


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lr=-1e-3"], "argument --lr: must be a number > 0, got -0.001"),
        (["--batch-size", "0"], "argument --batch-size: must be an integer ≥ 1, got 0"),
        (["--max-len", "0"], "argument --max-len: must be an integer ≥ 1, got 0"),
        (["--steps=-5"], "argument --steps: must be an integer ≥ 0, got -5"),
        (["--epochs", "two"], "argument --epochs: 'two' is not an integer"),
    ],
)
def test_classify_cli_refuses_bad_numbers_in_one_line(argv, message, capsys):
    from experiments.classify import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(message), err
    assert sum("error:" in line for line in err) == 1  # argparse's usage, then one message
    assert not any("Traceback" in line for line in err)


def test_finetune_cli_refuses_bad_numbers(capsys):
    from experiments.finetune import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--preset", "tiny", "--steps", "0"])
    assert "argument --steps: must be an integer ≥ 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"is empty"),
        ("   \n", r"is empty"),
        ('[{"instruction": "a", "output": "b"},', r"is not valid JSON \(line 1, column"),
        ("[]", r"holds no records"),
        ('[{"instruction": null, "output": "b"}]', r"record 0 has instruction=None"),
        (
            '[{"instruction": "a", "output": "b"}, {"instruction": "a"}]',
            r"record 1 has output=missing",
        ),
        ('[{"instruction": "a", "output": "b", "input": 3}]', r"record 0 has a non-string input"),
        ("[1, 2]", r"record 0 is int, not a JSON object"),
    ],
)
def test_malformed_instruction_files_are_named(tmp_path, text, message):
    path = tmp_path / "train.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        data_lib.load_instruction_dataset(str(path))
    with pytest.raises(ValueError, match=message):
        data_lib.load_instruction_dataset(str(tmp_path), split="train")


def test_json_lines_and_null_input_are_accepted(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [{"instruction": "a", "input": None, "output": "b"}, {"instruction": "c", "output": "d"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    assert len(data_lib.load_instruction_dataset(str(path))) == 2


def test_zero_sizes_are_refused():
    with pytest.raises(ValueError, match=r"batch_size must be positive, got 0"):
        next(data_lib.iterate_batches([{"input_ids": [1], "labels": [1]}], 0, 8, 0, 0))
    with pytest.raises(ValueError, match=r"seq_len must be at least 1 token"):
        next(data_lib.iterate_batches([{"input_ids": [1], "labels": [1]}], 1, 0, 0, 0))
    with pytest.raises(ValueError, match=r"batch_size and megabatch must be ≥ 1"):
        data_lib.length_grouped_order(np.ones(4), 0, 0, 0)

    class Tok:
        pad_token_id = 0

    with pytest.raises(ValueError, match=r"max_len must be at least 1 token, got max_len=0"):
        data_lib.tokenize_classification({"text": ["a"], "label": [0]}, Tok(), max_len=0)
