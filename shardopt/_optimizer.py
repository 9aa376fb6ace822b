"""The stateful optimizer: one Module holding a transform, its state and a count."""

from __future__ import annotations

import functools
import textwrap
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PyTree

from . import _debug
from ._base import (
    AbstractTransform,
    Params,
    State,
    apply_updates,
    replace_hyperparameter,
    safe_increment,
    transforms_in,
    update_with_extra_args,
)
from ._flat import FlatLayout, Packed, check_fuse, flat_layout, wants_flat
from ._hyperparams import hyperparameter_fields
from ._interop import as_transform
from ._transforms._groups import GroupsState, find_groups
from ._transforms._matrix_layout import using_matrix_layout
from ._tree import (
    TreeStructure,
    check_grads_match,
    check_per_example_grads_match,
    distinct_buffers,
    is_trainable,
    trainable,
)
from ._tree_math import add
from .sharding._flat import ShardedFlatLayout
from .sharding._matrix import matrix_layout
from .sharding._offload import DEVICE_MEMORY, state_on_device
from .sharding._plan import ShardingPlan

_KEEP = object()  # Optimizer._replaced: this part is kept


def _is_abstract(tree: PyTree) -> bool:
    return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))


class Optimizer(eqx.Module):
    """A transform together with its state: the optimizer a training loop holds.

    ``Optimizer(transform, params)`` initialises the state for the trainable
    leaves of ``params`` (floating arrays; everything else in an Equinox model is
    left alone). With ``jax.ShapeDtypeStruct`` leaves the state is abstract too,
    so its shapes are known before anything is allocated.

    ``params, opt = opt.step(params, grads)`` applies one step. The optimizer is
    a pytree: pass it through ``eqx.filter_jit`` (donation included) like a model,
    or through :func:`shardopt.jit_step`, which flattens it once a call (the
    fastest dispatch), or through ``jax.jit`` where every leaf is an array.

    Example::

        model = eqx.nn.MLP(2, 1, width_size=8, depth=2, key=jax.random.key(0))
        opt = shardopt.Optimizer(shardopt.adamw(1e-3), model)
        loss = lambda m, x, y: jnp.mean((jax.vmap(m)(x) - y) ** 2)

        @eqx.filter_jit(donate="all")
        def train_step(model, opt, x, y):
            grads = eqx.filter_grad(loss)(model, x, y)
            return opt.step(model, grads)

        model, opt = train_step(model, opt, jnp.ones((4, 2)), jnp.zeros((4, 1)))

    Flat buffers (``fuse``): when the transform is elementwise (see
    :meth:`~shardopt.AbstractTransform.is_elementwise`: adam, adamw, sgd,
    lion, rmsprop, ... without masks or clipping), the trainable leaves of
    each dtype can be packed into one buffer at init, so that the update
    runs once per buffer. ``fuse=None`` (the default) packs trees of at
    least ``shardopt._flat.AUTO_MIN_LEAVES`` (256) leaves, where it was
    measured faster (docs/benchmarks.md, "Flat buffers"); ``True`` packs
    whenever the transform is elementwise, ``False`` never. Under a plan
    each device's part of a buffer is its own shards of the leaves
    (:class:`~shardopt.sharding._flat.ShardedFlatLayout`): the same bytes per
    device and the same collectives as per leaf. ``opt.state`` shows the
    state per leaf either way.

    The transform's leaves are stored flat (``transform_leaves``, their tree
    structure in a static field): flattening the optimizer, which a jitted
    step does on every call, then makes no Python call per Equinox Module of
    the transform (a few microseconds each). ``transform`` is rebuilt on
    access, so ``eqx.tree_at`` reaches its leaves (``lambda o:
    o.transform.transforms[0].b1``) but not the whole transform: use
    :meth:`replace_transform`.
    """

    transform_leaves: tuple  # jax.tree.leaves(transform)
    stored_state: State  # as stored: Packed buffers where fused (see .state)
    count: Array
    transform_structure: TreeStructure = eqx.field(static=True)
    plan: ShardingPlan | None = eqx.field(static=True, default=None)
    layout: FlatLayout | ShardedFlatLayout | None = eqx.field(static=True, default=None)

    def __init__(
        self,
        transform: Any,
        params: Params,
        plan: ShardingPlan | None = None,
        fuse: bool | None = None,
    ):
        held = (transform, params)  # the caller's arrays (see _own_buffers)
        transform = as_transform(transform, "the Optimizer's transform")
        check_fuse(fuse)
        self.layout = None
        if plan is not None and not isinstance(plan, ShardingPlan):
            raise TypeError(
                f"plan must be a ShardingPlan (shardopt.zero(...)), got "
                f"{type(plan).__name__}"
            )
        if plan is not None:
            plan = plan.bind(params)
            self.plan = plan
            transform, self.stored_state, self.count, self.layout = _init_sharded(
                transform, params, plan, fuse
            )
            self.transform_leaves, self.transform_structure = _flat(transform)
            self._own_buffers(held)
            return
        self.plan = None
        params = trainable(params)
        self.layout = flat_layout(transform, params, fuse)
        if self.layout is not None:
            params = self.layout.pack(params)
        self.transform_leaves, self.transform_structure = _flat(transform)
        if _is_abstract(params):
            self.stored_state = jax.eval_shape(transform.init, params)
            self.count = jax.ShapeDtypeStruct((), jnp.int32)
        else:
            self.stored_state = transform.init(params)
            self.count = jnp.zeros([], jnp.int32)
            self._own_buffers(held)

    def _own_buffers(self, held: Any) -> None:
        """Every array leaf in buffers of its own, none of them ``held`` (the
        transform given and the parameters). A training step that donates
        the parameters and the optimizer (``filter_jit(donate="all")``)
        fails on a buffer given twice, and an initial state may be a
        parameter or a hyperparameter itself; and donating the optimizer
        must not delete the hyperparameters of the transform it was built
        from, which the caller may build another optimizer from."""
        self.transform_leaves, self.stored_state, self.count = distinct_buffers(
            (self.transform_leaves, self.stored_state, self.count), held=held
        )

    def __repr__(self) -> str:
        """The optimizer as a user thinks of it: transform, state (per leaf),
        count, and the plan where there is one, not the storage fields."""
        fields = {"transform": self.transform, "state": self.state}
        fields["count"] = self.count
        if self.plan is not None:
            fields["plan"] = self.plan
        if self.layout is not None:
            fields["flat_buffers"] = len(self.layout.sizes)
        lines = [
            f"  {name}={textwrap.indent(eqx.tree_pformat(value), '  ').lstrip()},"
            for name, value in fields.items()
        ]
        return "Optimizer(\n" + "\n".join(lines) + "\n)"

    @property
    def transform(self) -> AbstractTransform:
        """The transform, with its hyperparameters (to replace it, use
        :meth:`replace_transform` or :meth:`with_hyperparameters`)."""
        treedef = self.transform_structure.treedef
        return jax.tree_util.tree_unflatten(treedef, self.transform_leaves)

    @property
    def state(self) -> State:
        """The transform's state, leaf by leaf as the transform makes it on the
        parameter tree (``opt.state[0].mu['w']``), whether or not it is stored
        in flat buffers. To replace it, use :meth:`replace_state`."""
        if self.layout is None:
            return self.stored_state
        return self.layout.view(self.stored_state)

    def replace_state(self, state: State, count: Any = None) -> Optimizer:
        """A copy with the state (per leaf, as :attr:`state` shows it) and,
        if given, the count replaced; packed into flat buffers where fused."""
        if self.layout is not None:
            state = self.layout.pack_state(state, self.stored_state)
        if count is None:
            return self._replaced(state=state)
        return self._replaced(state=state, count=count)

    def replace_transform(self, transform: AbstractTransform) -> Optimizer:
        """A copy with the transform replaced (the state and count kept): a
        transform of the same structure, e.g. a checkpoint's hyperparameters."""
        return self._replaced(transform=transform)

    def _replaced(
        self, transform: Any = _KEEP, state: Any = _KEEP, count: Any = _KEEP
    ) -> Optimizer:
        """A copy with the parts given replaced (built as ``eqx.tree_at``
        builds one: no ``__init__``)."""
        new = object.__new__(type(self))
        fields = dict(self.__dict__)
        if transform is not _KEEP:
            fields["transform_leaves"], fields["transform_structure"] = _flat(transform)
        if state is not _KEEP:
            fields["stored_state"] = state
        if count is not _KEEP:
            fields["count"] = count
        for name, value in fields.items():
            object.__setattr__(new, name, value)
        return new

    def step(
        self, params: Params, grads: PyTree, **extra_args: Any
    ) -> tuple[Params, Optimizer]:
        """Apply one update: return the new parameters and the new optimizer.

        ``grads`` must match the trainable leaves of ``params`` in tree, shape and
        dtype (``None`` where a leaf is not trained, as ``eqx.filter_grad`` gives).
        ``extra_args`` (optax's ``value=``, ``grad=``, ``value_fn=``) reach the
        transforms that take them.

        With a plan, every leaf stays in the plan's layout: gradients are laid
        out as the plan says (stage 2+: partitioned), then sliced to the state
        layout; the update is computed there and constrained back to the stored
        parameter layout (an all-gather for stages 1-2) before it is added.
        """
        tp = trainable(params)
        per_example = self.transform.expects_per_example_grads()
        if per_example:
            check_per_example_grads_match(grads, tp)
        else:
            check_grads_match(grads, tp)
        grads = trainable(grads)
        plan = self.plan
        if plan is not None:
            plan.check_on_mesh(tp, "parameter")
            plan.check_on_mesh(grads, "gradient")
            mirror = plan._to_shardings(plan.mirror_specs(tp))
            if not per_example:  # per-example ones keep their (batch) layout
                grads = plan.constrain(
                    plan.constrain(grads, plan.grad_shardings(tp)), mirror
                )
            tp = plan.constrain(tp, mirror)
        extra_args = _objective_on_whole(extra_args, params)
        if self.layout is not None:
            return self._fused_step(params, tp, grads, extra_args)
        # matrix transforms (muon, shampoo, soap) ask the plan where whole
        # matrices go while this step is traced (see _matrix_layout)
        layout = None if plan is None else matrix_layout(plan, tp)
        # an offloaded state comes to device memory here and goes back below
        state = self.stored_state
        if plan is not None:
            state = state_on_device(plan, state, tp)
        with using_matrix_layout(layout):
            updates, state = update_with_extra_args(
                self.transform, grads, state, tp, extra_args
            )
        if _debug.active():
            _debug.check_step(self.count, grads, updates)
        count = safe_increment(self.count)
        if plan is not None:
            state = plan.constrain(state, plan.state_shardings(state, tp))
            param_shardings = plan.param_shardings(tp)
            updates = plan.constrain(updates, param_shardings)
            count = plan.constrain(count, plan.replicated())
        new_params = apply_updates(params, updates)
        if plan is not None:
            new_params = _constrain_trainable(plan, new_params, param_shardings)
        return new_params, self._replaced(state=state, count=count)

    def _fused_step(
        self, params: Params, tp: Params, grads: PyTree, extra_args: dict
    ) -> tuple[Params, Optimizer]:
        """The step on flat buffers: pack the gradients and parameters, run the
        (elementwise) transform once per buffer, add, and unpack the sums.

        Under a plan ``tp`` and ``grads`` come in the plan's mirrored layout,
        and each device packs and unpacks its own shards (no collective). At
        stages 0 and 3 the parameters are stored in that layout, so the sums
        are taken in the buffers as without a plan; at stages 1 and 2 the
        updates are unpacked and go back to the parameters' layout (the
        per-leaf step's all-gathers) to be added there.
        """
        layout, plan = self.layout, self.plan
        layout.check(tp, "parameters")
        packed_params, packed_grads = layout.pack(tp), layout.pack(grads)
        updates, state = update_with_extra_args(
            self.transform, packed_grads, self.stored_state, packed_params, extra_args
        )
        if _debug.active():
            _debug.check_step(self.count, grads, layout.unpack(updates))
        count = safe_increment(self.count)
        if plan is not None:
            state = plan.constrain(state, layout.state_shardings(state, plan))
            count = plan.constrain(count, plan.replicated())
        if plan is not None and plan.stage in (1, 2):
            param_shardings = plan.param_shardings(tp)
            updates = plan.constrain(layout.unpack(updates), param_shardings)
            new_params = apply_updates(params, updates)
            new_params = _constrain_trainable(plan, new_params, param_shardings)
            return new_params, self._replaced(state=state, count=count)
        summed = Packed(
            tuple(
                add(p, u).astype(p.dtype)
                for p, u in zip(packed_params.buffers, updates.buffers, strict=True)
            )
        )
        new_tp = layout.unpack(summed)
        new_params = jax.tree.map(
            lambda new, old: old if new is None else new,
            new_tp,
            params,
            is_leaf=lambda x: x is None,
        )
        return new_params, self._replaced(state=state, count=count)

    def hyperparameters(self) -> dict[str, Any]:
        """Every hyperparameter of the transform by name (a value or a schedule)."""
        found: dict[str, Any] = {}
        for module in transforms_in(self.transform):
            for name in hyperparameter_fields(module):
                found.setdefault(name, getattr(module, name))
        return found

    def with_hyperparameters(self, **values: Any) -> Optimizer:
        """A copy with hyperparameters replaced by name, e.g. ``learning_rate=1e-4``.

        Every transform with a hyperparameter of that name gets the new value,
        validated as in the constructors. The state (moments, counts) is kept, and
        a jitted step does not recompile unless a float becomes a schedule.
        """
        transform = self.transform
        for name, value in values.items():
            transform, replaced = replace_hyperparameter(transform, name, value)
            if not replaced:
                raise ValueError(
                    f"no hyperparameter named {name!r}; this optimizer has: "
                    f"{', '.join(sorted(self.hyperparameters())) or 'none'}"
                )
        if self.plan is not None:
            transform = self.plan.replicate(transform)
        return self._replaced(transform=transform)

    def reset_group(self, name: str, params: Params) -> Optimizer:
        """A copy with parameter group ``name``'s state made afresh (zero moments
        and count), every other group's moments and counts kept (optax#1371).

        The transform must contain one :func:`~shardopt.param_groups`;
        ``params`` gives the shapes. With a plan, the new state keeps the
        plan's layout.
        """
        groups = find_groups(self.transform)
        state = self.state  # once: its nodes are found by identity (a view
        # of flat buffers is built anew on each access)
        nodes = [
            node
            for node in jax.tree.leaves(
                state, is_leaf=lambda x: isinstance(x, GroupsState)
            )
            if isinstance(node, GroupsState)
        ]
        if len(nodes) != 1:
            raise ValueError(
                f"expected one param_groups state in the optimizer, found {len(nodes)}"
            )
        tp = trainable(params)
        fresh = groups.reset(nodes[0], name, tp)
        is_node = lambda x: x is nodes[0]
        state = jax.tree.map(
            lambda x: fresh if is_node(x) else x, state, is_leaf=is_node
        )
        if self.plan is not None:
            state = self.plan.constrain(state, self.plan.state_shardings(state, tp))
        # the fresh state in buffers of its own, as from __init__ (_own_buffers)
        held = (params, self.transform_leaves, self.count)
        return self.replace_state(distinct_buffers(state, held=held))


def _flat(transform: AbstractTransform) -> tuple[tuple, TreeStructure]:
    """The Optimizer's ``transform_leaves`` and ``transform_structure``."""
    leaves, treedef = jax.tree_util.tree_flatten(transform)
    return tuple(leaves), TreeStructure(treedef)


def _objective_on_whole(extra_args: dict[str, Any], params: Params) -> dict:
    """``value_fn``, ``obj_fn`` and ``grad_fn`` as transforms call them: on the
    trainable leaves (``None`` elsewhere), given back the rest of ``params``
    (an Equinox model's functions, integer buffers) before they are evaluated;
    ``grad_fn``'s gradients come back with the trainable leaves only."""
    if not any(extra_args.get(name) is not None for name in OBJECTIVES):
        return extra_args
    rest = jax.tree.map(lambda x: None if is_trainable(x) else x, params)
    out = dict(extra_args)
    for name in OBJECTIVES:  # optax's line search's, Sophia's, SAM's
        fn = extra_args.get(name)
        if fn is not None:
            out[name] = _on_whole(fn, rest, name == "grad_fn")
    return out


# the extra arguments that are functions of the parameters (grad_fn returns
# gradients, of which the trainable leaves are kept)
OBJECTIVES = ("value_fn", "obj_fn", "grad_fn")


def _on_whole(fn: Any, rest: Params, returns_grads: bool) -> Any:
    @functools.wraps(fn)  # keeps its signature: keywords are matched to it
    def on_whole(trained, *args, **kwargs):
        out = fn(eqx.combine(trained, rest), *args, **kwargs)
        return trainable(out) if returns_grads else out

    return on_whole


def _init_sharded(
    transform: AbstractTransform, params: Params, plan: ShardingPlan, fuse: Any
) -> tuple[AbstractTransform, State, Array, ShardedFlatLayout | None]:
    """The transform, state, count and flat layout (or None), placed straight
    into the plan's layout.

    Concrete parameters: ``transform.init`` runs under ``jax.jit`` with the
    plan's out-shardings, so no device ever holds the whole state. Abstract
    parameters: ``ShapeDtypeStruct`` s carrying the plan's shardings. The
    transform's array leaves (hyperparameters, schedule numbers) are
    replicated on the mesh, so every leaf of a sharded optimizer is a global
    array that Orbax can save from any number of processes. Where the state
    is packed (:func:`_sharded_flat_layout`), init runs on the packed
    parameters.
    """
    transform = plan.replicate(transform)
    tp = trainable(params)
    abstract_tp = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tp)
    abstract_state = jax.eval_shape(transform.init, abstract_tp)
    plan.check_overrides(params, abstract_state)
    plan.check_partitions_something(params)
    shardings = plan.state_shardings(abstract_state, params)
    layout, packed_state = _sharded_flat_layout(
        transform, params, plan, fuse, abstract_state
    )
    pack = lambda p: p
    if layout is not None:
        mirror = plan._to_shardings(plan.mirror_specs(tp))
        pack = lambda p: layout.pack(plan.constrain(p, mirror))
        abstract_state = packed_state
        shardings = layout.state_shardings(abstract_state, plan)
    count_sharding = plan.replicated()
    if _is_abstract(tp):
        state = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            abstract_state,
            shardings,
        )
        count = jax.ShapeDtypeStruct((), jnp.int32, sharding=count_sharding)
        return transform, state, count, layout
    plan.check_on_mesh(tp, "parameter")
    dynamic, static = eqx.partition(transform, eqx.is_array)
    init = jax.jit(
        lambda d, p: eqx.combine(d, static).init(pack(p)), out_shardings=shardings
    )
    state = init(dynamic, tp)
    # from the host, like a hyperparameter: a jitted zeros would compile anew
    # for every Optimizer built (a fresh lambda each time)
    count = plan.replicate(np.zeros((), np.int32))
    return transform, state, count, layout


def _sharded_flat_layout(
    transform: AbstractTransform,
    params: Params,
    plan: ShardingPlan,
    fuse: Any,
    per_leaf_state: State,
) -> tuple[ShardedFlatLayout | None, State | None]:
    """The flat layout under ``plan`` and the (abstract) state packed in it,
    where ``fuse`` asks for one (the rule without a plan,
    :func:`~shardopt._flat.wants_flat`) and it is exact: the packed state
    must be laid out as the plan lays out ``per_leaf_state`` (no state
    override giving a moment another layout than its parameter's mirror),
    and the state is kept in device memory (no offload). ``(None, None)``
    where the state stays per leaf."""
    tp = trainable(params)
    if not wants_flat(transform, tp, fuse):
        return None, None
    if plan.state_memory_kind not in (None, DEVICE_MEMORY):
        return None, None
    layout = ShardedFlatLayout.of(plan, tp)
    abstract_tp = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tp)
    packed = jax.eval_shape(transform.init, layout.pack(abstract_tp))
    specs = plan.state_specs(per_leaf_state, params)
    if layout.matches_plan(packed, specs) is not None:
        return None, None
    return layout, packed


def _constrain_trainable(plan: ShardingPlan, params: Params, shardings) -> Params:
    def one(x, s):
        return x if s is None else plan.constrain(x, s)

    return jax.tree.map(one, params, shardings, is_leaf=lambda x: x is None)
