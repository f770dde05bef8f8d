"""Adapter checkpoints: round trips, refusals, corruption, kill and resume."""

import functools
import os
import signal
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _resume_worker import MLP, pretrained
from conftest import perturbed

import genlora_jax as gl

WORKER = Path(__file__).with_name("_resume_worker.py")
CFG = gl.GenLoRAConfig(rank=4, groups=4)


@pytest.fixture(scope="module")
def base():
    return pretrained()


@jax.jit
def forward(params, x):
    return gl.apply(MLP(), params, x)


def wrapped(base, targets=("up", "mid"), config=CFG, rng=0, extra=("head",), **kw):
    return gl.wrap(
        base, list(targets), config, rng=jax.random.key(rng), extra_trainable=list(extra), **kw
    )


@functools.partial(jax.jit, static_argnums=1)
def trained_state(params, tx):
    """The adapter half and the optimizer state after one AdamW step."""
    adapters = gl.split(params)[1]
    state = tx.init(adapters)
    grads = jax.tree.map(jnp.ones_like, adapters)
    updates, state = tx.update(grads, state, adapters)
    return optax.apply_updates(adapters, updates), state


@pytest.mark.parametrize("async_save", [False, True])
def test_round_trip_restores_every_leaf_and_the_output(base, key, tmp_path, async_save):
    tx = gl.optimizer(optax.adamw(1e-2))
    params = wrapped(base, overrides={"mid": gl.LoRAConfig(rank=2)})
    adapters, opt_state = trained_state(perturbed(params, 0, 1.0), tx)
    saved = gl.join(gl.split(params)[0], adapters)
    rng = jax.random.fold_in(key, 3)
    with gl.AdapterCheckpointer(tmp_path, max_to_keep=2, async_save=async_save) as ckpt:
        for step in (10, 20, 30):
            ckpt.save(step, saved, opt_state=opt_state, rng=rng, data_position={"seen": step})
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [20, 30]

    fresh = wrapped(base, rng=1, overrides={"mid": gl.LoRAConfig(rank=2)})
    template = tx.init(gl.split(fresh)[1])
    with gl.AdapterCheckpointer(tmp_path) as ckpt:
        state = ckpt.restore(fresh, opt_state=template)
        earlier = ckpt.restore(fresh, step=20)
    chex.assert_trees_all_equal(state.params, saved)
    chex.assert_trees_all_equal(state.opt_state, opt_state)
    np.testing.assert_array_equal(jax.random.key_data(state.rng), jax.random.key_data(rng))
    assert (state.step, state.data_position) == (30, {"seen": 30})
    assert (earlier.step, earlier.opt_state) == (20, None)
    x = jax.random.uniform(key, (5, 16))
    np.testing.assert_array_equal(forward(state.params, x), forward(saved, x))
    assert not np.allclose(forward(fresh, x), forward(saved, x))


def test_only_adapter_state_is_written(key, tmp_path):
    base = {"proj": {"kernel": jax.random.normal(key, (512, 512)), "bias": jnp.zeros(512)}}
    params = gl.wrap(base, ["proj"], gl.LoRAConfig(rank=2))
    with gl.AdapterCheckpointer(tmp_path) as ckpt:
        ckpt.save(1, params, rng=jax.random.key_data(key))
    with gl.AdapterCheckpointer(tmp_path) as ckpt:
        state = ckpt.restore(params)
    on_disk = sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file())
    assert on_disk < 2 * 2 * 1024 * 4 + 16_384 < 512 * 512 * 4  # A, B and metadata; no W0
    assert state.rng.dtype == jnp.uint32  # a raw key comes back raw
    np.testing.assert_array_equal(state.rng, jax.random.key_data(key))


def test_stacked_adapters_of_a_scan_round_trip(tmp_path):
    kernel = np.random.default_rng(0).standard_normal((3, 16, 16)).astype(np.float32)
    base = {"layers": {"proj": {"kernel": kernel}}}  # nn.scan: 3 layers stacked
    params = perturbed(gl.wrap(base, ["proj"], gl.LoRAConfig(rank=2), stacked="layers"), 1, 1.0)
    with gl.AdapterCheckpointer(tmp_path) as ckpt:
        ckpt.save(1, params)
    fresh = gl.wrap(base, ["proj"], gl.LoRAConfig(rank=2), stacked="layers")
    with gl.AdapterCheckpointer(tmp_path) as ckpt:
        chex.assert_trees_all_equal(ckpt.restore(fresh).params, params)
        other = {"layers": {"proj": {"kernel": kernel[:, ::-1]}}}
        with pytest.raises(ValueError, match="layers/proj: the base kernel's values differ"):
            ckpt.restore(gl.wrap(other, ["proj"], gl.LoRAConfig(rank=2), stacked="layers"))


@pytest.fixture
def saved_dir(base, key, tmp_path):
    tx = gl.optimizer(optax.adamw(1e-2))
    adapters, opt_state = trained_state(perturbed(wrapped(base), 0, 1.0), tx)
    with gl.AdapterCheckpointer(tmp_path / "run") as ckpt:
        ckpt.save(5, gl.join(gl.split(wrapped(base))[0], adapters), opt_state=opt_state)
    return tmp_path / "run"


def other_base(base):
    return jax.tree.map(lambda x: x + 0.5, base)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda b: wrapped(b, config=gl.GenLoRAConfig(rank=2, groups=4)), "'rank' is 4 in the"),
        (lambda b: wrapped(b, config=gl.GenLoRAConfig(rank=4, groups=2)), "'groups' is 4"),
        (lambda b: wrapped(b, config=gl.LoRAConfig(rank=4)), "'class' is 'GenLoRAConfig'"),
        (lambda b: wrapped(b, targets=["up"]), r"targets differ.*\['mid'\]"),
        (lambda b: wrapped(b, extra=()), "'genlora/head/bias' is in the checkpoint but not"),
        (lambda b: wrapped(other_base(b)), "mid: the base kernel's values differ"),
        (
            lambda b: wrapped(pretrained(features=8)),
            r"up: the base kernel has shape \(16, 32\) in the checkpoint but \(8, 32\)",
        ),
        (lambda b: gl.split(wrapped(b))[0], "targets differ"),
    ],
    ids=["rank", "groups", "method", "targets", "extras", "base-values", "base-shape", "bare"],
)
def test_mismatches_are_refused_before_arrays_are_read(base, saved_dir, make, message):
    for item in ("adapters", "opt_state"):  # without arrays, only the metadata check can raise
        for path in sorted((saved_dir / "5" / item).rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
    with gl.AdapterCheckpointer(saved_dir) as ckpt, pytest.raises(ValueError, match=message):
        ckpt.restore(make(base))


def test_other_optimizer_state_is_refused(base, saved_dir):
    params = wrapped(base)
    template = gl.optimizer(optax.sgd(0.1, momentum=0.9)).init(gl.split(params)[1])
    with gl.AdapterCheckpointer(saved_dir) as ckpt:
        with pytest.raises(ValueError, match="optimizer state does not fit"):
            ckpt.restore(params, opt_state=template)
        assert ckpt.restore(params).step == 5  # without a template, the adapters alone


def test_missing_or_corrupted_checkpoints(base, saved_dir, tmp_path):
    params = wrapped(base)
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="complete steps: none"):
        gl.AdapterCheckpointer(missing).restore(params)
    assert not missing.exists()
    with (
        gl.AdapterCheckpointer(saved_dir) as ckpt,
        pytest.raises(FileNotFoundError, match=r"no checkpoint step 4 .* steps: \[5\]"),
    ):
        ckpt.restore(params, step=4)

    data = [p for p in (saved_dir / "5" / "adapters").rglob("*") if p.parent.name == "d"]
    for path in data:
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2 :] = bytes(len(raw) - len(raw) // 2)
        path.write_bytes(bytes(raw))
    with (
        gl.AdapterCheckpointer(saved_dir) as ckpt,
        pytest.raises(ValueError, match=r"could not be read.*corrupted"),
    ):
        ckpt.restore(params)
    (saved_dir / "5" / "meta" / "metadata").write_text("{not json")
    with (
        gl.AdapterCheckpointer(saved_dir) as ckpt,
        pytest.raises(ValueError, match=r"no readable metadata.*corrupted"),
    ):
        ckpt.restore(params)


def run_worker(directory, out, *flags, env):
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(directory), str(out), "--steps", "8", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def finish(proc):
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr[-3000:]
    return stdout


def test_kill_and_resume_is_bit_identical(tmp_path):
    """8 steps straight == 4 steps, SIGKILL, a save interrupted by SIGKILL, 4 more.

    The runs share a persistent compilation cache (the first compiles, the
    others load), which keeps the test fast; the claim tested is that the
    checkpoint carries everything the stream depends on.
    """
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    run = tmp_path / "run"
    finish(run_worker(tmp_path / "straight", tmp_path / "straight.npz", env=env))

    proc = run_worker(run, tmp_path / "unused.npz", "--save-at", "4", "--hang", env=env)
    assert proc.stdout.readline().strip() == "saved 4", proc.stderr.read()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    proc = run_worker(run, tmp_path / "unused.npz", "--interrupt-save-at", "6", env=env)
    proc.communicate(timeout=240)
    assert proc.returncode == -signal.SIGKILL
    partial = [p.name for p in run.iterdir() if p.name != "4"]
    assert partial and all(name.startswith("6.") for name in partial), partial  # e.g. 6.orbax-…-tmp
    with gl.AdapterCheckpointer(run) as ckpt:
        assert ckpt.all_steps() == [4]

    stdout = finish(run_worker(run, tmp_path / "resumed.npz", env=env))
    assert stdout == ""  # resumed from step 4, no save requested
    straight, resumed = np.load(tmp_path / "straight.npz"), np.load(tmp_path / "resumed.npz")
    assert sorted(straight) == sorted(resumed) and len(straight) == 10
    for name in straight:
        np.testing.assert_array_equal(resumed[name], straight[name], err_msg=name)
