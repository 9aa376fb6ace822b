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

from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike
from jaxtyping import Array

from .._base import (
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
    hyperparameter,
    resolve,
)
from .._tree import describe
from .._tree_math import add, bias_correction, canonical_dtype, cast, ema, zeros_like
from ._matrix_layout import Item, current_matrix_layout, per_matrix
from ._matrix_shapes import (
    MuonDimensionNumbers,
    WeightDimNumbers,
    _axes,
    _to_matrices,
    dimension_numbers_of,
    static_dimension_numbers,
)

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
        canonical_dtype(mu_dtype, "mu_dtype"),
        bool(nesterov),
        bool(adaptive),
        preconditioning,
        static_dimension_numbers(weight_dimension_numbers),
    )
