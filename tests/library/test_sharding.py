"""Sharding rules, and a train step on 8 simulated CPU devices.

pytest's process has one CPU device (XLA fixes the count when JAX starts), so
the multi-device test runs this file as a script in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` and checks what it
reports: loss and adapter gradients against the single-device run, and how
much of the base each device holds.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

import genlora_jax as gl

MESH = AbstractMesh((8,), ("fsdp",))
MESH_2D = AbstractMesh((4, 2), ("data", "model"))


def specs(tree):
    """Path → spec, for comparing against a table written here."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, P))[0]
    return {jax.tree_util.keystr(k, simple=True, separator="/"): s for k, s in flat}


@pytest.fixture
def params(key):
    base = {
        "embed": {"embedding": jnp.ones((128, 24))},
        "layer": {
            "q": {"kernel": jnp.ones((24, 64)), "bias": jnp.ones(64)},
            "v": {"kernel": jnp.ones((24, 30))},
        },
        "odd": {"kernel": jnp.ones((30, 10))},
        "head": {"kernel": jnp.ones((24, 2))},
    }
    config = gl.GenLoRAConfig(rank=2, groups=2)
    return gl.wrap(base, ["q", "v"], config, rng=key, extra_trainable=["head"])


def test_default_is_fsdp_on_the_largest_divisible_axis_and_replicated_adapters(params):
    got = specs(gl.sharding.partition_specs(params, MESH))
    want = {
        "embed/embedding": P("fsdp", None),  # 128 is the largest axis and 8 | 128
        "layer/q/kernel": P(None, "fsdp"),
        "layer/q/bias": P(),  # 1-D
        "layer/v/kernel": P("fsdp", None),  # 30 is larger but 8 ∤ 30
        "odd/kernel": P(),  # no axis divisible by 8
    }
    adapters = {k: P() for k in got if "genlora" in k}  # adapters and the extra head
    assert len(adapters) == 2 * 4 + 1
    assert got == want | adapters

    # a 2-D mesh: FSDP over all axes (8 devices), or over the named ones
    both = specs(gl.sharding.partition_specs(params, MESH_2D))
    assert both["embed/embedding"] == P(("data", "model"), None)
    assert both["layer/v/kernel"] == P(("data", "model"), None)
    model = specs(gl.sharding.partition_specs(params, MESH_2D, fsdp="model"))
    assert model["odd/kernel"] == P("model", None)  # 2 | 30
    shardings = gl.sharding.shardings(params, MESH)
    assert shardings["layer"]["q"]["genlora"].z_b.spec == P()
    assert shardings["layer"]["q"]["kernel"].mesh == MESH


def test_rules_come_first_in_order_and_reach_adapter_fields(params):
    rules = [
        ("layer/q/kernel", P(None, "model")),  # tensor-parallel column split
        (r".*/genlora/z_b", P("model")),  # GenLoRA's output latent, (m,)
        ("kernel", P(None, "model")),  # a bare name: every other kernel
        (r"layer/.*", P()),  # never reached by a kernel: an earlier rule won
    ]
    got = specs(gl.sharding.partition_specs(params, MESH_2D, rules))
    assert got["layer/q/kernel"] == P(None, "model")
    assert got["layer/q/genlora/z_b"] == P("model")
    assert got["layer/v/genlora/z_b"] == P("model")
    assert got["layer/q/genlora/z_a"] == P()  # by the last rule
    for path in ("layer/v/kernel", "odd/kernel", "genlora/head/kernel"):
        assert got[path] == P(None, "model")
    assert got["layer/q/bias"] == P()
    assert got["embed/embedding"] == P(("data", "model"), None)  # the default


def test_rules_that_do_not_fit_are_named(params):
    with pytest.raises(ValueError, match=r"'odd/kernel'.*odd/kernel \(30, 10\): size 30 is not"):
        gl.sharding.partition_specs(params, MESH, [("odd/kernel", P("fsdp", None))])
    with pytest.raises(ValueError, match=r"the mesh has no axis 'model', only \('fsdp',\)"):
        gl.sharding.partition_specs(params, MESH, [("kernel", P("model"))])
    with pytest.raises(ValueError, match=r"layer/q/bias \(64,\): it names 2 axes"):
        gl.sharding.partition_specs(params, MESH, [("bias", P("fsdp", None))])
    with pytest.raises(ValueError, match=r"fsdp axis 'data' is not in the mesh"):
        gl.sharding.partition_specs(params, MESH, fsdp="data")


def test_optimizer_state_follows_the_adapter_shardings(key):
    base = {"q": {"kernel": jnp.ones((16, 32))}}
    config = gl.GenLoRAConfig(rank=2, groups=4, freeze_z_a=True)
    adapters = gl.split(gl.wrap(base, ["q"], config, rng=key))[1]
    shardings = gl.sharding.shardings(
        adapters, MESH, [("z_b", P("fsdp")), ("theta_b", P(None, None, "fsdp"))]
    )
    state = jax.eval_shape(gl.optimizer(optax.adam(1e-3)).init, adapters)
    got = gl.sharding.state_shardings(state, shardings)
    flat = jax.tree_util.tree_flatten_with_path(got)[0]
    by_path = {jax.tree_util.keystr(k, simple=True, separator="/"): s.spec for k, s in flat}
    moments = {k: v for k, v in by_path.items() if "/mu/" in k or "/nu/" in k}
    # z_a is frozen: no moments; z_b and θ_B sharded as their parameter, θ_A replicated
    assert sorted(k.rsplit("/", 1)[1] for k in moments) == sorted(2 * ["theta_a", "z_b", "theta_b"])
    for k, spec in moments.items():
        assert spec == (
            {"z_b": P("fsdp"), "theta_b": P(None, None, "fsdp")}.get(k.rsplit("/", 1)[1], P())
        ), k
    counts = [v for k, v in by_path.items() if k not in moments]
    assert counts and all(spec == P() for spec in counts)
    with pytest.raises(ValueError, match="param_shardings holds no NamedSharding"):
        gl.sharding.state_shardings(state, {})


def test_train_step_on_eight_devices_matches_one_device():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    tests = str(Path(__file__).resolve().parents[1])  # conftest's folder
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [tests, env.get("PYTHONPATH")]))
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    done = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["devices"] == 8
    for mesh in ("fsdp", "fsdp+tp"):
        result = report[mesh]
        assert result["loss_error"] <= 1e-5, (mesh, result)
        assert result["grad_error"] <= 1e-5, (mesh, result)
        assert result["step_2_loss_error"] <= 1e-5, (mesh, result)
        assert result["step_2_params_error"] <= 1e-4, (mesh, result)
        assert result["shardings_kept"], (mesh, result)
    # each device holds about 1/8 of the base (1-D norm weights are replicated)
    fsdp = report["fsdp"]
    assert fsdp["max_device_fraction"] <= 1 / 8 + fsdp["replicated_fraction"] + 1e-9
    assert fsdp["replicated_fraction"] < 0.02


def auto_mesh(shape, names):
    """A mesh whose axes let `jit` place intermediates (GSPMD); with
    `make_mesh`'s default Explicit axes, the embedding gather is ambiguous."""
    return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def _eight_devices() -> dict:
    """A tiny Llama's train step: one device, FSDP on 8, and FSDP×TP on 4×2."""
    import transformers as tf
    from conftest import tiny_llama_config

    model = tf.FlaxLlamaForCausalLM(tiny_llama_config(), _do_init=False)
    rng = np.random.default_rng(0)
    noise = lambda x: 0.1 * rng.standard_normal(x.shape, np.float32)
    shapes = jax.eval_shape(lambda key: model.init_weights(key, (1, 8)), jax.random.key(0))
    config = gl.GenLoRAConfig(rank=4, groups=8)
    params = gl.wrap(jax.tree.map(noise, shapes), ["q_proj", "k_proj", "v_proj", "o_proj"], config)
    base, adapters = gl.split(params)
    # adapters moved off init (ΔW ≠ 0), so every gradient is non-trivial
    adapters = jax.tree.map(lambda x: x + noise(x), adapters)
    batch = {"ids": rng.integers(1, 128, (8, 16)), "labels": rng.integers(0, 128, (8, 16))}
    tx = gl.optimizer(optax.adam(1e-2))

    def step(adapters, state, base, batch):
        def loss_fn(adapters):
            logits = gl.apply(model, gl.join(base, adapters), batch["ids"]).logits
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(adapters)
        updates, state = tx.update(grads, state, adapters)
        return optax.apply_updates(adapters, updates), state, loss, grads

    def run(adapters, state, base, batch, jitted, steps=2):
        """Steps from committed arrays (a first call with uncommitted ones
        would be compiled apart from the later calls)."""
        out = []
        for _ in range(steps):
            adapters, state, loss, grads = jitted(adapters, state, base, batch)
            out.append((adapters, state, loss, grads))
        return out

    def error(a, b):
        """max |a − b| / max |b| over the leaves of two trees."""
        return max(
            float(np.max(np.abs(np.asarray(x) - np.asarray(y))) / np.max(np.abs(np.asarray(y))))
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
        )

    one = jax.devices()[0]
    single = run(*jax.device_put((adapters, tx.init(adapters), base, batch), one), jax.jit(step))
    report: dict = {"devices": jax.device_count()}
    tensor_parallel = [
        (r".*(q|k|v)_proj/kernel", P(None, "model")),  # (n, m): split the heads
        (r".*o_proj/kernel", P("model", None)),
        (r".*(q|k|v)_proj/genlora/z_b", P("model")),  # the output latent with them
    ]
    for name, mesh, rules in [
        ("fsdp", auto_mesh((8,), ("fsdp",)), []),
        ("fsdp+tp", auto_mesh((4, 2), ("data", "model")), tensor_parallel),
    ]:
        base_sh = gl.sharding.shardings(base, mesh, rules)
        adapter_sh = gl.sharding.shardings(adapters, mesh, rules)
        state_sh = gl.sharding.state_shardings(jax.eval_shape(tx.init, adapters), adapter_sh)
        batch_sh = jax.sharding.NamedSharding(mesh, P(mesh.axis_names[0]))
        scalar = jax.sharding.NamedSharding(mesh, P())
        jitted = jax.jit(
            step,
            in_shardings=(adapter_sh, state_sh, base_sh, batch_sh),
            out_shardings=(adapter_sh, state_sh, scalar, adapter_sh),
        )
        sharded_base = jax.device_put(base, base_sh)
        sharded = jax.device_put(adapters, adapter_sh)
        state = jax.jit(tx.init, out_shardings=state_sh)(sharded)
        result = run(sharded, state, sharded_base, jax.device_put(batch, batch_sh), jitted)
        trees = (result[-1][0], result[-1][1])
        kept = all(
            x.sharding.is_equivalent_to(s, x.ndim)
            for tree, sh in zip(trees, (adapter_sh, state_sh), strict=True)
            for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(sh), strict=True)
        )
        held = {d: 0 for d in jax.devices()}
        replicated = 0
        for leaf in jax.tree.leaves(sharded_base):
            replicated += leaf.size if leaf.sharding.is_fully_replicated else 0
            for part in leaf.addressable_shards:
                held[part.device] += part.data.size
        total = sum(x.size for x in jax.tree.leaves(base))
        report[name] = {
            # step 1 starts from the same point; step 2 from adapters that
            # already differ by rounding, which Adam's update can amplify
            "loss_error": error(result[0][2], single[0][2]),
            "grad_error": error(result[0][3], single[0][3]),
            "step_2_loss_error": error(result[1][2], single[1][2]),
            "step_2_params_error": error(result[1][0], single[1][0]),
            "shardings_kept": kept,
            "max_device_fraction": max(held.values()) / total,
            "replicated_fraction": replicated / total,
        }
    return report


if __name__ == "__main__":
    print(json.dumps(_eight_devices()))
