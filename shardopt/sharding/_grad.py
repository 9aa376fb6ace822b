"""The plan's gradient path: the loss per data shard under ``shard_map``, with the
reduction (all-reduce, or reduce-scatter into the state layout) written out."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import equinox as eqx
import jax
from jax.sharding import PartitionSpec

from .._tree import is_trainable, path_str, trainable
from ._collectives import _reduce_scatter_leaves, all_reduce_mean

if TYPE_CHECKING:
    from ._plan import ShardingPlan


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


def _only_data_axes(spec: PartitionSpec, data_axes: tuple[str, ...]) -> bool:
    """True when ``spec`` shards over no mesh axis but the data axes."""
    return _manual(spec, data_axes) == spec


def value_and_grad(
    plan: ShardingPlan, loss_fn: Callable, *, has_aux: bool = False
) -> Callable:
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

    - stage 3 first gathers the partitioned parameters into their own layout,
      with a sharding constraint (an all-gather; measured faster on XLA:CPU
      than ``all_gather`` inside the ``shard_map``), so the loss sees whole
      parameters and the numbers are stage 0's;
    - stages 0 and 1 all-reduce the gradients (mean over the data axes);
    - stages 2 and 3 reduce-scatter them straight into the state layout.

    Gradients under ``plan.bucket_bytes`` that are not tensor-parallel share
    their reduce-scatters (see :func:`reduce_scatter_mean`).

    ``grads`` has the tree of ``params`` with None at non-trainable leaves, and
    the plan's gradient layout. Reduction order differs from a single-device
    mean, so results match it to rounding, not bitwise.
    """
    data_axes = plan.data_axes
    axis = data_axes[0] if len(data_axes) == 1 else data_axes
    bucket = plan.bucket_bytes

    def wrapped(params, *batch):
        tp = trainable(params)
        rest = jax.tree.map(lambda x: None if is_trainable(x) else x, params)
        layout = plan.layout(params)
        leaves, treedef = jax.tree_util.tree_flatten_with_path(tp)
        names = [path_str(p) for p, _ in leaves]
        arrays = [x for _, x in leaves]
        base = [layout[n].base for n in names]
        if plan.stage >= 3:  # FSDP: whole parameters for use
            whole = [plan.sharding(s) for s in base]
            arrays = plan.constrain(arrays, whole)
        grad_spec = [
            layout[n].partitioned if plan.stage >= 2 else s
            for n, s in zip(names, base, strict=True)
        ]
        scatter = [layout[n].dim if plan.stage >= 2 else None for n in names]
        # a leaf sharded over other (tensor-parallel) axes is moved on its own
        packable = [_only_data_axes(s, data_axes) for s in base]
        for leaf in jax.tree.leaves(batch):
            if leaf.shape[0] % plan.data_size:
                raise ValueError(
                    f"a batch leaf of shape {tuple(leaf.shape)} has a leading dim "
                    f"that the data axes {data_axes} (size {plan.data_size}) do "
                    "not divide"
                )
        batch_spec = jax.tree.map(lambda _: PartitionSpec(axis), batch)

        def local(arrays, batch):
            full = [_varying(x, data_axes) for x in arrays]

            def loss_of(full):
                model = eqx.combine(jax.tree.unflatten(treedef, full), rest)
                return loss_fn(model, *batch)

            value, grads = jax.value_and_grad(loss_of, has_aux=has_aux)(full)
            grads = _reduce_scatter_leaves(grads, axis, scatter, packable, bucket)
            value = all_reduce_mean(value, axis)
            return value, grads

        value, grads = jax.shard_map(
            local,
            mesh=plan.mesh,
            in_specs=([_manual(s, data_axes) for s in base], batch_spec),
            out_specs=(PartitionSpec(), [_manual(s, data_axes) for s in grad_spec]),
            axis_names=set(data_axes),
        )(arrays, batch)
        return value, jax.tree.unflatten(treedef, grads)

    return wrapped
