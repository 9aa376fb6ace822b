"""Per-matrix work assigned by whole matrix: the engine of the matrix optimizers.

Muon's Newton-Schulz iteration, Shampoo's inverse roots and SOAP's
eigenbases need each matrix *whole*. When the matrices are partitioned (ZeRO
stages 1-3, or a tensor-parallel layout), the naive program gathers every
matrix on every device and every device repeats all the work. Here, instead,
matrices of equal shape and dtype are stacked, the stack's leading axis is
laid out over all the devices of the mesh (each device holds, and works on,
``ceil(n / devices)`` whole matrices: an all-to-all), and the results are laid
back out as the state is stored (another all-to-all). The math is the same
``jax.vmap`` over the same stack with or without a mesh, so the numbers are
those of the unsharded run.

How a transform learns the layout. The math never imports ``jax.sharding``;
:class:`shardopt.Optimizer` sets a :class:`AbstractMatrixLayout` (built by the
sharding layer from its plan) in a context variable while it traces its step,
and :func:`per_matrix` reads it. We chose a context over an extra argument of
``update`` because (1) ``update``'s signature stays optax's, so every wrapper
(chain, partition, masked, MultiSteps, inject, optax's own) passes it on
without a line of code; (2) it is read at trace time only, and the plan is a
static field of the Optimizer, so the compiled step is keyed by it; (3) with
no Optimizer (a transform used alone, or inside optax) there is no layout and
the same stacked ``vmap`` runs wherever XLA puts it: the same numbers.
"""

from __future__ import annotations

import abc
import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array

Spec = Any  # a PartitionSpec, as the sharding layer gives it (opaque here)


class AbstractMatrixLayout(abc.ABC):
    """What a matrix transform may ask of the sharding plan while it is traced.

    Implemented by the sharding layer (``shardopt.sharding._matrix``); names
    are the parameters' paths as :func:`jax.tree_util.keystr` writes them.
    """

    @property
    @abc.abstractmethod
    def shares(self) -> int:
        """How many devices a stack of matrices is spread over."""

    @abc.abstractmethod
    def spec(self, name: str, shape: tuple[int, ...], kept: Any = None) -> Spec:
        """The stored layout of a leaf of parameter ``name``: its mirror
        (``kept=None``, same shape as the parameter) or a leaf keeping the
        parameter's dims ``kept`` (one entry per leaf dim, None for its own);
        None when ``name`` is no parameter of this shape."""

    @abc.abstractmethod
    def is_partitioned(self, spec: Spec) -> bool:
        """Whether ``spec`` splits the leaf over any mesh axis."""

    @abc.abstractmethod
    def spread(self, stack: Array) -> Array:
        """``stack`` laid out with its leading axis over all the devices."""

    @abc.abstractmethod
    def stacked(self, stack: Array, spec: Spec | None) -> Array:
        """``stack`` laid out as a stack of leaves of layout ``spec`` (None:
        replicated)."""

    @abc.abstractmethod
    def place(self, leaf: Array, spec: Spec) -> Array:
        """``leaf`` laid out as ``spec``."""


_LAYOUT: contextvars.ContextVar[AbstractMatrixLayout | None] = contextvars.ContextVar(
    "shardopt_matrix_layout", default=None
)


def current_matrix_layout() -> AbstractMatrixLayout | None:
    """The layout the Optimizer set for the step being traced (None: no mesh)."""
    return _LAYOUT.get()


@contextlib.contextmanager
def using_matrix_layout(layout: AbstractMatrixLayout | None) -> Iterator[None]:
    """Make ``layout`` the one :func:`per_matrix` sees, for the ``with`` block."""
    token = _LAYOUT.set(layout)
    try:
        yield
    finally:
        _LAYOUT.reset(token)


class Item:
    """One matrix's work: its input matrices and, per output, the layout it
    is stored in (a spec, or None: as XLA likes, the Optimizer places it)."""

    __slots__ = ("in_specs", "inputs", "out_specs")

    def __init__(self, inputs: Sequence[Array], in_specs, out_specs) -> None:
        self.inputs = tuple(inputs)
        self.in_specs = tuple(in_specs)
        self.out_specs = tuple(out_specs)

    @property
    def key(self) -> tuple:
        shapes = tuple((tuple(x.shape), jnp.dtype(x.dtype).name) for x in self.inputs)
        return shapes, self.out_specs


def per_matrix(
    fn: Callable[..., tuple[Array, ...]], items: Sequence[Item]
) -> list[tuple[Array, ...]]:
    """``fn(*item.inputs)`` for every item, computed one stack per input shape.

    Items whose inputs have equal shapes and dtypes (and whose outputs are
    stored alike) share one ``jax.vmap(fn)`` over their stacked inputs. Under
    an Optimizer with a plan, a stack with a partitioned input or output is
    spread over the devices (:meth:`AbstractMatrixLayout.spread`, zero-padded
    to a multiple of their number) and each output stack goes back to its
    items' layout in one move (an output with no layout, None, is gathered:
    the path of leaves reshaped into matrices, whose layout does not carry
    over to the matrices); a stack of replicated matrices is computed where
    it is, with no collective (every device already holds every matrix).
    """
    layout = current_matrix_layout()
    groups: dict[tuple, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(item.key, []).append(i)
    out: list[tuple[Array, ...] | None] = [None] * len(items)
    for members in groups.values():
        group = [items[i] for i in members]
        stacks = [
            jnp.stack(xs) for xs in zip(*(it.inputs for it in group), strict=True)
        ]
        spread = layout is not None and any(
            s is not None and layout.is_partitioned(s)
            for it in group
            for s in it.in_specs + it.out_specs
        )
        n = len(group)
        if spread:
            pad = -n % layout.shares
            stacks = [
                layout.spread(jnp.pad(s, [(0, pad)] + [(0, 0)] * (s.ndim - 1)))
                for s in stacks
            ]
        results = jax.vmap(fn)(*stacks)
        if spread:
            # pinned to the spread layout first: else XLA moves the result's
            # last terms before they are added (one all-to-all each)
            specs = group[0].out_specs
            results = tuple(
                layout.stacked(layout.spread(r), s)[:n]
                for r, s in zip(results, specs, strict=True)
            )
        for k, i in enumerate(members):
            out[i] = tuple(r[k] for r in results)
    return out  # type: ignore[return-value]
