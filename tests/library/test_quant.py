"""A frozen base kept in 4/8-bit blocks (`genlora_jax.quant`): exact arithmetic, training,
merge, checkpoints, and the GGUF blocks of SmolLM2 kept as they are."""

import functools

import flax.linen as nn
import gguf
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_f32_close

import genlora_jax as gl
from genlora_jax.quant import NF4, QuantizedKernel, quantize_nf4


class MLP(nn.Module):
    """Widths that NF4's 64-value blocks divide, plus a head they do not (n = 48)."""

    @nn.compact
    def __call__(self, x):
        h = jax.nn.gelu(nn.Dense(128, name="up")(x))
        h = nn.Dense(48, name="down")(h)
        return nn.Dense(3, name="head")(jnp.tanh(h))


X = jax.random.normal(jax.random.key(3), (6, 64))


@pytest.fixture(scope="module")
def base():
    return MLP().init(jax.random.key(0), X)["params"]


def _nf4_reference(kernel: np.ndarray) -> np.ndarray:
    """NF4 in numpy, value by value: nearest code of x / absmax of its 64-block."""
    w = np.asarray(kernel, np.float64).T
    m, n = w.shape
    blocks = w.reshape(m, n // 64, 64)
    absmax = np.abs(blocks).max(-1, keepdims=True)  # (m, blocks, 1)
    codes = np.abs((blocks / absmax)[..., None] - NF4.astype(np.float64)).argmin(-1)
    return (NF4[codes] * absmax).reshape(m, n).T


def test_nf4_is_the_nearest_code_of_each_block(base):
    kernel = base["up"]["kernel"]
    q = quantize_nf4(kernel)
    assert q.codes.dtype == jnp.uint8 and q.codes.shape == (128, 1, 32)  # two codes a byte
    np.testing.assert_allclose(q.dequantize(), _nf4_reference(kernel), rtol=1e-6, atol=1e-7)
    # the round-trip error is at most half the widest gap between codes, per block
    err = np.abs(np.asarray(q.dequantize()) - np.asarray(kernel))
    bound = np.max(np.diff(NF4)) / 2 * np.abs(np.asarray(kernel)).max()
    assert 0 < err.max() <= bound
    assert float(jnp.mean(err) / jnp.mean(jnp.abs(kernel))) < 0.1


def test_q4_1_and_q8_0_blocks_decode_as_gguf_does():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 64)).astype(np.float32)  # (m, n): GGUF rows
    for kind, qtype in (
        ("q4_1", gguf.GGMLQuantizationType.Q4_1),
        ("q8_0", gguf.GGMLQuantizationType.Q8_0),
    ):
        raw = gguf.quants.quantize(w, qtype)
        q = gl.quant.from_gguf_blocks(raw, kind, (64, 8))
        want = gguf.quants.dequantize(raw, qtype).reshape(8, 64).T
        np.testing.assert_array_equal(q.dequantize(), want)


def test_quantize_base_leaves_what_it_cannot_block_in_float(base):
    q = gl.quant.quantize_base(base)
    assert isinstance(q["up"]["kernel"], QuantizedKernel)
    assert isinstance(q["down"]["kernel"], QuantizedKernel)
    assert not isinstance(q["head"]["kernel"], QuantizedKernel)  # n = 48
    assert gl.quant.nbytes(q) < 0.35 * gl.quant.nbytes(base)
    with pytest.raises(ValueError, match="NF4 only"):
        gl.quant.quantize_base(base, "q4_1")
    assert gl.quant.quantize_base(q)["up"]["kernel"] is q["up"]["kernel"]  # already blocks
    bigger_head = gl.quant.quantize_base({"head": {"kernel": jnp.ones((64, 2))}})
    with pytest.raises(ValueError, match="head/kernel, a quantized kernel, which cannot train"):
        gl.wrap(bigger_head, ["head"], gl.LoRAConfig(rank=1), extra_trainable=["head/kernel"])


def test_a_quantized_base_computes_its_dequantized_model_and_trains(base):
    q = gl.quant.quantize_base(base)
    dense = gl.quant.dequantize_base(q)
    wrapped_q = gl.wrap(
        q, ["up", "down"], gl.GenLoRAConfig(rank=4, groups=4), extra_trainable=["head"]
    )
    wrapped_d = gl.wrap(
        dense, ["up", "down"], gl.GenLoRAConfig(rank=4, groups=4), extra_trainable=["head"]
    )
    np.testing.assert_array_equal(gl.apply(MLP(), q, X), MLP().apply({"params": dense}, X))
    assert gl.count_params(wrapped_q) == gl.count_params(wrapped_d)

    tx = gl.optimizer(optax.adam(1e-2))

    def train(params):
        base_half, adapters = gl.split(params)
        state = tx.init(adapters)

        @jax.jit
        def step(adapters, state):
            loss, grads = jax.value_and_grad(
                lambda a: jnp.mean(gl.apply(MLP(), gl.join(base_half, a), X) ** 2)
            )(adapters)
            updates, state = tx.update(grads, state, adapters)
            return optax.apply_updates(adapters, updates), state, loss

        losses = []
        for _ in range(3):
            adapters, state, loss = step(adapters, state)
            losses.append(float(loss))
        return gl.join(base_half, adapters), losses

    trained_q, losses_q = train(wrapped_q)
    trained_d, _ = train(wrapped_d)
    assert losses_q[-1] < losses_q[0]
    for a, b in zip(
        jax.tree.leaves(gl.split(trained_q)[1]),
        jax.tree.leaves(gl.split(trained_d)[1]),
        strict=True,
    ):
        assert_f32_close(a, b, terms=128, layers=6)
    assert gl.split(trained_q)[0]["up"]["kernel"] is q["up"]["kernel"]  # the base never moves

    # merge returns float kernels, and says so
    with pytest.warns(UserWarning, match="dequantizes the 2 quantized kernels"):
        merged = gl.merge(trained_q)
    assert not any(
        isinstance(x, QuantizedKernel)
        for x in jax.tree.leaves(merged, is_leaf=lambda x: isinstance(x, QuantizedKernel))
    )
    assert_f32_close(
        MLP().apply({"params": merged}, X), gl.apply(MLP(), trained_q, X), terms=128, layers=3
    )


def test_a_quantized_base_is_refused_outside_apply_and_checkpoints(base, tmp_path):
    q = gl.quant.quantize_base(base)
    with pytest.raises(gl.AdapterNotAppliedError, match="up holds a quantized kernel"):
        MLP().apply({"params": q}, X)
    params = gl.wrap(q, ["up"], gl.LoRAConfig(rank=2))
    with gl.AdapterCheckpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(1, params)
        restored = ckpt.restore(gl.wrap(q, ["up"], gl.LoRAConfig(rank=2)))
    np.testing.assert_array_equal(gl.apply(MLP(), restored.params, X), gl.apply(MLP(), params, X))
    cast = gl.cast_base(q, jnp.bfloat16)
    assert cast["up"]["kernel"].dequantize().dtype == jnp.bfloat16
    assert cast["up"]["kernel"].codes is q["up"]["kernel"].codes


def test_quantized_dense_gradients_are_exact(base):
    kernel = quantize_nf4(base["up"]["kernel"])
    bias = jnp.linspace(-1.0, 1.0, 128)

    def through_blocks(x, scales, bias):
        y = gl.quant.dense(x, kernel.replace(scales=scales), bias, None, None)
        return jnp.sum(jnp.sin(y))

    def through_float(x, scales, bias):
        return jnp.sum(jnp.sin(x @ kernel.replace(scales=scales).dequantize() + bias[None]))

    args = (X, kernel.scales, bias)
    np.testing.assert_array_equal(through_blocks(*args), through_float(*args))
    got = jax.grad(through_blocks, argnums=(0, 1, 2))(*args)
    want = jax.grad(through_float, argnums=(0, 1, 2))(*args)
    for a, b in zip(got, want, strict=True):
        assert_f32_close(a, b, terms=64, layers=2)


def test_a_step_holds_one_dequantized_weight_at_a_time():
    """Six quantized layers, a gradient through all of them: XLA's temporaries
    stay near one float W (1 MiB), not six (the forward's W kept for the
    backward, or shared with its recomputation)."""
    n, layers = 512, 6
    kernels = [quantize_nf4(jax.random.normal(jax.random.key(i), (n, n))) for i in range(layers)]
    x = jax.random.normal(jax.random.key(9), (4, n))

    def loss(x, kernels):
        for k in kernels:
            x = jnp.tanh(gl.quant.dense(x, k, None, None, None))
        return jnp.sum(x)

    one_w = n * n * 4
    for f in (loss, jax.checkpoint(loss)):
        compiled = jax.jit(jax.grad(f)).lower(x, kernels).compile()
        assert compiled.memory_analysis().temp_size_in_bytes < 2 * one_w


def test_a_wide_kernel_is_dequantized_a_slice_at_a_time(monkeypatch):
    """The head's path (`dense_in_slices`) gives `dense`'s values and gradients,
    and holds one float slice of W at a time, not W."""
    n, m = 256, 3001  # W: 3 MiB in float, 6 slices of 501 rows, the last overlapping by 5
    kernel = quantize_nf4(jax.random.normal(jax.random.key(0), (n, m)))
    x = jax.random.normal(jax.random.key(1), (32, n))
    monkeypatch.setattr(gl.quant, "SLICE_BYTES", 2**19)  # at most 512 rows a slice
    assert gl.quant.slice_plan(m, 512) == (6, 501)

    def loss(f, x, scales):
        return jnp.sum(jnp.tanh(f(x, kernel.replace(scales=scales))))

    sliced = functools.partial(loss, lambda x, k: gl.quant.dense_in_slices(x, k))
    whole = functools.partial(loss, lambda x, k: gl.quant.dense(x, k, None, None, None))
    assert_f32_close(
        gl.quant.dense_in_slices(x, kernel),
        gl.quant.dense(x, kernel, None, None, None),
        terms=n,
    )
    for a, b in zip(
        jax.grad(sliced, argnums=(0, 1))(x, kernel.scales),
        jax.grad(whole, argnums=(0, 1))(x, kernel.scales),
        strict=True,
    ):
        assert_f32_close(a, b, terms=m, layers=2)
    one_w = n * m * 4
    temp = {
        name: jax.jit(jax.grad(f)).lower(x, kernel.scales).compile().memory_analysis()
        for name, f in (("sliced", sliced), ("whole", whole))
    }
    assert temp["whole"].temp_size_in_bytes >= one_w
    assert temp["sliced"].temp_size_in_bytes < 0.75 * one_w  # a slice, its gradient, outputs


def test_a_quantized_embedding_table_looks_up_its_rows():
    class Tied(nn.Module):
        @nn.compact
        def __call__(self, ids):
            embed = nn.Embed(100, 64)
            return embed.attend(jnp.tanh(embed(ids)))

    ids = jnp.asarray([[3, 0, 99], [7, 7, 42]])
    params = Tied().init(jax.random.key(0), ids)["params"]
    head = quantize_nf4(params["Embed_0"]["embedding"].T)  # a (D, V) kernel
    table = head.as_embedding()
    assert table.shape == (100, 64) and table.codes is head.codes
    quantized = {"Embed_0": {"embedding": table}}
    dense = {"Embed_0": {"embedding": table.dequantize()}}
    np.testing.assert_array_equal(dense["Embed_0"]["embedding"], head.dequantize().T)
    assert_f32_close(
        gl.apply(Tied(), quantized, ids), Tied().apply({"params": dense}, ids), terms=64, layers=1
    )
    gl.quant.quantize_base({})  # installs the guard, as load_gguf does
    with pytest.raises(gl.AdapterNotAppliedError, match="Embed_0 holds a quantized kernel or"):
        Tied().apply({"params": quantized}, ids)
    assert gl.quant.nbytes({"a": head, "b": table}) == gl.quant.nbytes({"a": head})


def test_smollm2_keeps_its_gguf_blocks_and_computes_the_dequantized_model():
    from genlora_jax.models import load_gguf

    model, dense, tok = load_gguf("smollm2")
    _, q4, _ = load_gguf("smollm2", quantized=True)
    layer = q4["model"]["layers"]["0"]
    assert layer["self_attn"]["q_proj"]["kernel"].kind == "q4_1"
    assert q4["lm_head"]["kernel"].kind == "q8_0"  # the tied head, from the Q8_0 embedding
    table = q4["model"]["embed_tokens"]["embedding"]
    assert table.embedding and table.shape == dense["model"]["embed_tokens"]["embedding"].shape
    assert table.codes is q4["lm_head"]["kernel"].codes  # one copy of the blocks for both
    np.testing.assert_array_equal(table.dequantize(), dense["model"]["embed_tokens"]["embedding"])
    # the same numbers as the loader's own dequantization, q/k rows un-permuted too
    for module in ("self_attn/q_proj", "self_attn/k_proj", "mlp/down_proj"):
        a, b = module.split("/")
        np.testing.assert_array_equal(
            layer[a][b]["kernel"].dequantize(), dense["model"]["layers"]["0"][a][b]["kernel"]
        )
    np.testing.assert_array_equal(q4["lm_head"]["kernel"].dequantize(), dense["lm_head"]["kernel"])
    assert gl.quant.nbytes(q4) < 0.25 * gl.quant.nbytes(dense)
    ids = jnp.asarray([tok("The capital of France is Paris, and of Italy")["input_ids"]])
    with jax.numpy_rank_promotion("allow"):  # transformers' Llama broadcasts ranks
        want = jax.jit(lambda p: model(ids, params=p).logits)(dense)
        got = jax.jit(lambda p: gl.apply(model, p, ids).logits)(q4)
    rel = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
    assert rel <= 1e-5
