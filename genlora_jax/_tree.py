"""The layout of a wrapped parameter tree, and its one owner.

Every other module reads and writes wrapped trees through this one, so the
layout is stated once, here::

    params["encoder"]["layer"]["0"]["attention"]["self"]["query"] = {
        "kernel": W0ᵀ (n, m),   "bias": (m,),       # the base, untouched
        "genlora": GenLoRAParams(z_a, theta_a, z_b, theta_b, config=...),
    }
    params["genlora"] = {"classifier": {"kernel": ..., "bias": ...}}  # extras

- An **adapter** sits beside the kernel it adapts, under ``ADAPTER_KEY``, so
  `flax.linen.scan` slices stacked adapters with their layer and the
  interceptor finds them through the module's own variables.
- **Extra trainable leaves** (a task head; PEFT's ``modules_to_save``) move
  under the root ``ADAPTER_KEY``, so the tree alone says what trains:
  everything under a ``"genlora"`` key is adapter state, the rest is the
  frozen base.
- **Kernels** are stored as Flax stores them: ``nn.Dense`` keeps W0ᵀ (n, m),
  GPT-2's ``Conv1D`` keeps W0 (m, n) (the adapter's ``kernel_transposed``).
  Layers under ``nn.scan`` stack them with leading layer axes, (L, n, m), and
  their adapters carry the same leading axes.

A `Site` is one adapted projection: its path, its stored kernel and its
adapter. `sites` lists them; `Site.w0` and `Site.with_w` convert between the
stored kernel and the weight W (m, n) that the adapters' equations use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util
from flax.core import unfreeze
from jaxtyping import Array, Float

from genlora_jax.methods.base import Adapter

# Adapters and extra trainable leaves live under this key in a wrapped tree.
ADAPTER_KEY = "genlora"

Path = tuple[str, ...]
Params = dict[str, Any]


def path_str(path: Path) -> str:
    """'encoder/layer/0/attention/self/query', the form targets match against."""
    return "/".join(str(p) for p in path)


def flat(tree: Mapping) -> dict[Path, Any]:
    """Key path → leaf of a nested dict tree (adapters are leaves here)."""
    return traverse_util.flatten_dict(unfreeze(tree))


def unflat(leaves: Mapping[Path, Any]) -> Params:
    """Inverse of `flat`."""
    return traverse_util.unflatten_dict(dict(leaves))


def is_adapter_state(key: Path) -> bool:
    """Whether the leaf at ``key`` trains (adapter arrays or extra trainable leaves)."""
    return ADAPTER_KEY in key


def is_adapter(key: Path, leaf: Any) -> bool:
    """Whether ``leaf`` is the adapter of the module at ``key[:-1]``."""
    return key[-1] == ADAPTER_KEY and isinstance(leaf, Adapter)


def is_extra(key: Path, leaf: Any) -> bool:
    """Whether ``leaf`` is an extra trainable leaf (it lives under the root key)."""
    return key[0] == ADAPTER_KEY and not isinstance(leaf, Adapter)


def kernel_w(kernel: Any, kernel_transposed: bool) -> Array:
    """A stored kernel as W (…, m, n) in float32, dequantized first when it is a
    `genlora_jax.quant.QuantizedKernel`."""
    kernel = kernel.dequantize() if hasattr(kernel, "dequantize") else kernel
    return w_layout(kernel, kernel_transposed).astype(jnp.float32)


def w_layout(array: Any, kernel_transposed: bool) -> Any:
    """A stored kernel as W (…, m, n), or W as a stored kernel: the swap of the
    last two axes for ``nn.Dense`` (it stores W0ᵀ), nothing for ``Conv1D``.
    The conversion is its own inverse."""
    return array if kernel_transposed else jnp.swapaxes(array, -1, -2)


@dataclasses.dataclass(frozen=True)
class Site:
    """One adapted projection of a wrapped tree.

    Attributes:
        path: the module path, e.g. ("encoder", "layer", "0", "attention", "self", "query").
        kernel: the stored kernel, (*layers, n, m) or (*layers, m, n) when
            ``adapter.kernel_transposed``; arrays or `jax.ShapeDtypeStruct`.
        adapter: its adapter (arrays with the same leading layer axes).
    """

    path: Path
    kernel: Any
    adapter: Adapter

    @property
    def name(self) -> str:
        """The path as 'a/b/c'."""
        return path_str(self.path)

    @property
    def kernel_key(self) -> Path:
        return (*self.path, "kernel")

    @property
    def adapter_key(self) -> Path:
        return (*self.path, ADAPTER_KEY)

    @property
    def layers(self) -> tuple[int, ...]:
        """Leading layer axes of a stacked (``nn.scan``) kernel; () for a 2-D one."""
        return tuple(self.kernel.shape[:-2])

    @property
    def shape(self) -> tuple[int, int]:
        """(m, n): out and in features of one layer's W."""
        n, m = self.kernel.shape[-2:][:: -1 if self.adapter.kernel_transposed else 1]
        return m, n

    def w0(self) -> Float[Array, "*layers m n"]:
        """The base weight W0 (…, m, n) in float32 (dequantized if the kernel is
        a `genlora_jax.quant.QuantizedKernel`)."""
        return kernel_w(self.kernel, self.adapter.kernel_transposed)

    def with_w(self, w: Float[Array, "*layers m n"]) -> Array:
        """``w`` stored as this site's kernel: its layout and its dtype (for a
        quantized kernel, the dtype it dequantizes to)."""
        return w_layout(w, self.adapter.kernel_transposed).astype(self.kernel.dtype)

    def per_layer(self, fn: Callable[[Adapter, Array], Any]) -> Any:
        """``fn(adapter, w)`` applied to every layer: `jax.vmap`-ed over the layer
        axes of a stacked site, evaluated with ``w = self.w0()``."""
        for _ in self.layers:
            fn = jax.vmap(fn)
        return fn(self.adapter, self.w0())


def sites(params: Mapping) -> list[Site]:
    """Every adapted projection of ``params``, in tree order."""
    leaves = flat(params)
    found = []
    for key, leaf in leaves.items():
        if is_adapter(key, leaf):
            kernel = leaves.get((*key[:-1], "kernel"))
            if kernel is None:
                raise ValueError(
                    f"{path_str(key[:-1])}: the tree has no kernel beside the adapter (an "
                    "adapter half of `split`?); pass the full tree, "
                    "`genlora_jax.join(base_params, adapters)`."
                )
            found.append(Site(key[:-1], kernel, leaf))
    return found


def named_adapters(params: Mapping) -> dict[str, Adapter]:
    """Module path ('a/b/c') → adapter, for every adapted projection in the tree."""
    return {path_str(key[:-1]): leaf for key, leaf in flat(params).items() if is_adapter(key, leaf)}


def split(params: Mapping) -> tuple[Params, Params]:
    """(base, adapters): two disjoint trees.

    ``adapters`` keeps full paths, so it holds every ``"genlora"`` entry
    (adapter nodes and extra trainable leaves) and nothing of the base;
    `genlora_jax.join` puts them back.
    """
    base, adapters = {}, {}
    for key, leaf in flat(params).items():
        (adapters if is_adapter_state(key) else base)[key] = leaf
    return unflat(base), unflat(adapters)


def model_params(params: Mapping) -> Params:
    """The tree the model is called with: extras back in place, adapters kept
    beside their kernels for the interceptor to read."""
    return unflat(
        {key[1:] if is_extra(key, leaf) else key: leaf for key, leaf in flat(params).items()}
    )


def plain_params(params: Mapping) -> dict[Path, Any]:
    """The flat tree of the unadapted model: extras back in place, adapters dropped."""
    return {
        key[1:] if is_extra(key, leaf) else key: leaf
        for key, leaf in flat(params).items()
        if not isinstance(leaf, Adapter)
    }


def _key_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    raise TypeError(f"unsupported pytree key {entry!r}")


def leaf_paths(tree: Any) -> dict[Path, Any]:
    """Any pytree's leaves by path (dict keys, attribute names, indices), in
    tree order; unlike `flat`, adapters are opened into their array fields."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(_key_name(k) for k in path): leaf for path, leaf in leaves}
