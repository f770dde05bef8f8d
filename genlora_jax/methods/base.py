"""The adapter interface every method implements.

An adapter is a `flax.struct.PyTreeNode`: its arrays are pytree leaves (they
train, shard and checkpoint like any parameter) and its configuration is static
aux-data (it is hashable, part of the jit cache key, and never traced).

Letters used throughout: m = out features, n = in features, r = rank,
G = groups, K = RBF centres. A Flax ``nn.Dense`` stores W0ᵀ as its kernel,
shape (n, m); GPT-2's ``Conv1D`` stores W0 itself, shape (m, n)
(``kernel_transposed=True``).
"""

from __future__ import annotations

import abc
import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Float, PRNGKeyArray


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdapterConfig(abc.ABC):
    """Hyper-parameters shared by every adapter method.

    Attributes:
        rank: r, the rank of the update (for MELoRA, of each mini-LoRA).
        alpha: α in the scale α/r (or α/√r with ``rslora``). ``None`` means
            α = 2r, LLM-Adapters' r=8/α=16 convention, so the scale is 2.
        rslora: use the rank-stabilised scale α/√r (Kalajdzievski 2023).
        dropout: dropout rate on the adapter's input x (the base path is not
            dropped), active only when `apply` gets an ``adapter_rng``.
    """

    method: ClassVar[str]

    rank: int = 8
    alpha: float | None = None
    rslora: bool = False
    dropout: float = 0.0

    def __post_init__(self) -> None:
        check_int(self, "rank", minimum=1)
        if self.alpha is not None:
            check_real(self, "alpha", positive=True)
        if not isinstance(self.rslora, bool):
            raise TypeError(f"rslora must be True or False, got rslora={self.rslora!r}.")
        check_real(self, "dropout")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got dropout={self.dropout}.")

    @property
    def scale(self) -> float:
        """s = α/r, or α/√r when ``rslora`` is set."""
        alpha = 2.0 * self.rank if self.alpha is None else self.alpha
        return alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @abc.abstractmethod
    def init(
        self, rng: PRNGKeyArray, *, m: int, n: int, kernel_transposed: bool, path: str
    ) -> Adapter:
        """Creates the adapter for one (m × n) projection at module ``path``."""

    def from_lora(
        self, tensors: Mapping[str, Array], *, w0: Float[Array, "m n"], kernel_transposed: bool
    ) -> Adapter:
        """The adapter holding PEFT LoRA tensors (the inverse of `Adapter.to_lora`).

        Args:
            tensors: ``lora_A`` (r, n), ``lora_B`` (m, r), and for DoRA
                ``lora_magnitude_vector`` (m,), shapes already checked.
            w0: the base weight W0 (m, n) in float32.
            kernel_transposed: as in `init`.
        """
        raise NotImplementedError(f"{type(self).__name__} has no PEFT LoRA form to load.")


def check_int(config: object, name: str, *, minimum: int) -> None:
    """Raises unless ``config.name`` is an integer ≥ ``minimum`` (bools refused)."""
    value = getattr(config, name)
    cls = type(config).__name__
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{cls}: {name} must be an integer, got {name}={value!r}.")
    if value < minimum:
        raise ValueError(f"{cls}: {name} must be an integer ≥ {minimum}, got {name}={value}.")


def check_real(config: object, name: str, *, positive: bool = False) -> None:
    """Raises unless ``config.name`` is a finite real number (and > 0 if ``positive``)."""
    value = getattr(config, name)
    cls = type(config).__name__
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{cls}: {name} must be a number, got {name}={value!r}.")
    if not math.isfinite(value) or (positive and value <= 0):
        need = "a finite number > 0" if positive else "a finite number"
        raise ValueError(f"{cls}: {name} must be {need}, got {name}={value}.")


class Adapter(struct.PyTreeNode, abc.ABC):
    """Trainable state of one adapted projection, plus its static config.

    Subclasses add their arrays as fields and implement `delta_weight` and
    `__call__`.

    Attributes:
        config: the method's `AdapterConfig` (static).
        kernel_transposed: True when the host module's kernel is (m, n).
    """

    config: AdapterConfig = struct.field(pytree_node=False)
    kernel_transposed: bool = struct.field(pytree_node=False)

    mergeable: ClassVar[bool] = True
    # PEFT writes DoRA as LoRA with ``use_dora``; True for the adapters it means.
    peft_use_dora: ClassVar[bool] = False

    def frozen_fields(self) -> frozenset[str]:
        """Names of array fields that stay fixed during training."""
        return frozenset()

    @abc.abstractmethod
    def delta_weight(self, w0: Float[Array, "m n"]) -> Float[Array, "m n"]:
        """ΔW such that the adapted layer is y = (W0 + ΔW) x + b."""

    def merged_weight(self, w0: Float[Array, "m n"]) -> Float[Array, "m n"]:
        """The weight that replaces W0 on merge; W0 + ΔW unless overridden."""
        return w0 + self.delta_weight(w0)

    def unmerged_weight(self, w: Float[Array, "m n"]) -> Float[Array, "m n"]:
        """W0 recovered from a merged weight (methods whose merge is invertible)."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot recover W0 from a merged weight; keep the base."
        )

    def to_lora(self, w0: Float[Array, "m n"]) -> dict[str, Array]:
        """PEFT's LoRA tensors for this adapter: ``lora_A`` (r, n), ``lora_B``
        (m, r) and, with `peft_use_dora`, ``lora_magnitude_vector`` (m,).

        Raises:
            ValueError: the update is not s·B·A (full-rank or nonlinear
                methods), so PEFT cannot represent it; the message says what
                to export instead.
        """
        fix = (
            "export the merged model with `genlora_jax.peft.save_merged`"
            if self.mergeable
            else "it cannot be merged either; serve it with `genlora_jax.apply`"
        )
        raise ValueError(
            f"{type(self).__name__} ({self.config.method}) is not a low-rank update s·B·A, so "
            f"it has no PEFT LoRA form; {fix}."
        )

    @abc.abstractmethod
    def __call__(
        self,
        x: Float[Array, "*batch n"],
        y: Float[Array, "*batch m"],
        *,
        w0: Float[Array, "m n"],
        bias: Float[Array, " m"] | None,
        rng: PRNGKeyArray | None,
    ) -> Float[Array, "*batch m"]:
        """Adapted output, given the input x and the base output y = W0 x + b."""


class LowRankAdapter(Adapter):
    """An adapter whose update is ΔW = s · B A with B (m, r), A (r, n).

    The forward never forms ΔW: y + s · ((x A ᵀ) Bᵀ) costs r·(m + n) per token.

    Methods whose factors are computed from their arrays (GenLoRA's
    generators) set ``generated = True``: `genlora_jax.apply` then computes
    the factors of all such adapters of equal shape in one batched call per
    step (`pregenerate`), and the modules run on `Factors`.
    """

    generated: ClassVar[bool] = False

    @abc.abstractmethod
    def factors(self) -> tuple[Float[Array, "m r"], Float[Array, "r n"]]:
        """The low-rank factors (B, A), without the scale."""

    def delta_weight(self, w0: Float[Array, "m n"]) -> Float[Array, "m n"]:
        return low_rank_delta(*self.factors(), self.config.scale)

    def unmerged_weight(self, w: Float[Array, "m n"]) -> Float[Array, "m n"]:
        return w - self.delta_weight(w)

    def to_lora(self, w0: Float[Array, "m n"]) -> dict[str, Array]:
        """The rank-r LoRA of `factors` (GenLoRA's generated B and A, MELoRA's
        block-diagonal ones), with PEFT's scale equal to this adapter's."""
        b, a = self.factors()
        return {"lora_A": a, "lora_B": b}

    def __call__(self, x, y, *, w0, bias, rng):
        b, a = self.factors()
        h = input_dropout(x, self.config.dropout, rng) @ a.T.astype(x.dtype)
        return y + (h @ (self.config.scale * b).T.astype(h.dtype)).astype(y.dtype)


class Factors(LowRankAdapter):
    """Factors computed ahead of the model call from a generated adapter (see
    `LowRankAdapter.generated`); the same forward, scale and dropout as the
    adapter they came from, whose config they keep. Attributes: a (r, n), b (m, r).
    """

    a: Float[Array, "r n"]
    b: Float[Array, "m r"]

    def factors(self):
        return self.b, self.a


def low_rank_delta(
    b: Float[Array, "m r"], a: Float[Array, "r n"], scale: float
) -> Float[Array, "m n"]:
    """ΔW = s · B A."""
    return (scale * b) @ a


def input_dropout(
    x: Float[Array, "*batch n"], rate: float, rng: PRNGKeyArray | None
) -> Float[Array, "*batch n"]:
    """Inverted dropout on the adapter input; the identity when ``rng`` is None."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def lora_factors(
    rng: PRNGKeyArray, *, rank: int, m: int, n: int
) -> tuple[Float[Array, "r n"], Float[Array, "m r"]]:
    """LoRA's initial factors (A, B): A Kaiming-uniform as in PEFT, B = 0, so ΔW = 0.

    Shared by every method that starts from LoRA's factors (LoRA, DoRA, HiRA,
    AuroRA, LoRAN).
    """
    return kaiming_uniform(rng, (rank, n), fan_in=n), jnp.zeros((m, rank), jnp.float32)


def kaiming_uniform(rng: PRNGKeyArray, shape: tuple[int, ...], fan_in: int) -> Array:
    """PEFT's LoRA-A init: Kaiming-uniform with a = √5, i.e. U(±1/√fan_in)."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(rng, shape, jnp.float32, -bound, bound)
