"""Muon: momentum orthogonalized by a Newton-Schulz iteration, matrix by matrix.

Each matrix's work runs through :func:`per_matrix`, so under a ZeRO plan (or
a tensor-parallel layout) every device orthogonalizes whole matrices, its
share of them, instead of every device gathering and orthogonalizing all of
them. Communication per step, on ``D`` devices, for a group of ``n`` matrices
of ``m x k`` elements of ``b`` bytes whose state is partitioned: two
all-to-alls of the zero-padded stack, each moving ``(D - 1) / D`` of a
device's ``ceil(n / D) * m * k * b`` bytes (the momentum in, the
orthogonalized update out); groups whose state is replicated (stage 0, no
tensor parallelism) are computed in place with no collective. See
docs/matrix.md for the counts measured in compiled HLO.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike
from jaxtyping import Array, PyTree

from .._base import (
    AbstractStatelessTransform,
    AbstractTransform,
    Params,
    Updates,
    safe_increment,
    zero_count,
)
from .._hyperparams import (
    NONNEGATIVE,
    UNIT_INTERVAL,
    Hyperparameter,
    ScalarOrSchedule,
    as_hyperparameter,
    hyperparameter,
    resolve,
)
from .._tree import describe, path_str
from .._tree_math import add, bias_correction, canonical_dtype, cast, ema, zeros_like
from ._matrix_layout import Item, current_matrix_layout, per_matrix

DEFAULT_NS_COEFFS = (3.4445, -4.7750, 2.0315)
DION_NS_COEFFS = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)
NS_COEFFS_PRESETS = {"standard": DEFAULT_NS_COEFFS, "dion": DION_NS_COEFFS}
PRECONDITIONINGS = ("frobenius", "spectral", "aol", "schatten")

_NOT_A_MATRIX = (
    "Muon orthogonalizes matrices, but the update at {path} is {desc}: give it "
    "MuonDimensionNumbers (weight_dimension_numbers=...) to say which dims form "
    "the matrix, or send it to another transform (shardopt.muon sends every "
    "non-matrix parameter to its AdamW fallback)"
)


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


def _ns_step(x: Array, c: Array) -> Array:
    """``c0 X + (c1 A + c2 A^2) X`` with ``A = X X^T``."""
    a = x @ x.T.conj()
    b = c[1] * a + c[2] * a @ a
    return c[0] * x + b @ x


def _aol_first(x: Array, c: Array, eps: float = 1e-8) -> Array:
    a = x @ x.T.conj()
    s = jnp.expand_dims(jax.lax.rsqrt(jnp.clip(jnp.abs(a).sum(axis=-1), min=eps)), -1)
    x, a = x * s, a * s * s.transpose(-1, -2)
    b = c[1] * a + c[2] * a @ a
    return c[0] * x + b @ x


def _schatten_first(x: Array, c: Array, eps: float = 1e-8) -> Array:
    a = x @ x.T
    norm = jnp.clip(jnp.linalg.norm(a, ord="fro", axis=(-2, -1)), min=eps)
    s = jnp.expand_dims(jax.lax.rsqrt(norm), (0, -1))
    x, a = x * s, a * s**2
    b = c[1] * a + c[2] * a @ a
    return c[0] * x + b @ x


def newton_schulz(
    x: Array,
    coeffs: Array,
    ns_steps: int = 5,
    preconditioning: str = "frobenius",
    eps: Array | float = 1e-8,
) -> Array:
    """Orthogonalize one matrix: ``X -> ~U V^T`` for ``X = U S V^T``.

    The quintic iteration ``X <- a X + (b A + c A^2) X``, ``A = X X^T``
    (Jordan, "Muon: An optimizer for hidden layers in neural networks", 2024),
    after scaling ``X`` to spectral norm <= 1 (Frobenius or spectral norm; or
    a first step rescaled by AOL, Boissin et al. 2025, or the Schatten-4 norm,
    Grishina et al. 2025). ``coeffs`` is ``(3,)`` (``ns_steps`` steps) or
    ``(n, 3)`` (one row a step). Wide form: a tall matrix is transposed.
    """
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    eps = jnp.asarray(eps)
    if preconditioning == "frobenius":
        x = x / (jnp.linalg.norm(x, ord="fro") + eps.astype(x.dtype))
    elif preconditioning == "spectral":
        x = x / (jnp.linalg.norm(x, ord=2) + eps.astype(x.dtype))
    first = {"aol": _aol_first, "schatten": _schatten_first}.get(preconditioning)

    def step(i, x, c):
        if first is None:
            return _ns_step(x, c)
        return jax.lax.cond(i == 0, lambda x: first(x, c), lambda x: _ns_step(x, c), x)

    coeffs = coeffs.astype(x.dtype)
    if coeffs.ndim == 1:
        x = jax.lax.fori_loop(
            0, ns_steps, lambda i, x: step(i, x, coeffs), x, unroll=True
        )
    else:

        def body(carry, c):
            i, x = carry
            return (i + 1, step(i, x, c)), None

        (_, x), _ = jax.lax.scan(body, (jnp.asarray(0, jnp.int32), x), coeffs)
    return x.T if transposed else x


def check_ns_coeffs(coeffs: Any, ns_steps: int) -> np.ndarray:
    """Muon's Newton-Schulz coefficients as float32 ``(3,)`` or ``(n, 3)``."""
    if isinstance(coeffs, str):
        if coeffs not in NS_COEFFS_PRESETS:
            raise ValueError(
                f"unknown ns_coeffs preset {coeffs!r}; presets: "
                f"{sorted(NS_COEFFS_PRESETS)}"
            )
        coeffs = NS_COEFFS_PRESETS[coeffs]
    array = np.asarray(coeffs, np.float32)
    if array.ndim not in (1, 2) or array.shape[-1] != 3:
        raise ValueError(f"ns_coeffs must have shape (3,) or (n, 3), got {array.shape}")
    if array.ndim == 2:
        if array.shape[0] > ns_steps:
            raise ValueError(
                f"ns_coeffs gives {array.shape[0]} steps of coefficients, more "
                f"than ns_steps={ns_steps}"
            )
        array = array[-ns_steps:]
    return array


def _nested_tuple(x: Any) -> Any:
    return tuple(_nested_tuple(v) for v in x) if isinstance(x, list) else x


class MuonState(eqx.Module):
    """Muon's state (optax's fields): the count, the momentum and the
    Newton-Schulz coefficients."""

    count: Array
    mu: Updates
    ns_coeffs: Array


class ScaleByMuon(AbstractTransform):
    """Muon's direction: Nesterov momentum, orthogonalized matrix by matrix.

    ``mu = beta mu + (1 - beta) g``; with ``nesterov``, the bias-corrected
    look-ahead ``beta mu_hat_{t+1} + (1 - beta) g_hat_t``; then
    ``U = NS(mu_hat)`` (:func:`newton_schulz`), and with ``adaptive``
    ``U <- <mu_hat, U> U`` (Bernstein & Newhouse, "Old Optimizer, New Norm:
    An Anthology", 2024). Jordan et al., "Muon: An optimizer for hidden layers
    in neural networks", 2024.
    """

    ns_coeffs: tuple = eqx.field(static=True)
    ns_steps: int = eqx.field(static=True)
    beta: Hyperparameter = hyperparameter("beta", UNIT_INTERVAL)
    eps: Hyperparameter = hyperparameter("eps", NONNEGATIVE)
    mu_dtype: jnp.dtype | None = eqx.field(static=True)
    nesterov: bool = eqx.field(static=True)
    adaptive: bool = eqx.field(static=True)
    preconditioning: str = eqx.field(static=True)
    weight_dimension_numbers: Any = eqx.field(static=True)

    def init(self, params: Params) -> MuonState:
        return MuonState(
            zero_count(),
            zeros_like(params, self.mu_dtype),
            jnp.asarray(self.ns_coeffs, jnp.float32),
        )

    def update(
        self, grads: Updates, state: MuonState, params: Params | None = None
    ) -> tuple[Updates, MuonState]:
        del params
        beta = resolve(self.beta, state.count, name="beta")
        eps = resolve(self.eps, state.count, name="eps")
        mu = jax.tree.map(lambda g, m: ema(g, m, beta, 1), grads, state.mu)
        count = safe_increment(state.count)
        if self.nesterov:
            ahead = safe_increment(count)
            mu_hat = jax.tree.map(
                lambda m, g: add(
                    beta.astype(m.dtype) * bias_correction(m, beta, ahead),
                    (1 - beta).astype(g.dtype) * bias_correction(g, beta, count),
                ),
                mu,
                grads,
            )
        else:
            mu_hat = jax.tree.map(lambda m: bias_correction(m, beta, count), mu)
        updates = self._orthogonalize(mu_hat, state.ns_coeffs, eps)
        if self.adaptive:
            updates = jax.tree.map(
                lambda x, y: jnp.sum(x.conj() * y) * y, mu_hat, updates
            )
        return updates, MuonState(count, cast(mu, self.mu_dtype), state.ns_coeffs)

    def _orthogonalize(self, tree: Updates, coeffs: Array, eps: Array) -> Updates:
        layout = current_matrix_layout()
        leaves = dimension_numbers_of(self.weight_dimension_numbers, tree)
        items, owners, undo, specs = [], [], [], []
        for path, x, d in leaves:
            if d is None and x.ndim != 2:
                raise ValueError(_NOT_A_MATRIX.format(path=path, desc=describe(x)))
            d = d or MuonDimensionNumbers()
            stack, inverse = _to_matrices(x, d)
            spec = None if layout is None else layout.spec(path, tuple(x.shape))
            plain = x.ndim == 2 and _axes(2, d)[1:] == ((0,), (1,))
            undo.append(inverse)
            specs.append(None if plain else spec)
            for j in range(stack.shape[0]):
                items.append(Item([stack[j]], [spec], [spec if plain else None]))
                owners.append(len(undo) - 1)
        fn = lambda m: (
            newton_schulz(m, coeffs, self.ns_steps, self.preconditioning, eps),
        )
        results = per_matrix(fn, items)
        outs: list[list[Array]] = [[] for _ in undo]
        for owner, (r,) in zip(owners, results, strict=True):
            outs[owner].append(r)
        new = []
        for inverse, spec, rs in zip(undo, specs, outs, strict=True):
            y = inverse(jnp.stack(rs))
            new.append(y if spec is None or layout is None else layout.place(y, spec))
        treedef = jax.tree.structure(tree)
        return jax.tree.unflatten(treedef, new)


def scale_by_muon(
    ns_coeffs: Any = DEFAULT_NS_COEFFS,
    ns_steps: int = 5,
    beta: ScalarOrSchedule = 0.95,
    eps: ScalarOrSchedule = 1e-8,
    mu_dtype: DTypeLike | None = None,
    *,
    nesterov: bool = True,
    adaptive: bool = False,
    preconditioning: Literal["frobenius", "spectral", "aol", "schatten"] = "frobenius",
    weight_dimension_numbers: WeightDimNumbers = None,
) -> ScaleByMuon:
    """Rescale updates as Muon does: momentum orthogonalized by Newton-Schulz.

    optax.contrib.scale_by_muon's arguments and numbers; see :class:`ScaleByMuon`.
    Jordan et al., "Muon: An optimizer for hidden layers in neural networks", 2024.
    """
    if preconditioning not in PRECONDITIONINGS:
        raise ValueError(
            f"preconditioning must be one of {PRECONDITIONINGS}, got "
            f"{preconditioning!r}"
        )
    ns_steps = int(ns_steps)
    return ScaleByMuon(
        _nested_tuple(check_ns_coeffs(ns_coeffs, ns_steps).tolist()),
        ns_steps,
        beta,
        eps,
        canonical_dtype(mu_dtype),
        bool(nesterov),
        bool(adaptive),
        preconditioning,
        static_dimension_numbers(weight_dimension_numbers),
    )


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
