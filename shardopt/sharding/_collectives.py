"""Explicit per-device collectives, and the shard_map gradient path of a plan.

XLA:CPU turns a GSPMD reduce-scatter into an all-reduce plus a slice, so the
collectives a ZeRO stage promises are written out here with ``shard_map``:
``psum_scatter`` (a real reduce-scatter on every backend) for stages 2 and 3,
``all_gather`` of the partitioned parameters for stage 3.
"""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec
from jaxtyping import PyTree

from .._tree import is_trainable, path_str, trainable

AxisNames = str | tuple[str, ...]


def _size(axis_name: AxisNames) -> int:
    names = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
    size = 1
    for name in names:
        size *= jax.lax.axis_size(name)
    return size


def _unexplicit(x: jax.Array) -> tuple[jax.Array, PartitionSpec | None]:
    """Drop Explicit (non-manual) axes from ``x``'s type; psum_scatter needs it."""
    spec = getattr(jax.typeof(x).sharding, "spec", None)
    if spec is None or all(e is None for e in spec):
        return x, None
    return jax.sharding.reshard(x, PartitionSpec()), spec


def all_reduce_mean(tree: PyTree, axis_name: AxisNames) -> PyTree:
    """The mean over ``axis_name`` of every leaf (``psum / n``), inside shard_map.

    The data-parallel gradient reduction of ZeRO stages 0 and 1.
    """

    def one(x):
        if x is None:
            return None
        n = _size(axis_name)
        return jax.lax.psum(x, axis_name) / jnp.asarray(n, x.dtype)

    return jax.tree.map(one, tree)


def reduce_scatter_mean(tree: PyTree, axis_name: AxisNames, dims: PyTree) -> PyTree:
    """Reduce-scatter every leaf over ``axis_name`` on its dim in ``dims``, as a mean.

    ``dims`` is a tree like ``tree`` of ints (the dim to scatter, e.g. from
    :meth:`ShardingPlan.scatter_dims`) or None (that leaf is all-reduced
    instead). Each device keeps its block: ``psum_scatter(..., tiled=True) / n``.
    """

    def one(x, dim):
        if x is None:
            return None
        if dim is None:
            return all_reduce_mean(x, axis_name)
        x, spec = _unexplicit(x)
        n = _size(axis_name)
        out = jax.lax.psum_scatter(x, axis_name, scatter_dimension=dim, tiled=True)
        out = out / jnp.asarray(n, out.dtype)
        return out if spec is None else jax.sharding.reshard(out, spec)

    return jax.tree.map(one, tree, dims, is_leaf=lambda x: x is None)


def all_gather(tree: PyTree, axis_name: AxisNames, dims: PyTree) -> PyTree:
    """All-gather every leaf over ``axis_name`` on its dim in ``dims`` (None: as is)."""

    def one(x, dim):
        if x is None or dim is None:
            return x
        return jax.lax.all_gather(x, axis_name, axis=dim, tiled=True)

    return jax.tree.map(one, tree, dims, is_leaf=lambda x: x is None)


def _varying(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """Mark ``x`` as differing per shard, so its gradient stays local.

    The gradient of a shard-invariant input is psum'd by autodiff (the
    transpose of the implicit broadcast); we reduce explicitly instead.
    """
    varying = jax.typeof(x).manual_axis_type.varying
    missing = tuple(a for a in axes if a not in varying)
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def _manual(spec: PartitionSpec, data_axes: tuple[str, ...]) -> PartitionSpec:
    """Only the data-axis entries of ``spec`` (shard_map names manual axes only)."""
    out = []
    for entry in spec:
        axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
        kept = tuple(a for a in axes if a in data_axes)
        out.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    return PartitionSpec(*out)


def value_and_grad(plan, loss_fn: Callable, *, has_aux: bool = False) -> Callable:
    """``loss_fn``'s value and gradients, computed per data shard with the plan's
    collectives written out.

    ``loss_fn(params, *batch)`` returns the mean loss of a batch (and aux with
    ``has_aux``). The returned function takes ``(params, *batch)`` with the
    parameters in the plan's layout (:meth:`ShardingPlan.shard_params`) and
    batch arrays whose leading dim the data-parallel size divides; it runs
    ``loss_fn`` under ``shard_map`` over the data axes on each shard of the
    batch (other mesh axes stay automatic, so tensor-parallel layouts keep
    working) and returns ``(loss, grads)`` — ``((loss, aux), grads)`` with
    ``has_aux``, a floating aux averaged over the shards like the loss) where:

    - stage 3 first all-gathers the partitioned parameters (explicitly);
    - stages 0 and 1 all-reduce the gradients (mean over the data axes);
    - stages 2 and 3 reduce-scatter them straight into the state layout.

    ``grads`` has the tree of ``params`` with None at non-trainable leaves, and
    the plan's gradient layout. Reduction order differs from a single-device
    mean, so results match it to rounding, not bitwise.
    """
    data_axes = plan.data_axes
    axis = data_axes[0] if len(data_axes) == 1 else data_axes

    def wrapped(params, *batch):
        tp = trainable(params)
        rest = jax.tree.map(lambda x: None if is_trainable(x) else x, params)
        layout = plan.layout(params)
        leaves, treedef = jax.tree_util.tree_flatten_with_path(tp)
        names = [path_str(p) for p, _ in leaves]
        arrays = [x for _, x in leaves]
        stored = [
            layout[n].partitioned if plan.stage >= 3 else layout[n].base for n in names
        ]
        grad_spec = [
            layout[n].partitioned if plan.stage >= 2 else layout[n].base for n in names
        ]
        gather = [layout[n].dim if plan.stage >= 3 else None for n in names]
        scatter = [layout[n].dim if plan.stage >= 2 else None for n in names]
        for leaf in jax.tree.leaves(batch):
            if leaf.shape[0] % plan.data_size:
                raise ValueError(
                    f"a batch leaf of shape {tuple(leaf.shape)} has a leading dim "
                    f"that the data axes {data_axes} (size {plan.data_size}) do "
                    "not divide"
                )
        batch_spec = jax.tree.map(lambda _: PartitionSpec(axis), batch)

        def local(arrays, batch):
            full = [_varying(x, data_axes) for x in all_gather(arrays, axis, gather)]

            def loss_of(full):
                model = eqx.combine(jax.tree.unflatten(treedef, full), rest)
                return loss_fn(model, *batch)

            value, grads = jax.value_and_grad(loss_of, has_aux=has_aux)(full)
            grads = reduce_scatter_mean(grads, axis, scatter)
            value = all_reduce_mean(value, axis)
            return value, grads

        value, grads = jax.shard_map(
            local,
            mesh=plan.mesh,
            in_specs=([_manual(s, data_axes) for s in stored], batch_spec),
            out_specs=(PartitionSpec(), [_manual(s, data_axes) for s in grad_spec]),
            axis_names=set(data_axes),
        )(arrays, batch)
        return value, jax.tree.unflatten(treedef, grads)

    return wrapped
