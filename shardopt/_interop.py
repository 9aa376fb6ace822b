"""optax transforms inside shardopt: any ``GradientTransformation`` as a Module.

An optax transform is a pair of functions closed over its hyperparameters, so
it is kept as a static field: its state is an ordinary pytree (NamedTuples of
arrays) that the ZeRO plan places like any other, each leaf matched to the
parameter whose path its own path ends with. optax itself is not imported: an
optax transform is recognised by its ``init`` and ``update`` functions.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax

from ._base import AbstractTransform, Params, State, Updates


def is_optax_transform(obj: Any) -> bool:
    """True for an optax ``GradientTransformation`` (or anything shaped like one)."""
    return (
        not isinstance(obj, AbstractTransform)
        and callable(getattr(obj, "init", None))
        and callable(getattr(obj, "update", None))
    )


def is_transform(obj: Any) -> bool:
    """True for a shardopt transform or an optax one."""
    return isinstance(obj, AbstractTransform) or is_optax_transform(obj)


class OptaxTransform(AbstractTransform):
    """An optax ``GradientTransformation`` run as a shardopt transform.

    ``init`` and ``update`` are optax's own, so the numbers are optax's. Extra
    arguments (``value``, ``grad``, ...) reach a ``GradientTransformationExtraArgs``
    and are dropped for a plain ``GradientTransformation``, as ``optax.chain``
    does. Its hyperparameters are optax's closure constants: changing one
    means building a new transform (and compiling again). optax is written for
    JAX's standard dtype promotion, so its functions run under it even where a
    user turned on strict promotion.
    """

    inner: Any = eqx.field(static=True)
    takes_extra_args = True

    def init(self, params: Params) -> State:
        with jax.numpy_dtype_promotion("standard"):
            return self.inner.init(params)

    def update(
        self,
        grads: Updates,
        state: State,
        params: Params | None = None,
        **extra_args: Any,
    ) -> tuple[Updates, State]:
        with jax.numpy_dtype_promotion("standard"):
            if _takes_extra_args(self.inner):
                return self.inner.update(grads, state, params, **extra_args)
            return self.inner.update(grads, state, params)


def _takes_extra_args(inner: Any) -> bool:
    # optax.GradientTransformationExtraArgs, by name: optax is not imported.
    return any(
        cls.__name__ == "GradientTransformationExtraArgs" for cls in type(inner).__mro__
    )


def as_transform(obj: Any, where: str) -> AbstractTransform:
    """``obj`` as a shardopt transform: itself, or an optax one wrapped.

    Raises a ``TypeError`` naming ``where`` (e.g. "chain argument 2") and the
    type for anything else.
    """
    if isinstance(obj, AbstractTransform):
        return obj
    if is_optax_transform(obj):
        return OptaxTransform(obj)
    raise TypeError(
        f"{where} must be a shardopt transform (e.g. shardopt.adamw(1e-3)) or an "
        f"optax GradientTransformation, got {type(obj).__name__}: {obj!r:.60}"
    )
