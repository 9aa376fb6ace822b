"""``zero``: the constructor of a ZeRO sharding plan, its arguments checked."""

from __future__ import annotations

from collections.abc import Mapping

from jax.sharding import Mesh, PartitionSpec

from .._hyperparams import as_count
from ._collectives import BUCKET_BYTES
from ._offload import offload_kind
from ._plan import ShardingPlan


def zero(
    stage: int,
    mesh: Mesh,
    data_axes: str | tuple[str, ...] = ("data",),
    *,
    min_size: int = 1024,
    strict: bool = False,
    overrides: Mapping[str, PartitionSpec] | None = None,
    bucket_bytes: int = BUCKET_BYTES,
    offload_state: bool | str = False,
) -> ShardingPlan:
    """A ZeRO sharding plan: stage 0 (data parallel) to 3 (FSDP) on ``mesh``.

    Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion
    Parameter Models", SC 2020.

    Arguments:
        stage: 0 state like the parameters; 1 state partitioned over the data
            axes; 2 gradients too (reduce-scatter); 3 parameters too.
        mesh: a ``jax.sharding.Mesh`` (Auto axes) or ``jax.make_mesh`` result
            (Explicit axes).
        data_axes: the mesh axes the batch is split over; the state is
            partitioned over all of them together.
        min_size: leaves with fewer elements stay in the parameter layout.
        strict: raise instead of reporting when a leaf cannot be partitioned.
        overrides: ``{path: PartitionSpec}``; a parameter path sets that
            parameter's partitioned layout (``Z``), a state path (as
            :meth:`ShardingPlan.state_layout` prints it) that state leaf's.
        bucket_bytes: in :meth:`ShardingPlan.value_and_grad` at stages 2-3,
            gradients smaller than this share one reduce-scatter per bucket of
            at most this size; 0 gives each gradient its own.
        offload_state: keep the optimizer state in host memory between steps
            (``True``: ``"pinned_host"``; a string names the memory kind); the
            step updates it in device memory. Raises if a device lacks it.

    Example::

        mesh = jax.make_mesh((4, 2), ("data", "model"))
        plan = shardopt.zero(1, mesh, min_size=0)
        params = plan.shard_params({"w": jnp.ones((8, 4))})
        opt = shardopt.Optimizer(shardopt.adamw(1e-3), params, plan=plan)
        print(plan.memory_report(params, opt))
    """
    if isinstance(data_axes, str):
        data_axes = (data_axes,)
    items = tuple(sorted((overrides or {}).items()))
    for name, spec in items:
        if not isinstance(spec, PartitionSpec):
            raise TypeError(
                f"override for {name} must be a PartitionSpec, got {spec!r}"
            )
    return ShardingPlan(
        as_count(stage, name="stage", high=3),
        mesh,
        tuple(data_axes),
        min_size=as_count(min_size, name="min_size"),
        strict=bool(strict),
        overrides=items,
        bucket_bytes=as_count(bucket_bytes, name="bucket_bytes"),
        state_memory_kind=offload_kind(offload_state),
    )
