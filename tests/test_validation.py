"""Bad input and faults: every one gets a clear error, none a silent wrong result.

One test per class of mistake a user makes (the probe of issue 11): adapters
ignored by a direct model call, configuration that does nothing, unmerge
without its merge, dropped or non-finite checkpoint saves, NaN gradients with a
finite loss, nonsense numbers, malformed data and adapter files.
"""

import json
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy
from conftest import REPO, perturbed
from test_training import Tiny, X

import genlora_jax as gl
from experiments import data as data_lib
from experiments.train import NonFiniteLoss, TrainConfig, train

LORA = gl.LoRAConfig(rank=2)


@pytest.fixture
def base(key):
    return Tiny().init(key, X)["params"]


@pytest.fixture
def wrapped(base, key):
    return perturbed(gl.wrap(base, ["q_proj", "v_proj"], LORA, rng=key), seed=1, scale=0.3)


# ----------------------------------------------------------------- adapters ignored


def test_direct_call_on_a_wrapped_tree_is_refused(wrapped):
    with pytest.raises(gl.AdapterNotAppliedError, match=r"q_proj holds a genlora_jax adapter"):
        Tiny().apply({"params": gl.model_params(wrapped)}, X)
    with pytest.raises(gl.AdapterNotAppliedError, match=r"genlora_jax.apply\(model"):
        jax.jit(lambda p: Tiny().apply({"params": p}, X))(gl.model_params(wrapped))
    # the three right ways still work, and the adapter changes the output
    adapted = gl.apply(Tiny(), wrapped, X)
    with gl.adapted():
        np.testing.assert_array_equal(
            Tiny().apply({"params": gl.model_params(wrapped)}, X), adapted
        )
    merged = Tiny().apply({"params": gl.merge(wrapped)}, X)
    np.testing.assert_allclose(merged, adapted, rtol=1e-5, atol=1e-6)
    base_out = Tiny().apply({"params": gl.split(wrapped)[0]}, X)
    assert float(jnp.abs(base_out - adapted).max()) > 1e-2


@pytest.mark.lenient
def test_direct_call_of_a_transformers_model_is_refused(key):
    from conftest import tiny_llama_config
    from transformers import FlaxLlamaForCausalLM

    model = FlaxLlamaForCausalLM(tiny_llama_config(), seed=0)
    params = gl.wrap(model.params, ["q_proj"], LORA, rng=key)
    ids = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(gl.AdapterNotAppliedError, match=r"layers/0/self_attn/q_proj holds"):
        model(ids, params=gl.model_params(params))
    assert gl.apply(model, params, ids).logits.shape == (1, 4, 128)


# ------------------------------------------------------------ config that does nothing


def test_an_override_that_matches_no_target_is_refused(base):
    with pytest.raises(ValueError, match=r"overrides pattern 'vproj' matches none of the 2"):
        gl.wrap(base, ["q_proj", "v_proj"], LORA, overrides={"vproj": {"rank": 4}})
    with pytest.raises(TypeError, match=r"overrides\['v_proj'\] = \{'rnk': 4\} does not fit"):
        gl.wrap(base, ["q_proj", "v_proj"], LORA, overrides={"v_proj": {"rnk": 4}})
    with pytest.raises(TypeError, match=r"overrides\['v_proj'\] is the class LoRAConfig"):
        gl.wrap(base, ["q_proj", "v_proj"], LORA, overrides={"v_proj": gl.LoRAConfig})


def test_an_optimizer_over_an_unwrapped_tree_is_refused(base, wrapped):
    with pytest.raises(ValueError, match=r"no trainable leaf .* every update would be zero"):
        gl.optimizer(optax.adam(1e-3)).init(base)
    with pytest.raises(ValueError, match=r"no trainable leaf"):
        optax.MultiSteps(gl.optimizer(optax.adam(1e-3)), 2).init(base)
    gl.optimizer(optax.adam(1e-3)).init(gl.split(wrapped)[1])


# ---------------------------------------------------------------- unmerge guards


def test_unmerge_recovers_only_what_merge_made(base, wrapped, key):
    adapters = gl.split(wrapped)[1]
    merged = gl.merge(wrapped)
    back = gl.unmerge(merged, adapters)
    for a, b in zip(jax.tree.leaves(wrapped), jax.tree.leaves(back), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)

    other = gl.split(perturbed(gl.wrap(base, ["q_proj", "v_proj"], LORA, rng=key), 2, 0.3))[1]
    with pytest.raises(ValueError, match=r"q_proj: this kernel was merged with other adapters"):
        gl.unmerge(merged, other)
    with pytest.raises(ValueError, match=r"q_proj: this kernel is not one that .*merge produced"):
        gl.unmerge(base, adapters)  # never merged
    only_q = perturbed(gl.wrap(base, ["q_proj"], LORA, rng=key), 3, 0.3)
    more = perturbed(gl.wrap(base, ["q_proj", "v_proj"], LORA, rng=key), 3, 0.3)
    with pytest.raises(ValueError, match=r"v_proj: this kernel is not one that"):
        gl.unmerge(gl.merge(only_q), gl.split(more)[1])  # v_proj was never merged
    bad = jax.tree.map(lambda x: x, merged)
    bad["q_proj"]["kernel"] = bad["q_proj"]["kernel"] + 1e-3  # changed since
    with pytest.raises(ValueError, match=r"q_proj: this kernel is not one that"):
        gl.unmerge(bad, adapters)
    with pytest.raises(ValueError, match=r"cannot check under jax.jit"):
        jax.jit(gl.unmerge)(merged, adapters)
    double = jax.tree.map(lambda x: x, adapters)  # the same arrays under another α
    double["q_proj"][gl.ADAPTER_KEY] = double["q_proj"][gl.ADAPTER_KEY].replace(
        config=gl.LoRAConfig(rank=2, alpha=8.0)
    )
    with pytest.raises(ValueError, match=r"q_proj: this kernel was merged with other adapters"):
        gl.unmerge(merged, double)
    gl.unmerge(bad, adapters, verify=False)  # the caller vouches


# ---------------------------------------------------------------- checkpoints


def test_a_save_that_would_be_dropped_is_refused(tmp_path, wrapped):
    ckpt = gl.AdapterCheckpointer(tmp_path)
    ckpt.save(5, wrapped)
    for step in (5, 3):
        with pytest.raises(ValueError, match=rf"step {step} is not after the latest saved step 5"):
            ckpt.save(step, wrapped)
    with pytest.raises(ValueError, match=r"step must be an integer ≥ 0"):
        ckpt.save(-1, wrapped)
    ckpt.save(6, wrapped)
    assert ckpt.all_steps() == [5, 6]


def test_non_finite_state_is_never_saved(tmp_path, wrapped):
    base, adapters = gl.split(wrapped)
    nan = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), adapters)
    ckpt = gl.AdapterCheckpointer(tmp_path)
    with pytest.raises(FloatingPointError, match=r"adapter leaf .* holds NaN or inf"):
        ckpt.save(1, gl.join(base, nan))
    tx = gl.optimizer(optax.adam(1e-3))
    state = jax.tree.map(lambda x: x * jnp.inf, tx.init(adapters))
    with pytest.raises(FloatingPointError, match=r"optimizer state leaf .* holds NaN or inf"):
        ckpt.save(1, wrapped, opt_state=state)
    assert ckpt.all_steps() == []


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


# ---------------------------------------------------------------- nonsense numbers


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
    ("config", "kwargs", "error", "message"),
    [
        (gl.GenLoRAConfig, {"rank": 0}, ValueError, r"rank must be an integer ≥ 1, got rank=0"),
        (gl.GenLoRAConfig, {"rank": 2.5}, TypeError, r"rank must be an integer, got rank=2.5"),
        (gl.GenLoRAConfig, {"groups": 0}, ValueError, r"groups must be an integer ≥ 1"),
        (gl.GenLoRAConfig, {"groups": 4.0}, TypeError, r"groups must be an integer"),
        (gl.GenLoRAConfig, {"alpha": -16.0}, ValueError, r"alpha must be a finite number > 0"),
        (gl.GenLoRAConfig, {"eps": -1e-5}, ValueError, r"eps must be a finite number > 0"),
        (gl.GenLoRAConfig, {"centres": 1}, ValueError, r"centres must be an integer ≥ 2"),
        (gl.LoRAConfig, {"alpha": 0.0}, ValueError, r"alpha must be a finite number > 0"),
        (gl.LoRAConfig, {"dropout": 1.0}, ValueError, r"dropout must lie in \[0, 1\)"),
        (gl.MELoRAConfig, {"mini": 0}, ValueError, r"mini must be an integer ≥ 1"),
        (gl.AuroRAConfig, {"grid_size": 0}, ValueError, r"grid_size must be an integer ≥ 1"),
        (gl.LoRANConfig, {"frequency": float("inf")}, ValueError, r"frequency must be a finite"),
    ],
)
def test_adapter_configs_refuse_nonsense(config, kwargs, error, message):
    with pytest.raises(error, match=message):
        config(**kwargs)


def test_wrap_refuses_a_config_class_and_an_integer_key(base):
    with pytest.raises(TypeError, match=r"config is the class GenLoRAConfig, not a config"):
        gl.wrap(base, ["q_proj"], gl.GenLoRAConfig)
    with pytest.raises(TypeError, match=r"rng must be a PRNG key .* jax.random.key\(seed\)"):
        gl.wrap(base, ["q_proj"], LORA, rng=0)
    params = gl.wrap(base, ["q_proj"], LORA, rng=jax.random.PRNGKey(0))  # raw keys still work
    with pytest.raises(TypeError, match=r"adapter_rng must be a PRNG key"):
        gl.apply(Tiny(), params, X, adapter_rng=3)


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


# ---------------------------------------------------------------- data files


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


# ---------------------------------------------------------------- PEFT files


def _peft_dir(tmp_path, wrapped):
    gl.peft.export_peft(wrapped, tmp_path / "peft")
    return tmp_path / "peft"


def test_incomplete_peft_files_are_named(tmp_path, wrapped):
    base = gl.split(wrapped)[0]
    folder = _peft_dir(tmp_path, wrapped)
    config = json.loads((folder / "adapter_config.json").read_text())
    weights = safetensors.numpy.load_file(folder / "adapter_model.safetensors")

    broken = tmp_path / "no_b"
    shutil.copytree(folder, broken)
    safetensors.numpy.save_file(
        {k: v for k, v in weights.items() if "q_proj.lora_B" not in k},
        broken / "adapter_model.safetensors",
    )
    with pytest.raises(
        ValueError, match=r"module 'q_proj' has \['lora_A'\] but lacks \['lora_B'\]"
    ):
        gl.peft.import_peft(base, broken)

    no_alpha = tmp_path / "no_alpha"
    shutil.copytree(folder, no_alpha)
    (no_alpha / "adapter_config.json").write_text(
        json.dumps({k: v for k, v in config.items() if k != "lora_alpha"})
    )
    with pytest.raises(ValueError, match=r"lora_alpha is None; a PEFT LoRA config needs"):
        gl.peft.import_peft(base, no_alpha)

    (no_alpha / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no adapter_config.json"):
        gl.peft.import_peft(base, no_alpha)
    (broken / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match=r"not a readable safetensors file"):
        gl.peft.import_peft(base, broken)


# ---------------------------------------------------------------- guard scope


def test_the_guard_stays_out_of_other_interceptor_contexts():
    """Run in a fresh process: wrapping inside a foreign interceptor context
    must not push under it (its exit asserts the stack order)."""
    code = (
        "import flax.linen as nn, jax.numpy as jnp, genlora_jax as gl\n"
        "base = {'q': {'kernel': jnp.ones((4, 4))}}\n"
        "with nn.intercept_methods(lambda f, a, k, c: f(*a, **k)):\n"
        "    p = gl.wrap(base, ['q'], gl.LoRAConfig(rank=1))\n"
        "p = gl.wrap(base, ['q'], gl.LoRAConfig(rank=1))\n"
        "try:\n"
        "    nn.Dense(4, name='q').apply({'params': p['q']}, jnp.ones((1, 4)))\n"
        "except gl.AdapterNotAppliedError:\n"
        "    print('guarded')\n"
        "import threading\n"  # a thread that wraps, then ends: its guard goes quietly
        "t = threading.Thread(target=lambda: gl.wrap(base, ['q'], gl.LoRAConfig(rank=1)))\n"
        "t.start(); t.join()\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "guarded", out.stderr
    assert "Exception ignored" not in out.stderr, out.stderr


def test_model_call_stays_free_without_adapters(base):
    """A module without adapters runs unchanged with the guard installed."""

    class Plain(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(x)

    p = Plain().init(jax.random.key(0), X)
    assert Plain().apply(p, X).shape == (8, 3)
