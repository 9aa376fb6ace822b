"""GaLore: the base optimizer runs on gradients projected to a low rank.

For each projected ``(m, n)`` matrix the state holds a projector of
``(max(m, n), r)`` and the base optimizer's statistics of ``(r, n)`` or
``(m, r)``: shapes of no parameter, so the ZeRO plan replicates them (they
are the small part; other leaves' statistics are partitioned as usual).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PyTree

from .._base import (
    AbstractTransform,
    Params,
    State,
    Updates,
    safe_increment,
    zero_count,
)
from .._explicit import match_sharding, replicated
from .._hyperparams import Hyperparameter, hyperparameter
from .._interop import as_transform
from ._conditional import check_int
from ._moments import scale_by_adam


class GaLoreDimensionNumbers(NamedTuple):
    """Which axes of a weight form the rows (reduction) and columns (output).

    A tensor of more than two dims is projected as the matrix of shape
    ``(prod(reduction dims), prod(output dims))``; every axis must be named.
    """

    reduction_axis: Sequence[int] | int = 0
    output_axis: Sequence[int] | int = 1


def _as_dims(value: Any) -> GaLoreDimensionNumbers | None:
    """Ours, optax's (by its fields) or None; axes as tuples, so it hashes."""
    if value is None:
        return None
    if not (hasattr(value, "reduction_axis") and hasattr(value, "output_axis")):
        raise TypeError(
            "weight_dimension_numbers must hold GaLoreDimensionNumbers or None, "
            f"got {type(value).__name__}"
        )
    axes = lambda a: a if isinstance(a, int) else tuple(int(x) for x in a)
    return GaLoreDimensionNumbers(axes(value.reduction_axis), axes(value.output_axis))


_is_dims_leaf = lambda x: x is None or (isinstance(x, tuple) and hasattr(x, "_fields"))


class _DimsTree:
    """A tree of dimension numbers held as structure (hashable, static)."""

    __slots__ = ("leaves", "treedef")

    def __init__(self, tree: PyTree) -> None:
        leaves, self.treedef = jax.tree.flatten(tree, is_leaf=_is_dims_leaf)
        self.leaves = tuple(_as_dims(x) for x in leaves)

    @property
    def tree(self) -> PyTree:
        return jax.tree.unflatten(self.treedef, self.leaves)

    def __hash__(self) -> int:
        return hash((self.treedef, self.leaves))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _DimsTree) and (self.treedef, self.leaves) == (
            other.treedef,
            other.leaves,
        )


def _axes(x: Any, dims: GaLoreDimensionNumbers) -> tuple[tuple, tuple]:
    norm = lambda a: (
        (a % x.ndim,) if isinstance(a, int) else tuple(i % x.ndim for i in a)
    )
    return norm(dims.reduction_axis), norm(dims.output_axis)


def _reshapes(x: Any, dims: GaLoreDimensionNumbers) -> tuple[Callable, Callable]:
    """To the ``(reduction, output)`` matrix and back, as optax does it."""
    if x.ndim < 2:
        raise ValueError(f"GaLore requires tensors with rank >= 2, got shape {x.shape}")
    reduction, output = _axes(x, dims)
    if set(reduction) & set(output):
        raise ValueError(
            f"Reduction axes {reduction} and output axes {output} must be disjoint. "
            f"Got dim_nums={dims} for shape {x.shape}"
        )
    if len(set(reduction) | set(output)) != x.ndim:
        raise ValueError(
            f"All axes must be specified. Got reduction={reduction}, "
            f"output={output} for tensor with {x.ndim} dimensions"
        )
    order = reduction + output
    inverse = tuple(sorted(range(x.ndim), key=lambda i: order[i]))
    sizes = lambda axes: tuple(x.shape[a] for a in axes)
    rows, cols = math.prod(sizes(reduction)), math.prod(sizes(output))
    moved = sizes(reduction) + sizes(output)
    return (
        lambda y: y.transpose(order).reshape(rows, cols),
        lambda y: y.reshape(moved).transpose(inverse),
    )


class GaLoreState(eqx.Module):
    """State of :func:`scale_by_galore`, with optax's field names."""

    count: Array
    base_optimizer_state: State
    projector: Updates


class ScaleByGalore(AbstractTransform):
    r"""Run ``base_optimizer`` on low-rank projections of matrix gradients.

    For a gradient ``G`` (``m x n``, ``m >= n``) every ``update_proj_gap``
    steps ``P`` = the first ``r`` left singular vectors of ``G``; the base
    optimizer sees ``R = P^T G`` and its update ``N`` returns as
    ``scale * P N`` (for ``m < n``: ``R = G Q``, ``scale * N Q^T`` with ``Q``
    the right singular vectors). Other leaves get the base optimizer as is.

    Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
    Projection", ICML 2024.
    """

    base_optimizer: AbstractTransform
    rank: int = eqx.field(static=True)
    update_proj_gap: int = eqx.field(static=True)
    scale: Hyperparameter = hyperparameter("scale")
    dims: Any = eqx.field(static=True)  # None, dims, _DimsTree or a callable

    def _dims_for(self, tree: Params) -> PyTree:
        if self.dims is None:
            return jax.tree.map(
                lambda p: GaLoreDimensionNumbers() if p.ndim == 2 else None, tree
            )
        if isinstance(self.dims, GaLoreDimensionNumbers):
            return jax.tree.map(lambda p: self.dims if p.ndim >= 2 else None, tree)
        if isinstance(self.dims, _DimsTree):
            return self.dims.tree
        return _DimsTree(self.dims(tree)).tree

    def _shapes(self, p: Any, dims: GaLoreDimensionNumbers | None) -> tuple:
        # optax keeps a (0, 0) projector for a leaf it does not project; None
        # here, because Orbax cannot save an array of zero size
        if dims is None:
            return None, jnp.zeros(p.shape, p.dtype)
        m, n = jax.eval_shape(_reshapes(p, dims)[0], p).shape
        r = min(self.rank, m, n)
        if m >= n:
            return jnp.zeros((m, r), p.dtype), jnp.zeros((r, n), p.dtype)
        return jnp.zeros((n, r), p.dtype), jnp.zeros((m, r), p.dtype)

    def init(self, params: Params) -> GaLoreState:
        leaves, treedef = jax.tree.flatten(params)
        if not leaves:
            return GaLoreState(zero_count(), self.base_optimizer.init(params), params)
        dims = treedef.flatten_up_to(self._dims_for(params))
        pairs = [self._shapes(p, d) for p, d in zip(leaves, dims, strict=True)]
        projectors = treedef.unflatten([pair[0] for pair in pairs])
        proxies = treedef.unflatten([pair[1] for pair in pairs])
        return GaLoreState(zero_count(), self.base_optimizer.init(proxies), projectors)

    def update(
        self, grads: Updates, state: GaLoreState, params: Params | None = None
    ) -> tuple[Updates, GaLoreState]:
        del params  # the base optimizer sees low-rank shapes: no parameters
        refresh = state.count % self.update_proj_gap == 0
        leaves, treedef = jax.tree.flatten(grads)
        dims = treedef.flatten_up_to(self._dims_for(grads))
        old = treedef.flatten_up_to(state.projector)

        def project(g, projector, d):
            if d is None:
                return g, projector
            to_matrix, _ = _reshapes(g, d)
            # the SVD and the projections need whole matrices: with Explicit
            # mesh axes a sharded gradient is gathered first (as GSPMD does
            # with Auto axes), and the update goes back to its layout (back)
            g2 = to_matrix(replicated(g))
            m, n = g2.shape
            r = min(self.rank, m, n)

            def left():
                u, _, _ = jnp.linalg.svd(g2.astype(jnp.float32), full_matrices=False)
                return u[:, :r].astype(g.dtype)

            def right():
                _, _, vh = jnp.linalg.svd(g2.astype(jnp.float32), full_matrices=False)
                return vh[:r, :].T.astype(g.dtype)

            new = jax.lax.cond(refresh, left if m >= n else right, lambda: projector)
            return (new.T @ g2 if m >= n else g2 @ new), new

        pairs = [project(*x) for x in zip(leaves, old, dims, strict=True)]
        low_rank = treedef.unflatten([pair[0] for pair in pairs])
        new_projectors = [pair[1] for pair in pairs]
        projectors = treedef.unflatten(new_projectors)
        low_updates, base_state = self.base_optimizer.update(
            low_rank, state.base_optimizer_state, None
        )
        scale = jnp.asarray(self.scale)

        def back(u, projector, g, d):
            if d is None:
                return u
            to_matrix, from_matrix = _reshapes(g, d)
            m, n = to_matrix(g).shape
            full = projector @ u if m >= n else u @ projector.T
            full = match_sharding(from_matrix(full), g)
            return (scale.astype(full.dtype) * full).astype(g.dtype)

        low_leaves = treedef.flatten_up_to(low_updates)
        updates = treedef.unflatten(
            [
                back(*x)
                for x in zip(low_leaves, new_projectors, leaves, dims, strict=True)
            ]
        )
        new_state = GaLoreState(safe_increment(state.count), base_state, projectors)
        return updates, new_state


def scale_by_galore(
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    base_optimizer: Any = None,
    weight_dimension_numbers: Any = None,
) -> ScaleByGalore:
    """GaLore's projection around ``base_optimizer`` (default ``scale_by_adam()``).

    ``rank`` is the projection's rank (capped at the matrix's), refreshed from
    the gradient's SVD every ``update_proj_gap`` steps. The base optimizer
    must not need the parameters (``scale_by_adam``, ``scale_by_lion``, ...):
    it sees low-rank shapes. ``weight_dimension_numbers`` chooses the matrices:
    None (2-D leaves), one :class:`GaLoreDimensionNumbers` for every leaf of
    2+ dims, a tree of them (None to skip a leaf), or a function of the
    parameters returning such a tree. Zhao et al., "GaLore: Memory-Efficient
    LLM Training by Gradient Low-Rank Projection", ICML 2024.
    """
    if not isinstance(rank, int) or isinstance(rank, bool):
        raise TypeError(f"`rank` must be an int, got {type(rank)}")
    if rank <= 0:
        raise ValueError(f"`rank` must be positive, got {rank}")
    base = scale_by_adam() if base_optimizer is None else base_optimizer
    dims = weight_dimension_numbers
    if dims is not None and not callable(dims):
        dims = _as_dims(dims) if _is_dims_leaf(dims) else _DimsTree(dims)
    return ScaleByGalore(
        as_transform(base, "scale_by_galore's base_optimizer"),
        rank,
        check_int(update_proj_gap, "update_proj_gap", 1),
        scale,
        dims,
    )
