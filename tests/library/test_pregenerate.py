"""Batched generation (`gl.pregenerate`, on by default in `gl.apply`): GenLoRA's
factors for all modules of one group computed in one vmapped call.

It must be the same function of the adapters (outputs and gradients equal the
per-module path) and must actually shrink the program: one generator per group
instead of one per module, counted in the lowered StableHLO.
"""

import re

import jax
import jax.numpy as jnp
import pytest
from conftest import assert_f32_close
from test_scan_remat import CONFIG, L, Looped, Scanned, X, Y, perturbed

import genlora_jax as gl

TARGETS = ["query", "value", "up", "down"]  # shapes (D, D) ×2, (D, H), (H, D)
# "down" gets its own config (another group); "value" of layer 0 is LoRA (not generated)
OVERRIDES = {"layers_0/value": gl.LoRAConfig(rank=2), "down": {"groups": 2}}


def loss(model, params, batch_generators):
    out = gl.apply(model, params, X, batch_generators=batch_generators)
    return jnp.mean((out - Y) ** 2)


@pytest.fixture(scope="module")
def looped():
    base = Looped().init(jax.random.key(0), X)["params"]
    return perturbed(gl.wrap(base, TARGETS, CONFIG, overrides=OVERRIDES, rng=jax.random.key(1)))


@pytest.fixture(scope="module")
def scanned():
    base = jax.jit(Scanned().init)(jax.random.key(0), X)["params"]
    return perturbed(gl.wrap(base, TARGETS, CONFIG, rng=jax.random.key(1), stacked="layers"))


@pytest.mark.parametrize("which", ["looped", "scanned"])
def test_batched_generation_is_the_same_function(which, request):
    params = request.getfixturevalue(which)
    model = Looped() if which == "looped" else Scanned()
    base, adapters = gl.split(params)
    results = {}
    for batched in (True, False):
        fn = jax.jit(
            jax.value_and_grad(lambda a, b=batched: loss(model, gl.join(base, a), b)),
        )
        results[batched] = fn(adapters)
    (loss_b, grads_b), (loss_u, grads_u) = results[True], results[False]
    assert_f32_close(loss_b, loss_u, terms=64, layers=2 * L)
    for g_b, g_u in zip(jax.tree.leaves(grads_b), jax.tree.leaves(grads_u), strict=True):
        assert_f32_close(g_b, g_u, terms=64, layers=2 * L)
    # and it is what the merged weights compute
    merged = model.apply({"params": gl.merge(params)}, X)
    effect = float(jnp.max(jnp.abs(merged - model.apply({"params": base}, X))))
    assert_f32_close(gl.apply(model, params, X), merged, terms=64, layers=2 * L, bug=effect)


def _generators_in_program(params, batched: bool) -> int:
    """How many RBF feature maps the lowered forward computes: one exp of the
    K = 15 Gaussian bumps each, a tensor whose last axis is 15."""
    lowered = jax.jit(lambda p: gl.apply(Looped(), p, X, batch_generators=batched)).lower(params)
    return len(re.findall(r"stablehlo\.exponential .*x15xf32>", lowered.as_text()))


def test_one_generator_per_group_instead_of_per_module(looped):
    adapters = gl.named_adapters(looped)
    generated = [a for a in adapters.values() if isinstance(a, gl.methods.GenLoRAParams)]
    assert len(generated) == len(TARGETS) * L - 1  # layers_0/value is LoRA
    # groups: (D,D) query/value, (D,H) up, (H,D) down with groups=2 → 3 groups, A and B each
    assert _generators_in_program(looped, batched=True) == 2 * 3
    assert _generators_in_program(looped, batched=False) == 2 * len(generated)


def test_pregenerate_leaves_other_methods_alone(looped):
    tree = gl.pregenerate(looped)
    kinds = {type(a).__name__ for a in gl.named_adapters(tree).values()}
    assert kinds == {"Factors", "LoRAParams"}
    lora = gl.named_adapters(tree)["layers_0/value"]
    assert lora is gl.named_adapters(looped)["layers_0/value"]
