"""Real `transformers` Flax models: identity at init, interceptor == merged."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers as tf
from conftest import assert_f32_close, tiny_llama_config

import genlora_jax as gl

SMALL = dict(vocab_size=128, max_position_embeddings=64)
ARCHITECTURES = {
    "llama": (tf.FlaxLlamaForCausalLM, lambda: tiny_llama_config(), ["q_proj", "k_proj", "v_proj"]),
    "mistral": (
        tf.FlaxMistralForCausalLM,
        lambda: tf.MistralConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            sliding_window=64,
            **SMALL,
        ),
        ["q_proj", "k_proj", "v_proj"],
    ),
    "gemma": (
        tf.FlaxGemmaForCausalLM,
        lambda: tf.GemmaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            **SMALL,
        ),
        ["q_proj", "k_proj", "v_proj"],
    ),
    "opt": (
        tf.FlaxOPTForCausalLM,
        lambda: tf.OPTConfig(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            **SMALL,
        ),
        ["q_proj", "k_proj", "v_proj"],
    ),
    "bert": (
        tf.FlaxBertModel,
        lambda: tf.BertConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            **SMALL,
        ),
        ["query", "key", "value"],
    ),
    "roberta": (
        tf.FlaxRobertaModel,
        lambda: tf.RobertaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=128,
            max_position_embeddings=66,
        ),
        ["query", "key", "value"],
    ),
    "gpt2": (
        tf.FlaxGPT2LMHeadModel,
        lambda: tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64),
        ["c_attn"],
    ),
}
CONFIGS = {
    "genlora": gl.GenLoRAConfig(rank=4, groups=4),
    "lora": gl.LoRAConfig(rank=4),
}


def _output(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.lenient
@pytest.mark.parametrize("method", sorted(CONFIGS))
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_architecture(arch, method, key):
    cls, make_config, targets = ARCHITECTURES[arch]
    model = cls(make_config(), seed=0)
    params = gl.wrap(model.params, targets, CONFIGS[method], rng=key)
    ids = jax.random.randint(key, (2, 8), 1, 128)
    n_layers = 2
    assert len(gl.named_adapters(params)) == n_layers * len(targets)

    # identity at initialisation
    base_out = _output(model(ids, params=model.params))
    np.testing.assert_array_equal(_output(gl.apply(model, params, ids)), base_out)

    # a few optimizer steps make ΔW non-zero; the base stays bit-identical
    tx = gl.optimizer(optax.adam(1e-2))
    state = tx.init(params)
    # a random regression target: mean(out²) is constant after a final LayerNorm
    target = jax.random.normal(jax.random.key(1), base_out.shape)

    @jax.jit
    def step(params, state):
        grads = jax.grad(lambda p: jnp.mean((_output(gl.apply(model, p, ids)) - target) ** 2))(
            params
        )
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    trained = params
    for _ in range(3):
        trained, state = step(trained, state)
    old_base, old_adapters = gl.split(params)
    new_base, new_adapters = gl.split(trained)
    for a, b in zip(jax.tree.leaves(old_base), jax.tree.leaves(new_base), strict=True):
        np.testing.assert_array_equal(a, b)
    moved = [
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(old_adapters), jax.tree.leaves(new_adapters), strict=True)
    ]
    assert all(moved), f"{moved.count(False)} adapter leaves did not move"

    # the interceptor path equals the merged weights in the unchanged model
    adapted = _output(gl.apply(model, trained, ids))
    merged = _output(model(ids, params=gl.merge(trained)))
    # the longest reduction: the widest kernel input (the FFN's), through 2 layers and a head
    width = max(k.shape[0] for k in jax.tree.leaves(model.params) if k.ndim == 2)
    effect = float(jnp.max(jnp.abs(adapted - base_out)))
    assert_f32_close(adapted, merged, terms=width, layers=n_layers + 1, bug=effect)

    # unmerge gives the adapter-carrying tree back, kernels up to float rounding
    back = gl.unmerge(gl.merge(trained), gl.split(trained)[1])
    assert jax.tree.structure(back) == jax.tree.structure(trained)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(trained), strict=True):
        assert_f32_close(a, b, terms=2)  # (W0 + ΔW) − ΔW: two roundings of |W0| + |ΔW|


@pytest.mark.lenient
def test_pretrained_minilm_identity_and_head(minilm_path, key):
    model = tf.FlaxBertForSequenceClassification.from_pretrained(minilm_path, num_labels=2)
    params = gl.wrap(
        model.params,
        ["query", "key", "value"],
        gl.GenLoRAConfig(rank=8, groups=16),
        extra_trainable=["classifier"],
    )
    ids = jax.random.randint(key, (2, 16), 1000, 2000)
    mask = jnp.ones_like(ids)
    want = model(ids, mask, params=model.params).logits
    np.testing.assert_array_equal(gl.apply(model, params, ids, mask).logits, want)
    counts = gl.count_params(params)
    # 6 layers × 3 projections × (384 + 384 + 2·8·16·16) + classifier (384·2 + 2)
    assert counts.trainable == 6 * 3 * (384 + 384 + 2 * 8 * 16 * 16) + 384 * 2 + 2
    assert counts.per_module["classifier"] == 770
