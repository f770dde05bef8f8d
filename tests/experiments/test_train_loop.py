"""experiments.train: resume, NaN guard, gradient accumulation, schedule."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_training import Tiny

import genlora_jax as gl
from experiments.train import NonFiniteLoss, TrainConfig, learning_rate, make_optimizer, train

X = jax.random.normal(jax.random.key(1), (64, 16))
Y = jax.random.normal(jax.random.key(2), (64, 2))


def params_for(key):
    base = Tiny().init(key, X[:1])["params"]
    cfg = gl.GenLoRAConfig(rank=4, groups=4, dropout=0.1)
    return gl.wrap(base, ["q_proj", "v_proj"], cfg, rng=key, extra_trainable=["classifier"])


def loss_fn(params, batch, rng):
    out = gl.apply(Tiny(), params, batch["x"], adapter_rng=rng)
    return jnp.mean((out - batch["y"]) ** 2)


def batches(step, size=8):
    idx = (np.arange(size) + step * size) % len(X)
    return {"x": X[idx], "y": Y[idx]}


CFG = TrainConfig(steps=6, lr=1e-2, warmup_steps=2, log_every=2)


def test_interrupted_run_resumes_to_the_same_adapters(tmp_path, key):
    params = params_for(key)
    straight = train(params, loss_fn, batches, CFG, out_dir=tmp_path / "a")

    def stop_at_3(state):
        if state.step == 3:
            raise KeyboardInterrupt

    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        train(params, loss_fn, batches, CFG, checkpoint_dir=ckpt, on_step=stop_at_3)
    assert gl.AdapterCheckpointer(ckpt).all_steps() == [3]
    resumed = train(params, loss_fn, batches, CFG, checkpoint_dir=ckpt, out_dir=tmp_path / "b")
    assert resumed.step == 6
    for a, b in zip(
        jax.tree.leaves(straight.adapters), jax.tree.leaves(resumed.adapters), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    assert (tmp_path / "b" / "loss.png").stat().st_size > 0


def test_nan_loss_is_named(key):
    def bad_loss(params, batch, rng):
        return loss_fn(params, batch, rng) * jnp.nan

    with pytest.raises(NonFiniteLoss, match=r"the loss is NaN or inf at step 0 \(loss nan\)"):
        train(params_for(key), bad_loss, batches, CFG)


def test_gradient_accumulation_averages_micro_batches(key):
    params = params_for(key)
    _, adapters = gl.split(params)
    leaves, tree = jax.tree.flatten(adapters)
    draw = lambda k: jax.tree.unflatten(
        tree,
        [
            jax.random.normal(kk, x.shape)
            for kk, x in zip(jax.random.split(k, len(leaves)), leaves, strict=True)
        ],
    )
    g1, g2 = draw(jax.random.key(5)), draw(jax.random.key(6))
    one = make_optimizer(TrainConfig(steps=10, lr=1e-2, warmup_steps=1))
    two = make_optimizer(TrainConfig(steps=10, lr=1e-2, warmup_steps=1, grad_accum=2))
    want, _ = one.update(
        jax.tree.map(lambda a, b: (a + b) / 2, g1, g2), one.init(adapters), adapters
    )
    state = two.init(adapters)
    skipped, state = two.update(g1, state, adapters)
    got, _ = two.update(g2, state, adapters)
    for leaf in jax.tree.leaves(skipped):
        np.testing.assert_array_equal(leaf, 0.0)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize(("steps", "warmup", "peak_at"), [(1000, 100, 100), (20, 100, 10)])
def test_schedule_warms_up_then_decays_to_zero(steps, warmup, peak_at):
    lr = learning_rate(TrainConfig(steps=steps, lr=2.0, warmup_steps=warmup))
    assert float(lr(0)) == 0.0
    assert float(lr(peak_at // 2)) == pytest.approx(1.0)
    assert float(lr(peak_at)) == pytest.approx(2.0)
    assert float(lr(steps)) == pytest.approx(0.0)


def test_memory_scheduler_flag_is_refused_once_jax_has_started(monkeypatch):
    """XLA reads XLA_FLAGS once: after JAX has started (it has, in this test
    process) `use_memory_scheduler` warns and leaves the flags alone; a flag
    already there counts as set. The fresh-process case is the README block's
    test (tests/docs/test_readme.py)."""
    from experiments.train import MEMORY_SCHEDULER_FLAG, use_memory_scheduler

    jnp.zeros(1).block_until_ready()
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    with pytest.warns(UserWarning, match="XLA_FLAGS is read already"):
        assert use_memory_scheduler() is False
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=1"
    monkeypatch.setenv("XLA_FLAGS", MEMORY_SCHEDULER_FLAG)
    assert use_memory_scheduler() is True


def test_a_donating_step_gives_the_same_update_and_frees_its_inputs(key):
    from experiments.train import make_step

    base, adapters = gl.split(params_for(key))
    tx = make_optimizer(CFG)
    batch, rng = batches(0), jax.random.key(3)
    plain = make_step(loss_fn, tx)(adapters, tx.init(adapters), base, batch, rng)
    # copies: the donated arrays are deleted, and `adapters` is still needed above
    fresh = jax.tree.map(jnp.copy, adapters)
    state = tx.init(fresh)
    donated = make_step(loss_fn, tx, donate=True)(fresh, state, base, batch, rng)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(donated), strict=True):
        np.testing.assert_array_equal(a, b)
    assert all(x.is_deleted() for x in jax.tree.leaves((fresh, state)))
    assert not any(x.is_deleted() for x in jax.tree.leaves(base))
