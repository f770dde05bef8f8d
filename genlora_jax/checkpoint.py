"""Adapter checkpoints with Orbax: the trainable state only, checked on restore.

A checkpoint step holds three Orbax items:

- ``adapters``: the adapter half of `split` (adapter arrays and extra
  trainable leaves), a few MB where the base is GBs;
- ``opt_state`` (optional): the optimizer state;
- ``meta`` (JSON): the adapter configuration of every module, a fingerprint of
  the base it was trained on (kernel shape and its first values per adapted
  module), the signature (shape, dtype) of every saved array, the RNG key and
  the data position.

`restore` reads ``meta`` first and compares it with the freshly wrapped params
before any array is read, so a checkpoint made for another base model, other
targets or another configuration is refused with an error naming the first
difference, never loaded partially. Orbax writes each step to a temporary
directory and renames it when complete, so a save interrupted by a crash
leaves the previous steps restorable.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from jaxtyping import PRNGKeyArray

from genlora_jax._tree import Params, Site, flat, leaf_paths, sites, split, unflat
from genlora_jax._wrap import join
from genlora_jax.quant import QuantizedKernel

FORMAT = "genlora_jax.adapter_checkpoint/1"
# Leading values of each adapted kernel kept as the base fingerprint; compared
# at a tolerance that accepts a base loaded in another dtype (bf16: 2⁻⁸).
_SAMPLE = 8
_SAMPLE_RTOL = 1e-2


class CorruptCheckpointError(ValueError):
    """A checkpoint step on disk cannot be read (truncated, bit-flipped, foreign)."""


def _check_finite(what: str, tree: Any) -> None:
    """Refuses to save NaN or inf: a checkpoint must be a state worth resuming."""
    for path, leaf in leaf_paths(tree).items():
        if isinstance(leaf, jax.ShapeDtypeStruct) or not jax.numpy.issubdtype(
            leaf.dtype, jax.numpy.inexact
        ):
            continue
        if not bool(jax.numpy.all(jax.numpy.isfinite(leaf))):
            raise FloatingPointError(
                f"{what} leaf {'/'.join(path)} holds NaN or inf; a checkpoint of it could not be "
                "resumed, so nothing was saved. Restore the last good step and lower the "
                "learning rate."
            )


class Checkpoint(NamedTuple):
    """A restored training state.

    Attributes:
        params: the wrapped params given to `AdapterCheckpointer.restore`, with
            adapter and extra trainable leaves replaced by the saved ones.
        opt_state: the optimizer state, or None when not asked for.
        step: the step the checkpoint was saved at.
        rng: the saved PRNG key, or None when none was saved.
        data_position: the saved data position (any JSON value).
    """

    params: Params
    opt_state: Any
    step: int
    rng: PRNGKeyArray | None
    data_position: Any


def _signature(tree: Any) -> dict[str, list]:
    """'path/to/leaf' → [shape, dtype] of every array leaf."""
    return {
        "/".join(key): [list(leaf.shape), str(np.dtype(leaf.dtype))]
        for key, leaf in leaf_paths(tree).items()
    }


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _config_json(site: Site) -> dict[str, Any]:
    cfg = site.adapter.config
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    return _json({"class": type(cfg).__name__, "method": cfg.method, **fields})


def _sample(kernel: Any) -> list[float] | None:
    if isinstance(kernel, jax.ShapeDtypeStruct):
        return None
    if isinstance(kernel, QuantizedKernel):
        kernel = kernel.dequantize()
    first_row = kernel[(0,) * (kernel.ndim - 1)]  # of the first layer, for stacked kernels
    return np.asarray(first_row[:_SAMPLE], np.float32).tolist()


def describe(params: Mapping, adapters: Mapping | None = None) -> dict[str, Any]:
    """What a checkpoint of ``params`` must match: adapters, their base, leaves.

    Args:
        params: a wrapped tree (from `wrap`, or `join` of `split`'s halves).
        adapters: its adapter half, when the caller has split it already.

    Returns:
        A JSON-ready dict with, per adapted module path, the adapter class,
        its config fields, the kernel orientation and shape and the first
        values of the kernel's first row (None for `jax.ShapeDtypeStruct`
        kernels); and the signature (shape, dtype) of every adapter-half leaf.
    """
    modules = {
        site.name: {
            "adapter": type(site.adapter).__name__,
            "config": _config_json(site),
            "kernel_transposed": site.adapter.kernel_transposed,
            "kernel_shape": list(site.kernel.shape),
            "kernel_sample": _sample(site.kernel),
        }
        for site in sites(params)
    }
    adapters = split(params)[1] if adapters is None else adapters
    return {"modules": modules, "arrays": _signature(adapters)}


def _config_call(config: Mapping[str, Any]) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in config.items() if k not in ("class", "method"))
    return f"{config['class']}({args})"


def _first_difference(saved: Mapping[str, Any], fresh: Mapping[str, Any]) -> str | None:
    saved_paths, fresh_paths = set(saved["modules"]), set(fresh["modules"])
    if saved_paths != fresh_paths:
        only_saved = sorted(saved_paths - fresh_paths)
        only_fresh = sorted(fresh_paths - saved_paths)
        return (
            f"the targets differ: adapted only in the checkpoint: {only_saved[:4]} "
            f"({len(only_saved)}), only in these params: {only_fresh[:4]} ({len(only_fresh)}). "
            "Wrap the base with the checkpoint's targets."
        )
    for path in sorted(saved_paths):
        old, new = saved["modules"][path], fresh["modules"][path]
        names = ["class", *sorted(set(old["config"]) | set(new["config"]) - {"class"})]
        for name in names:
            if old["config"].get(name) != new["config"].get(name):
                return (
                    f"{path}: config field {name!r} is {old['config'].get(name)!r} in the "
                    f"checkpoint but {new['config'].get(name)!r} here. Wrap with the "
                    f"checkpoint's config: {_config_call(old['config'])}."
                )
        for name in ("adapter", "kernel_transposed"):
            if old[name] != new[name]:
                return f"{path}: {name} is {old[name]!r} in the checkpoint but {new[name]!r} here."
        if old["kernel_shape"] != new["kernel_shape"]:
            return (
                f"{path}: the base kernel has shape {tuple(old['kernel_shape'])} in the "
                f"checkpoint but {tuple(new['kernel_shape'])} here; the checkpoint was made "
                "for another base model."
            )
    for path in sorted(saved_paths):  # same architecture: are these the same weights?
        a, b = saved["modules"][path]["kernel_sample"], fresh["modules"][path]["kernel_sample"]
        if a is not None and b is not None and not np.allclose(a, b, rtol=_SAMPLE_RTOL, atol=1e-6):
            return (
                f"{path}: the base kernel's values differ from those the checkpoint was "
                f"trained on ({a[:3]}... there, {b[:3]}... here); load the same pretrained base."
            )
    return _signature_difference("adapter leaf", saved["arrays"], fresh["arrays"])


def _signature_difference(
    what: str, saved: Mapping[str, list], fresh: Mapping[str, list]
) -> str | None:
    for key in sorted(set(saved) | set(fresh)):
        if key not in fresh:
            return f"{what} {key!r} is in the checkpoint but not here."
        if key not in saved:
            return f"{what} {key!r} is here but not in the checkpoint."
        if saved[key] != fresh[key]:
            return (
                f"{what} {key!r} has shape/dtype {saved[key]} in the checkpoint but {fresh[key]} "
                "here."
            )
    return None


def check_compatible(saved: Mapping[str, Any], fresh: Mapping[str, Any]) -> None:
    """Raises if two `describe` results differ, naming the first difference.

    Raises:
        ValueError: other targets, another config field, another adapter
            class or kernel orientation, another base (kernel shape or
            values), or other adapter leaves (extra trainable, dtypes).
    """
    difference = _first_difference(saved, fresh)
    if difference is not None:
        raise ValueError(f"the checkpoint does not fit these params: {difference}")


def _rng_json(rng: PRNGKeyArray | None) -> dict[str, Any] | None:
    if rng is None:
        return None
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        impl = str(jax.random.key_impl(rng))
        data = jax.random.key_data(rng)
    else:
        impl, data = None, rng
    return {"impl": impl, "data": np.asarray(data).tolist(), "dtype": str(np.dtype(data.dtype))}


def _rng_from_json(saved: Mapping[str, Any] | None) -> PRNGKeyArray | None:
    if saved is None:
        return None
    data = jax.numpy.asarray(np.asarray(saved["data"], saved["dtype"]))
    return data if saved["impl"] is None else jax.random.wrap_key_data(data, impl=saved["impl"])


def _abstract(tree: Any) -> dict:
    return unflat({k: ocp.utils.to_shape_dtype_struct(v) for k, v in leaf_paths(tree).items()})


def _refill(template: Any, restored: Mapping) -> Any:
    leaves = flat(restored)
    treedef = jax.tree.structure(template)
    return jax.tree.unflatten(treedef, [leaves[key] for key in leaf_paths(template)])


class AdapterCheckpointer:
    """Saves and restores adapter training state in ``directory`` (Orbax).

    A thin layer over `orbax.checkpoint.CheckpointManager`: one sub-directory
    per step, the last ``max_to_keep`` kept. Temporary directories left by
    interrupted saves are never taken for steps; Orbax removes them in the
    background from the checkpointer's creation on (at the latest before its
    first save).

    Args:
        directory: where the steps live; created on the first save.
        max_to_keep: number of most recent steps kept (None keeps all).
        async_save: write in a background thread; `save` returns once the
            arrays are copied to host. Call `wait_until_finished` (or `close`)
            before relying on the files.

    Example:
        >>> ckpt = gl.AdapterCheckpointer("/tmp/run", max_to_keep=2)  # doctest: +SKIP
        >>> ckpt.save(step, gl.join(base, adapters), opt_state=opt_state, rng=rng,
        ...           data_position=step * batch_size)
        >>> params = gl.wrap(fresh_model.params, targets, config)  # same as at save
        >>> state = ckpt.restore(params, opt_state=tx.init(gl.split(params)[1]))
    """

    def __init__(
        self, directory: str | os.PathLike, *, max_to_keep: int | None = 3, async_save: bool = False
    ) -> None:
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=False,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def all_steps(self) -> list[int]:
        """The complete steps on disk, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete step, or None."""
        return self._manager.latest_step()

    def wait_until_finished(self) -> None:
        """Blocks until an asynchronous save has been written."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.close()

    def __enter__(self) -> AdapterCheckpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def save(
        self,
        step: int,
        params: Mapping,
        *,
        opt_state: Any = None,
        rng: PRNGKeyArray | None = None,
        data_position: Any = None,
    ) -> None:
        """Writes the adapter state of ``params`` at ``step``.

        Args:
            step: the training step (the checkpoint's name).
            params: the wrapped tree; only its adapter half is written, its base
                kernels give the fingerprint.
            opt_state: optimizer state to save alongside.
            rng: a PRNG key (typed or raw uint32) to resume the random stream.
            data_position: where the data stream stands (any JSON value, e.g.
                the number of examples consumed).
        """
        if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
            raise ValueError(f"step must be an integer ≥ 0, got step={step!r}.")
        latest = self.latest_step()
        if latest is not None and step <= latest:
            raise ValueError(
                f"step {step} is not after the latest saved step {latest} in {self.directory}, "
                "so it would not be written. Save with a larger step, or use a new directory "
                "(or delete the later steps) to start over."
            )
        adapters = split(params)[1]
        _check_finite("adapter", adapters)
        if opt_state is not None:
            _check_finite("optimizer state", opt_state)
        os.makedirs(self.directory, exist_ok=True)
        meta = {
            "format": FORMAT,
            **describe(params, adapters),
            "opt_state": None if opt_state is None else _signature(opt_state),
            "rng": _rng_json(rng),
            "data_position": data_position,
        }
        items = {
            "adapters": ocp.args.StandardSave(unflat(leaf_paths(adapters))),
            "meta": ocp.args.JsonSave(_json(meta)),
        }
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardSave(unflat(leaf_paths(opt_state)))
        if not self._manager.save(step, args=ocp.args.Composite(**items)):
            raise RuntimeError(f"orbax declined to save step {step} in {self.directory}.")

    def restore_latest(self, params: Mapping, *, opt_state: Any = None) -> Checkpoint:
        """`restore` of the newest step that reads, skipping corrupted ones.

        A step that fails to read (`CorruptCheckpointError`) is reported with
        a warning and the previous step is tried; once one restores, the
        unreadable newer steps are renamed ``<step>.corrupt`` so that the
        resumed run can save its steps again. A checkpoint that does not fit
        ``params`` is an error, as in `restore`.

        Raises:
            FileNotFoundError: no step on disk.
            CorruptCheckpointError: every step is corrupted.
        """
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint step in {self.directory}.")
        skipped = []
        for step in reversed(steps):
            try:
                restored = self.restore(params, opt_state=opt_state, step=step)
            except CorruptCheckpointError as err:
                warnings.warn(f"skipping step {step}: {err}", stacklevel=2)
                skipped.append(step)
                continue
            self._set_aside(skipped)
            return restored
        raise CorruptCheckpointError(
            f"every checkpoint step in {self.directory} is corrupted ({steps}); start a fresh "
            "run in a new directory."
        )

    def _set_aside(self, steps: list[int]) -> None:
        """Renames unreadable steps to ``<step>.corrupt`` (kept for inspection), so
        the run resumed from an older step can save those step numbers again."""
        for step in steps:
            source = os.path.join(self.directory, str(step))
            target, n = f"{source}.corrupt", 1
            while os.path.exists(target):
                target, n = f"{source}.corrupt{n}", n + 1
            os.rename(source, target)
            warnings.warn(f"moved the unreadable step {step} to {target}", stacklevel=3)
        if steps:
            self._manager.reload()

    def restore(
        self, params: Mapping, *, opt_state: Any = None, step: int | None = None
    ) -> Checkpoint:
        """Reads a step onto freshly wrapped ``params``.

        Args:
            params: the base wrapped exactly as when saving (same targets,
                configs and extra trainable leaves); a `jax.eval_shape` tree
                works too (the base values are then not checked).
            opt_state: a template of the optimizer state (e.g.
                ``tx.init(split(params)[1])``); None skips it.
            step: which step; default the latest.

        Returns:
            The `Checkpoint`.

        Raises:
            FileNotFoundError: no such directory or step.
            ValueError: the checkpoint does not fit ``params`` or ``opt_state``
                (the message names the first difference).
            CorruptCheckpointError: the step cannot be read (a `ValueError`;
                `restore_latest` falls back to the previous step).
        """
        self.wait_until_finished()
        steps = self.all_steps()
        step = steps[-1] if step is None and steps else step
        if step not in steps:
            raise FileNotFoundError(
                f"no checkpoint step {step} in {self.directory}; complete steps: {steps or 'none'}."
            )
        where = os.path.join(self.directory, str(step))
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            meta = meta["meta"]
        except Exception as err:
            raise CorruptCheckpointError(
                f"checkpoint {where} has no readable metadata ({type(err).__name__}: {err}); it is "
                f"corrupted. Restore another step (complete steps: {steps})."
            ) from err
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise CorruptCheckpointError(
                f"{where} is not a genlora_jax adapter checkpoint ({FORMAT}); move it out of "
                "the checkpoint directory."
            )
        base, adapters = split(params)
        check_compatible(meta, describe(params, adapters))
        items = {"adapters": ocp.args.StandardRestore(_abstract(adapters))}
        if opt_state is not None:
            if meta["opt_state"] is None:
                raise ValueError(
                    f"checkpoint {where} holds no optimizer state; pass opt_state=None."
                )
            difference = _signature_difference(
                "optimizer state leaf", meta["opt_state"], _signature(opt_state)
            )
            if difference is not None:
                raise ValueError(
                    f"the checkpoint's optimizer state does not fit: {difference} Build the "
                    "template with the optimizer used for training."
                )
            items["opt_state"] = ocp.args.StandardRestore(_abstract(opt_state))
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as err:
            raise CorruptCheckpointError(
                f"checkpoint {where} could not be read ({type(err).__name__}: {err}); it is "
                f"corrupted. Restore another step (complete steps: {steps})."
            ) from err
        return Checkpoint(
            params=join(base, _refill(adapters, restored["adapters"])),
            opt_state=None if opt_state is None else _refill(opt_state, restored["opt_state"]),
            step=step,
            rng=_rng_from_json(meta["rng"]),
            data_position=meta["data_position"],
        )
