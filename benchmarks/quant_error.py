"""How far NF4 moves SmolLM2: per-kernel round-trip error, size, and the logits.

    python -m benchmarks.quant_error

The file's weights are already Q4_1; NF4 re-quantizes their float32
dequantization (`genlora_jax.quant.quantize_base`), so this measures what a
second 4-bit round trip costs, against the float32 model of the same file.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import genlora_jax as gl
from genlora_jax.models import load_gguf

TEXT = "The capital of France is Paris, and the capital of Italy is"


def main() -> dict:
    model, dense, tok = load_gguf("smollm2")
    nf4 = gl.quant.quantize_base(dense)
    errors = []
    for (_, kernel), (_, original) in zip(
        jax.tree_util.tree_flatten_with_path(nf4, is_leaf=lambda x: hasattr(x, "dequantize"))[0],
        jax.tree_util.tree_flatten_with_path(dense)[0],
        strict=True,
    ):
        if hasattr(kernel, "dequantize"):
            diff = kernel.dequantize() - original
            errors.append(float(jnp.linalg.norm(diff) / jnp.linalg.norm(original)))
    ids = jnp.asarray([tok(TEXT)["input_ids"]])
    with jax.numpy_rank_promotion("allow"):  # transformers' Llama broadcasts ranks
        want = jax.jit(lambda p: model(ids, params=p).logits)(dense)
        got = jax.jit(lambda p: gl.apply(model, p, ids).logits)(nf4)
    result = {
        "kernels": len(errors),
        "relative_error_median": float(np.median(errors)),
        "relative_error_max": float(np.max(errors)),
        "float32_mib": gl.quant.nbytes(dense) / 2**20,
        "nf4_mib": gl.quant.nbytes(nf4) / 2**20,
        "logits_relative_max": float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want))),
        "same_argmax": float(jnp.mean(jnp.argmax(got, -1) == jnp.argmax(want, -1))),
    }
    for key, value in result.items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    return result


if __name__ == "__main__":
    main()
