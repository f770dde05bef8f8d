"""Bad input to the library: every mistake gets a clear error, none a silent wrong result.

One test per class of mistake a user makes (the probe of issue 11): adapters
ignored by a direct model call, configuration that does nothing, unmerge
without its merge, dropped or non-finite checkpoint saves, nonsense numbers,
malformed adapter files. The experiments' half is
``tests/experiments/test_experiment_validation.py``.
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


# ---------------------------------------------------------------- nonsense numbers


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
