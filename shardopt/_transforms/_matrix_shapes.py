"""Which dims of a weight form a matrix, and scaling updates by matrix shape.

Shared by the matrix transforms: optax's ``MuonDimensionNumbers`` (a tree of
them, or a function returning one, says how each leaf is seen as a batch of
matrices) and ``scale_by_shape`` (Muon's width scaling).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PyTree

from .._base import AbstractStatelessTransform, Params, Updates
from .._hyperparams import Hyperparameter, ScalarOrSchedule, as_hyperparameter
from .._tree import path_str


class MuonDimensionNumbers(NamedTuple):
    """Which dims of a weight form the matrix Muon orthogonalizes (optax's).

    ``reduction_axis`` (the input, ``x @ W``'s contracted dims) and
    ``output_axis`` are flattened into the matrix's rows and columns; every
    other dim is a batch dim, each slice orthogonalized on its own.
    """

    reduction_axis: Sequence[int] | int = 0
    output_axis: Sequence[int] | int = 1


WeightDimNumbers = MuonDimensionNumbers | PyTree | Callable[[Params], PyTree] | None


def _is_dim_nums(x: Any) -> bool:
    return x is None or isinstance(x, MuonDimensionNumbers)


class DimNumbersTree:
    """A tree of MuonDimensionNumbers (None: not Muon's) held as hashable
    structure, a prefix of the parameters; see :func:`dimension_numbers_of`."""

    __slots__ = ("leaves", "treedef")

    def __init__(self, tree: PyTree) -> None:
        flat, self.treedef = jax.tree_util.tree_flatten(tree, is_leaf=_is_dim_nums)
        for leaf in flat:
            if not _is_dim_nums(leaf):
                raise TypeError(
                    "weight_dimension_numbers must hold MuonDimensionNumbers or "
                    f"None, got {type(leaf).__name__}"
                )
        self.leaves = tuple(_normal(d) for d in flat)

    @property
    def tree(self) -> PyTree:
        return jax.tree_util.tree_unflatten(self.treedef, self.leaves)

    def __hash__(self) -> int:
        return hash((self.treedef, self.leaves))

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, DimNumbersTree)
            and self.treedef == other.treedef
            and self.leaves == other.leaves
        )


def _normal(d: MuonDimensionNumbers | None) -> MuonDimensionNumbers | None:
    if d is None:
        return None
    as_tuple = lambda a: (a,) if isinstance(a, int) else tuple(int(x) for x in a)
    return MuonDimensionNumbers(as_tuple(d.reduction_axis), as_tuple(d.output_axis))


def static_dimension_numbers(spec: WeightDimNumbers) -> Any:
    """``spec`` as a static field can hold it (hashable)."""
    if isinstance(spec, DimNumbersTree) or spec is None:
        return spec
    if callable(spec) and not isinstance(spec, MuonDimensionNumbers):
        return spec
    if isinstance(spec, MuonDimensionNumbers):
        return _normal(spec)
    return DimNumbersTree(spec)


def dimension_numbers_of(
    spec: Any, tree: PyTree
) -> list[tuple[str, Array, MuonDimensionNumbers | None]]:
    """``(path, leaf, dimension numbers)`` for every array leaf of ``tree``.

    ``spec`` is None (every leaf a 2-D matrix), one MuonDimensionNumbers for
    all, a tree of them shaped like a prefix of ``tree`` (None: the subtree is
    not Muon's), or a function of ``tree`` returning either.
    """
    if callable(spec) and not isinstance(spec, (MuonDimensionNumbers, DimNumbersTree)):
        spec = static_dimension_numbers(spec(tree))
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    if spec is None or isinstance(spec, MuonDimensionNumbers):
        return [(path_str(p), x, spec) for p, x in flat]
    prefixes = jax.tree_util.tree_flatten_with_path(spec.tree, is_leaf=_is_dim_nums)[0]
    out = []
    for path, leaf in flat:
        found = [d for p, d in prefixes if tuple(path[: len(p)]) == tuple(p)]
        if not found:
            raise ValueError(
                f"weight_dimension_numbers gives nothing for the leaf at "
                f"{path_str(path)}; it must be a prefix of the parameters' tree"
            )
        out.append((path_str(path), leaf, _normal(found[0])))
    return out


def _axes(x_ndim: int, d: MuonDimensionNumbers) -> tuple[tuple, tuple, tuple]:
    red = tuple(a % x_ndim for a in _normal(d).reduction_axis)
    out = tuple(a % x_ndim for a in _normal(d).output_axis)
    if set(red) & set(out):
        raise ValueError(
            f"MuonDimensionNumbers' reduction axes {red} and output axes {out} "
            "must be disjoint"
        )
    batch = tuple(sorted(set(range(x_ndim)) - set(red) - set(out)))
    return batch, red, out


def _to_matrices(x: Array, d: MuonDimensionNumbers) -> tuple[Array, Callable]:
    """``x`` as a ``(batch, rows, cols)`` stack, and the function undoing it."""
    batch, red, out = _axes(x.ndim, d)
    order = batch + red + out
    inverse = tuple(sorted(range(x.ndim), key=lambda i: order[i]))
    sizes = lambda axes: tuple(x.shape[a] for a in axes)
    flat = (math.prod(sizes(batch)), math.prod(sizes(red)), math.prod(sizes(out)))
    moved = sizes(batch) + sizes(red) + sizes(out)
    return (
        x.transpose(order).reshape(flat),
        lambda y: y.reshape(moved).transpose(inverse),
    )


def fans(shape: tuple[int, ...], d: MuonDimensionNumbers | None) -> tuple[int, int]:
    """``(fan_in, fan_out)``: the sizes of the reduction and output dims."""
    d = d or MuonDimensionNumbers()
    _, red, out = _axes(len(shape), d)
    return math.prod(shape[a] for a in red), math.prod(shape[a] for a in out)


class ScaleByShape(AbstractStatelessTransform):
    """Scale each matrix's update by its shape, so its RMS transfers across widths.

    ``sqrt(max(1, fan_out / fan_in))`` (Jordan's Muon), or with
    ``consistent_rms = c``: ``c sqrt(max(fan_in, fan_out))`` (Liu et al.,
    "Muon is Scalable for LLM Training", 2025).
    """

    consistent_rms: Hyperparameter | None = eqx.field(
        converter=lambda v: (
            None if v is None else as_hyperparameter(v, name="consistent_rms")
        )
    )
    weight_dimension_numbers: Any = eqx.field(static=True)

    def apply(self, grads: Updates, params: Params | None) -> Updates:
        del params
        leaves = dimension_numbers_of(self.weight_dimension_numbers, grads)
        out = []
        for _, x, d in leaves:
            fan_in, fan_out = fans(tuple(x.shape), d)
            if self.consistent_rms is None:
                scale = jnp.sqrt(
                    jnp.maximum(jnp.float32(1), jnp.float32(fan_out / fan_in))
                )
            else:
                scale = (
                    jnp.sqrt(jnp.float32(max(fan_in, fan_out))) * self.consistent_rms
                )
            out.append(scale.astype(x.dtype) * x)
        return jax.tree.unflatten(jax.tree.structure(grads), out)


def scale_by_shape(
    weight_dimension_numbers: WeightDimNumbers = None,
    consistent_rms: ScalarOrSchedule | None = None,
) -> ScaleByShape:
    """Scale updates by factors of their matrix shape (optax.contrib's).

    Liu et al., "Muon is Scalable for LLM Training", 2025.
    """
    return ScaleByShape(
        consistent_rms, static_dimension_numbers(weight_dimension_numbers)
    )
