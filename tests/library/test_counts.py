"""The paper's parameter counts (GENLORA.md §5), from shapes alone."""

import jax
import pytest

import genlora_jax as gl

QKV = ["q_proj", "k_proj", "v_proj"]


@pytest.mark.parametrize(
    ("config", "want"),
    [
        (gl.LoRAConfig(rank=8), 4_718_592),
        (gl.GenLoRAConfig(rank=8, groups=16), 983_040),
        (gl.GenLoRAConfig(rank=32, groups=16), 2_162_688),
        (gl.GenLoRAConfig(rank=64, groups=16), 3_735_552),
        (gl.GenLoRAConfig(rank=8, groups=16, freeze_z_a=True, freeze_z_b=True), 393_216),
    ],
)
def test_llama3_8b_counts(llama3_8b_shapes, config, want):
    wrapped = jax.eval_shape(lambda p: gl.wrap(p, QKV, config), llama3_8b_shapes)
    counts = gl.count_params(wrapped)
    assert counts.trainable == want
    assert len(counts.per_module) == 32 * 3
    assert counts.frozen > 8_000_000_000


def test_summary_lists_every_module(llama3_8b_shapes):
    wrapped = jax.eval_shape(lambda p: gl.wrap(p, ["q_proj"], gl.GenLoRAConfig()), llama3_8b_shapes)
    text = gl.summary(wrapped)
    assert text.count("genlora") == 32
    assert "model/layers/0/self_attn/q_proj" in text and "theta_a(8, 16, 16)" in text
    assert text.splitlines()[-1].split()[-1] == f"{32 * (4096 + 4096 + 4096):,}"
