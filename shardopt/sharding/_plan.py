"""The ZeRO plan: from the parameters' own layouts to every leaf's sharding.

Everything here works on shapes and PartitionSpecs only (arrays, tracers and
``jax.ShapeDtypeStruct`` leaves alike), so a plan can be inspected, and an
abstract optimizer built, before anything is allocated.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
from jaxtyping import PyTree

from .._tree import describe, path_str, trainable
from ._collectives import BUCKET_BYTES
from ._grad import value_and_grad as _value_and_grad
from ._memory import MemoryReport
from ._memory import memory_report as _memory_report
from ._offload import check_memory_kind, is_host_memory, with_memory_kind
from ._specs import (
    LeafLayout,
    axes_of,
    data_dim,
    device_ids,
    leaf_path_names,
    mesh_of,
    normalise,
    pick,
    replace_trainable,
    same_mesh,
    spec_lookup,
    strip_axes,
    with_sharding_constraint,
)
from ._state import (
    StateLeaf,
    place_state,
)

_STAGES = (0, 1, 2, 3)

_NO_DATA_AXIS = (
    "the mesh has no axis named {axis!r} (its axes are {names}); pass the name of "
    "the data-parallel axis as data_axes=(...), e.g. shardopt.zero(1, mesh, "
    "data_axes=({first!r},))"
)
_OTHER_MESH = (
    "the {what} at {path} ({desc}) is laid out on a mesh with axes {got} and "
    "devices {got_devices}, but the plan is for the mesh with axes {want} and "
    "devices {want_devices}; move it onto the plan's mesh first (e.g. "
    "plan.shard_params(params)) or build the plan on the mesh it lives on"
)
_STRICT = (
    "strict plan: the {what} at {path} ({desc}) is not partitioned over the data "
    "axes {axes} (size {size}): {reason}. Pad the leaf, pick another data axis, "
    "give an override, or use strict=False to keep it in the parameter layout "
    "(it is then listed in the report)"
)
_NOTHING = (
    "ZeRO stage {stage} on data axes {axes} (size {size}) partitioned none of the "
    "{n} trainable leaves, so it would do exactly what stage 0 does:\n{why}\n"
    "Lower min_size, use data axes of another size, or use stage 0 on purpose"
)


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
    """A ZeRO layout for parameters, gradients and optimizer state on a mesh.

    Built by :func:`shardopt.zero`. Immutable and hashable, so it can be a static
    field of a Module and a ``jit`` static argument. All methods take the
    parameters (arrays, ``ShapeDtypeStruct`` s, or an Equinox model) and read
    each leaf's own sharding: a ``NamedSharding`` on the plan's mesh, else
    replicated; ``specs`` (a tree of PartitionSpecs like the parameters) gives
    the tensor-parallel layout of leaves that carry none.

    Stage rules (``L`` = the leaf's own layout, ``Z`` = ``L`` plus the data axes
    on the largest dim they divide that ``L`` does not shard):

    ======  ==========  ==========  ===============
    stage   parameters  gradients   mirrored state
    ======  ==========  ==========  ===============
    0       L           L           L
    1       L           L           Z
    2       L           Z           Z
    3       Z           Z           Z
    ======  ==========  ==========  ===============

    ``state_memory_kind``: the state's memory between steps (``offload_state``).
    """

    stage: int
    mesh: Mesh
    data_axes: tuple[str, ...]
    min_size: int = 1024
    strict: bool = False
    overrides: tuple[tuple[str, PartitionSpec], ...] = ()
    bucket_bytes: int = BUCKET_BYTES
    bound: tuple[tuple[str, tuple[int, ...], PartitionSpec], ...] | None = None
    state_memory_kind: str | None = None

    def __post_init__(self):
        if self.stage not in _STAGES:
            raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {self.stage!r}")
        if not isinstance(self.mesh, Mesh):
            raise TypeError(
                f"the plan needs a jax.sharding.Mesh (jax.make_mesh or "
                f"jax.sharding.Mesh), got {type(self.mesh).__name__}"
            )
        if not self.data_axes:
            raise ValueError("data_axes is empty; name at least one mesh axis")
        for axis in self.data_axes:
            if axis not in self.mesh.axis_names:
                raise ValueError(
                    _NO_DATA_AXIS.format(
                        axis=axis,
                        names=self.mesh.axis_names,
                        first=self.mesh.axis_names[0],
                    )
                )
        if len(set(self.data_axes)) != len(self.data_axes):
            raise ValueError(f"data_axes repeats an axis: {self.data_axes}")
        if self.bucket_bytes < 0:
            raise ValueError(f"bucket_bytes must be >= 0, got {self.bucket_bytes}")
        if self.state_memory_kind is not None:
            check_memory_kind(self.state_memory_kind, self.mesh)

    # ------------------------------------------------------------------ basics
    @property
    def data_size(self) -> int:
        """The number of data-parallel shards: the product of the data axes."""
        return math.prod(self.mesh.shape[a] for a in self.data_axes)

    @property
    def explicit(self) -> bool:
        """True when the mesh has Explicit axes (``jax.make_mesh``'s default)."""
        return any(t == AxisType.Explicit for t in self.mesh.axis_types)

    def sharding(self, spec: PartitionSpec) -> NamedSharding:
        """``NamedSharding(plan.mesh, spec)``."""
        return NamedSharding(self.mesh, spec)

    def replicated(self) -> NamedSharding:
        """The fully replicated sharding on the plan's mesh (counts, scalars)."""
        return NamedSharding(self.mesh, PartitionSpec())

    # ------------------------------------------------------------------ layout
    def bind(self, params: PyTree, specs: PyTree | None = None) -> ShardingPlan:
        """This plan with the parameters' own layouts recorded in it.

        Under ``jit`` on a mesh with Auto axes a traced parameter does not
        carry its sharding, so the plan reads it once, here, from concrete
        arrays (or ShapeDtypeStructs with shardings, or ``specs``).
        :class:`shardopt.Optimizer` binds its plan: use ``opt.plan`` inside a
        jitted step (``opt.plan.value_and_grad(loss)``). A bound plan given
        other parameters raises, naming the leaf.
        """
        unbound = dataclasses.replace(self, bound=None)
        spec_of = spec_lookup(specs)
        flat = jax.tree_util.tree_flatten_with_path(trainable(params))[0]
        bound = []
        for path, leaf in flat:
            name = path_str(path)
            own = unbound._base_spec(name, leaf, spec_of(name))
            bound.append((name, tuple(leaf.shape), own))
        bound = tuple(bound)
        unbound.layout(params, specs)  # validate now (strict, shapes)
        return dataclasses.replace(self, bound=bound)

    def layout(self, params: PyTree, specs: PyTree | None = None) -> dict:
        """``{path: LeafLayout}`` for every trainable leaf of ``params``.

        A leaf's own spec ``L`` is its sharding (or ``specs``, or what the plan
        was bound to). When ``L`` already uses the data axes (parameters stored
        for stage 3), that placement is kept as ``Z`` and ``L`` is it without
        the data axes.
        """
        tp = trainable(params)
        flat, _ = jax.tree_util.tree_flatten_with_path(tp)
        spec_of = spec_lookup(specs)
        overrides = dict(self.overrides)
        if self.bound is not None and specs is None:
            self._check_bound(flat)
        out = {}
        for path, leaf in flat:
            name = path_str(path)
            own = self._base_spec(name, leaf, spec_of(name))
            base = strip_axes(own, self.data_axes)
            if name in overrides:
                spec = normalise(overrides[name], len(leaf.shape), name)
                dim = data_dim(spec, self.data_axes)
                out[name] = LeafLayout(
                    name, tuple(leaf.shape), leaf.dtype, base, spec, dim, None
                )
                continue
            if base != own:
                dim = data_dim(own, self.data_axes)
                out[name] = LeafLayout(
                    name, tuple(leaf.shape), leaf.dtype, base, own, dim, None
                )
                continue
            spec, dim, reason = self.zero_spec(base, tuple(leaf.shape))
            if reason is not None and self.strict and self.stage >= 1:
                raise ValueError(
                    _STRICT.format(
                        what="parameter",
                        path=name,
                        desc=describe(leaf),
                        axes=self.data_axes,
                        size=self.data_size,
                        reason=reason,
                    )
                )
            out[name] = LeafLayout(
                name, tuple(leaf.shape), leaf.dtype, base, spec, dim, reason
            )
        return out

    def _check_bound(self, flat: list) -> None:
        bound = {name: shape for name, shape, _ in self.bound}
        got = {path_str(p): tuple(x.shape) for p, x in flat}
        problems = [
            f"  {name}: the plan has {bound[name]}, the parameter is {got[name]}"
            for name in sorted(set(bound) & set(got))
            if bound[name] != got[name]
        ]
        problems += [f"  {n}: not in the plan" for n in sorted(set(got) - set(bound))]
        problems += [
            f"  {n}: in the plan, not among the parameters"
            for n in sorted(set(bound) - set(got))
        ]
        if problems:
            raise ValueError(
                "this plan was bound to other parameters (shardopt.Optimizer and "
                "ShardingPlan.bind record the parameters' layout):\n"
                + "\n".join(problems)
                + "\nBuild the optimizer for these parameters, or bind the plan "
                "again."
            )

    def _bound_specs(self) -> dict[str, PartitionSpec]:
        """``{path: spec}`` of the bound parameters, built once per plan (a
        plan is immutable; a traced step asks for every leaf's spec)."""
        index = self.__dict__.get("_bound_index")
        if index is None:
            index = {n: spec for n, _, spec in self.bound}
            object.__setattr__(self, "_bound_index", index)
        return index

    def _base_spec(self, name: str, leaf: Any, given: Any) -> PartitionSpec:
        ndim = len(leaf.shape)
        if given is None and self.bound is not None:
            given = self._bound_specs()[name]
        elif (
            given is None
            and isinstance(leaf, jax.core.Tracer)
            and mesh_of(leaf) is None
            and not self.explicit
        ):
            raise ValueError(
                f"the parameter at {name} ({describe(leaf)}) is traced and carries "
                "no sharding (Auto mesh axes), so the plan cannot read its layout; "
                "use a bound plan inside jit: opt.plan (the Optimizer binds it) or "
                "plan.bind(params) called outside jit"
            )
        if given is not None:
            spec = given.spec if isinstance(given, NamedSharding) else given
            if isinstance(given, NamedSharding):
                self._check_mesh(given.mesh, "parameter", name, leaf)
        elif isinstance(sharding := _sharding_of(leaf, self.explicit), NamedSharding):
            self._check_mesh(sharding.mesh, "parameter", name, leaf)
            spec = sharding.spec
        else:
            spec = PartitionSpec()
        spec = normalise(spec, ndim, name)
        for entry in spec:
            for axis in axes_of(entry):
                if axis not in self.mesh.axis_names:
                    raise ValueError(
                        f"the parameter at {name} ({describe(leaf)}) is sharded "
                        f"over axis {axis!r}, which the plan's mesh "
                        f"{dict(self.mesh.shape)} does not have"
                    )
        return spec

    def _check_mesh(self, mesh: Any, what: str, name: str, leaf: Any) -> None:
        if not same_mesh(mesh, self.mesh):
            raise ValueError(
                _OTHER_MESH.format(
                    what=what,
                    path=name,
                    desc=describe(leaf),
                    got=dict(mesh.shape),
                    got_devices=device_ids(mesh),
                    want=dict(self.mesh.shape),
                    want_devices=device_ids(self.mesh),
                )
            )

    def zero_spec(
        self, base: PartitionSpec, shape: tuple[int, ...], exclude: tuple[int, ...] = ()
    ) -> tuple[PartitionSpec, int | None, str | None]:
        """Add the free data axes to the largest dim they divide (ZeRO rule),
        never to the dims in ``exclude``."""
        used = {a for entry in base for a in axes_of(entry)}
        free = tuple(a for a in self.data_axes if a not in used)
        if not free:
            return base, data_dim(base, self.data_axes), "already sharded on data"
        size = math.prod(self.mesh.shape[a] for a in free)
        if size == 1:
            return base, None, "the data axes have size 1"
        if not shape:
            return base, None, "scalar"
        if math.prod(shape) == 0:  # and jax 0.10 mis-shapes such shards on CPU
            return base, None, "zero-size: nothing to partition"
        if math.prod(shape) < self.min_size:
            return base, None, f"smaller than min_size={self.min_size} elements"
        fits = [
            d
            for d, n in enumerate(shape)
            if base[d] is None and n % size == 0 and n >= size and d not in exclude
        ]
        if not fits:
            return base, None, f"no unsharded dim is divisible by {size}"
        dim = max(fits, key=lambda d: (shape[d], -d))
        entries = list(base)
        entries[dim] = free[0] if len(free) == 1 else free
        return PartitionSpec(*entries), dim, None

    # ------------------------------------------------------------ per role
    def param_specs(self, params: PyTree, specs: PyTree | None = None) -> PyTree:
        """PartitionSpecs of the parameters as stored (``Z`` at stage 3, else ``L``)."""
        return self._role_specs(params, specs, self.stage >= 3)

    def grad_specs(self, params: PyTree, specs: PyTree | None = None) -> PyTree:
        """PartitionSpecs of the gradients (``Z`` from stage 2, else ``L``)."""
        return self._role_specs(params, specs, self.stage >= 2)

    def mirror_specs(self, params: PyTree, specs: PyTree | None = None) -> PyTree:
        """PartitionSpecs of state that mirrors the parameters (``Z`` from stage 1)."""
        return self._role_specs(params, specs, self.stage >= 1)

    def _role_specs(self, params, specs, partitioned: bool) -> PyTree:
        layout = self.layout(params, specs)
        tp = trainable(params)
        return jax.tree_util.tree_map_with_path(
            lambda p, _: pick(layout[path_str(p)], partitioned), tp
        )

    def param_shardings(self, params: PyTree, specs: PyTree | None = None) -> PyTree:
        """NamedShardings of the trainable parameters as stored (None elsewhere)."""
        return self._to_shardings(self.param_specs(params, specs))

    def grad_shardings(self, params: PyTree, specs: PyTree | None = None) -> PyTree:
        """NamedShardings the gradients are reduced into."""
        return self._to_shardings(self.grad_specs(params, specs))

    def mirror_shardings(self, params: PyTree, specs: PyTree | None = None) -> PyTree:
        """NamedShardings of state that mirrors the parameters (moments,
        gradient accumulators): partitioned from stage 1."""
        return self._to_shardings(self.mirror_specs(params, specs))

    def _to_shardings(self, specs: PyTree) -> PyTree:
        return jax.tree.map(
            self.sharding, specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
        )

    def abstract_params(self, params: PyTree, specs: PyTree | None = None) -> PyTree:
        """The parameters' target layout as ``ShapeDtypeStruct`` s with shardings.

        ``params`` may be arrays, ``ShapeDtypeStruct`` s or a model; the result
        has the same tree, with every trainable leaf replaced by a
        ``jax.ShapeDtypeStruct(shape, dtype, sharding=...)`` in the layout the
        plan stores parameters in (partitioned at stage 3). Restore a
        checkpoint onto it, or ``jax.jit(init, out_shardings=...)`` into it.
        Non-trainable leaves are returned unchanged.
        """
        shardings = self.param_shardings(params, specs)
        return replace_trainable(
            params,
            shardings,
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        )

    def shard_params(self, params: PyTree, specs: PyTree | None = None) -> PyTree:
        """``params`` moved into the plan's parameter layout (``jax.device_put``)."""
        shardings = self.param_shardings(params, specs)
        return replace_trainable(params, shardings, jax.device_put)

    # ------------------------------------------------------------------ state
    def state_layout(self, state: PyTree, params: PyTree) -> list[StateLeaf]:
        """How every array leaf of an optimizer state is placed, with the reason.

        A leaf whose key path ends with a trainable parameter's path is placed
        from that parameter: a *mirror* (same shape) like the mirrored state,
        a *factored* leaf (declared with :class:`FactoredState`, or reduced
        with size-1 dims) on the dims it keeps. Anything else (counts,
        scalars, leaves of no parameter) is replicated; under a strict plan a
        leaf of at least ``min_size`` elements that matches no parameter is
        an error naming its path.
        """
        return place_state(self, state, params)

    def state_specs(self, state: PyTree, params: PyTree) -> PyTree:
        """PartitionSpecs for every array leaf of ``state`` (same tree)."""
        specs = [leaf.spec for leaf in self.state_layout(state, params)]
        return jax.tree.unflatten(jax.tree.structure(state), specs)

    def state_shardings(
        self, state: PyTree, params: PyTree, memory_kind: str | None = None
    ) -> PyTree:
        """NamedShardings for every array leaf of ``state`` (same tree), in
        ``memory_kind`` (default: where the plan keeps the state)."""
        shardings = self._to_shardings(self.state_specs(state, params))
        return with_memory_kind(shardings, memory_kind or self.state_memory_kind)

    def check_overrides(self, params: PyTree, state: PyTree) -> None:
        """Raise if an override names a leaf that neither tree has."""
        known = set(leaf_path_names(trainable(params))) | set(leaf_path_names(state))
        unknown = [name for name, _ in self.overrides if name not in known]
        if unknown:
            raise ValueError(
                f"the plan overrides {', '.join(unknown)}, which are neither "
                "trainable parameters nor state leaves here: was the plan built "
                f"for other parameters? Known paths: {', '.join(sorted(known))}"
            )

    def check_partitions_something(self, params: PyTree) -> None:
        """Raise if a stage >= 1 plan would partition no leaf of ``params``."""
        if self.stage == 0:
            return
        layout = self.layout(params)
        if layout and all(leaf.dim is None for leaf in layout.values()):
            why = "\n".join(
                f"  {leaf.path} {describe(leaf)}: {leaf.reason}"
                for leaf in layout.values()
            )
            raise ValueError(
                _NOTHING.format(
                    stage=self.stage,
                    axes=self.data_axes,
                    size=self.data_size,
                    n=len(layout),
                    why=why,
                )
            )

    # ------------------------------------------------------------- applying
    def constrain(self, tree: PyTree, shardings: PyTree) -> PyTree:
        """Lay ``tree`` out as ``shardings`` (a tree of NamedShardings or None).

        Uses ``jax.lax.with_sharding_constraint`` on meshes with Auto axes and
        ``jax.sharding.reshard`` on Explicit ones; works inside and outside jit.
        A sharding in host memory (offloaded state) is a ``jax.device_put``.
        """
        apply = jax.sharding.reshard if self.explicit else with_sharding_constraint

        def one(x, s):
            if x is None or s is None:
                return x
            return (jax.device_put if is_host_memory(s.memory_kind) else apply)(x, s)

        return jax.tree.map(
            one, tree, shardings, is_leaf=lambda x: x is None or eqx.is_array(x)
        )

    def replicate(self, tree: PyTree) -> PyTree:
        """Every array leaf of ``tree`` placed replicated on the plan's mesh.

        For hyperparameters and other small leaves that every device needs. A
        concrete array (single-device, numpy, or on another layout) is copied
        from its host value into ``NamedSharding(mesh, P())`` with
        ``jax.make_array_from_callback``, which works when the mesh spans
        several processes (each process gives its own, equal, value); a
        ``ShapeDtypeStruct`` gets that sharding; a traced leaf is constrained
        to it. Non-array leaves are returned unchanged.
        """
        target = self.replicated()

        def one(x):
            if isinstance(x, jax.ShapeDtypeStruct):
                return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=target)
            if not eqx.is_array(x):
                return x
            if isinstance(x, jax.core.Tracer):
                return self.constrain(x, target)
            sharding = getattr(x, "sharding", None)
            if (
                isinstance(sharding, NamedSharding)
                and same_mesh(sharding.mesh, self.mesh)
                and sharding.mesh.axis_types == self.mesh.axis_types
                and sharding.is_fully_replicated
            ):
                return x
            if isinstance(x, jax.Array) and not x.is_fully_addressable:
                # already global (another layout): reshard on device.
                return jax.jit(lambda v: v, out_shardings=target)(x)
            host = np.asarray(x)
            return jax.make_array_from_callback(
                host.shape, target, lambda index: host[index]
            )

        return jax.tree.map(one, tree)

    def check_on_mesh(self, tree: PyTree, what: str) -> None:
        """Raise if a leaf of ``tree`` is laid out on a mesh other than the plan's.

        Concrete arrays are checked by their ``sharding``; traced arrays on
        Explicit meshes by their type. Single-device and Auto-traced leaves
        carry no mesh and pass.
        """
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            mesh = mesh_of(leaf)
            if mesh is not None and not same_mesh(mesh, self.mesh):
                self._check_mesh(mesh, what, path_str(path), leaf)

    def scatter_dims(self, params: PyTree) -> PyTree:
        """Per trainable leaf, the dim the data axes partition (None if none)."""
        layout = self.layout(params)
        return jax.tree_util.tree_map_with_path(
            lambda p, _: layout[path_str(p)].dim, trainable(params)
        )

    def value_and_grad(self, loss_fn: Callable, *, has_aux: bool = False):
        """``loss_fn``'s value and gradients, with the plan's collectives made explicit.

        See :func:`shardopt.sharding.value_and_grad`.
        """
        return _value_and_grad(self, loss_fn, has_aux=has_aux)

    def memory_report(self, params: PyTree, opt_or_transform: Any) -> MemoryReport:
        """Predicted bytes per device and per leaf; see :func:`memory_report`."""
        return _memory_report(self, params, opt_or_transform)


def _sharding_of(leaf: Any, explicit: bool) -> Any:
    """A leaf's sharding, or None. On Auto mesh axes a tracer carries none,
    and asking raises an error whose message JAX builds by walking the jaxpr
    (about 10 ms a leaf, for every leaf of a traced step). On Explicit axes a
    tracer's type carries it (on an abstract mesh); ``.sharding`` is not
    available on tracers."""
    if isinstance(leaf, jax.core.Tracer):
        return jax.typeof(leaf).sharding if explicit else None
    return getattr(leaf, "sharding", None)
