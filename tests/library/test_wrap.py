"""Targets, the wrapped layout, split/join, overrides and their errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import genlora_jax as gl


@pytest.fixture
def base(key):
    def dense(n, m):
        return {"kernel": jax.random.normal(key, (n, m)), "bias": jnp.zeros(m)}

    layer = {
        "self_attn": {"q_proj": dense(32, 32), "k_proj": dense(32, 16), "o_proj": dense(32, 32)}
    }
    return {
        "embed_tokens": {"embedding": jnp.ones((10, 32))},
        "layers": {"0": layer, "1": jax.tree.map(lambda x: x + 1, layer)},
        "norm": {"scale": jnp.ones(32)},
        "score": dense(32, 2),
    }


CFG = gl.GenLoRAConfig(rank=4, groups=4)


def test_names_and_regex_select_projections(base):
    assert ["/".join(p) for p in gl.find_targets(base, ["q_proj"])] == [
        "layers/0/self_attn/q_proj",
        "layers/1/self_attn/q_proj",
    ]
    assert len(gl.find_targets(base, [r"layers/1/.*_proj"])) == 3
    wrapped = gl.wrap(base, ["q_proj", "k_proj"], CFG)
    assert sorted(gl.named_adapters(wrapped)) == [
        "layers/0/self_attn/k_proj",
        "layers/0/self_attn/q_proj",
        "layers/1/self_attn/k_proj",
        "layers/1/self_attn/q_proj",
    ]
    k = wrapped["layers"]["0"]["self_attn"]["k_proj"]["genlora"]
    assert (k.z_a.shape, k.z_b.shape) == ((32,), (16,))  # m = 16 out, n = 32 in


def test_base_is_untouched_and_split_join_round_trip(base):
    wrapped = gl.wrap(base, ["q_proj"], CFG, extra_trainable=["score"])
    assert "score" not in wrapped and "score" in wrapped["genlora"]
    plain, adapters = gl.split(wrapped)
    assert jax.tree.structure(plain) == jax.tree.structure(
        {k: v for k, v in base.items() if k != "score"}
    )
    back = gl.join(plain, adapters)
    assert jax.tree.structure(back) == jax.tree.structure(wrapped)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(wrapped), strict=True):
        assert a is b
    restored = gl.model_params(wrapped)
    assert restored["score"]["kernel"] is base["score"]["kernel"]


def test_overrides_by_pattern_first_match_wins(base):
    specific_first = {r"layers/1/.*": gl.LoRAConfig(rank=3), "k_proj": {"rank": 2}}
    ads = gl.named_adapters(gl.wrap(base, ["q_proj", "k_proj"], CFG, overrides=specific_first))
    assert ads["layers/0/self_attn/q_proj"].theta_a.shape[0] == 4
    assert ads["layers/0/self_attn/k_proj"].theta_a.shape[0] == 2
    assert isinstance(ads["layers/1/self_attn/k_proj"], gl.methods.LoRAParams)
    assert ads["layers/1/self_attn/k_proj"].a.shape == (3, 32)
    assert isinstance(ads["layers/1/self_attn/q_proj"], gl.methods.LoRAParams)
    # the other order: k_proj's override is found first on layer 1 too (the
    # rule of sharding rules and of PEFT's rank_pattern)
    general_first = dict(reversed(specific_first.items()))
    ads = gl.named_adapters(gl.wrap(base, ["q_proj", "k_proj"], CFG, overrides=general_first))
    assert ads["layers/1/self_attn/k_proj"].theta_a.shape[0] == 2
    assert isinstance(ads["layers/1/self_attn/q_proj"], gl.methods.LoRAParams)


def test_each_module_gets_its_own_init(base):
    ads = gl.named_adapters(gl.wrap(base, ["q_proj"], CFG))
    first, second = ads.values()
    assert not np.allclose(first.theta_a, second.theta_a)


def test_target_matching_nothing_lists_what_exists(base):
    with pytest.raises(
        ValueError, match=r"no module matched target 'query'.*k_proj \(2\).*q_proj \(2\)"
    ):
        gl.wrap(base, ["query"])


def test_target_that_is_not_a_projection(base):
    base = dict(base, lm_head={"kernel": jnp.ones((2, 32, 8))})
    with pytest.raises(
        ValueError, match=r"target 'lm_head' matched modules whose kernel is not 2-D"
    ):
        gl.wrap(base, ["lm_head"])


def test_wrapping_twice_and_bad_extras_are_refused(base):
    wrapped = gl.wrap(base, ["q_proj"], CFG)
    with pytest.raises(ValueError, match="already carry adapters"):
        gl.wrap(wrapped, ["q_proj"], CFG)
    with pytest.raises(ValueError, match="extra_trainable pattern 'head' matched no module"):
        gl.wrap(base, ["q_proj"], CFG, extra_trainable=["head"])
    with pytest.raises(ValueError, match="both a target and extra_trainable"):
        gl.wrap(base, ["q_proj"], CFG, extra_trainable=["q_proj"])


def test_groups_that_do_not_divide_name_the_module(base):
    with pytest.raises(ValueError, match=r"layers/0/self_attn/k_proj: groups=32 does not divide"):
        gl.wrap(base, ["k_proj"], gl.GenLoRAConfig(groups=32))


def test_transposed_kernels_by_name():
    base = {"h": {"0": {"attn": {"c_attn": {"kernel": jnp.ones((96, 32)), "bias": jnp.zeros(96)}}}}}
    adapter = gl.named_adapters(gl.wrap(base, ["c_attn"], CFG))["h/0/attn/c_attn"]
    assert adapter.kernel_transposed
    assert (adapter.z_b.shape, adapter.z_a.shape) == ((96,), (32,))
