"""Combinators: run transforms one after another, or on part of the tree only."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax

from .._base import AbstractTransform, Params, State, Updates, update_with_extra_args
from .._interop import as_transform
from .._tree import StaticTree


class Chain(AbstractTransform):
    """Apply ``transforms`` in order; the state is the tuple of their states.

    Extra arguments (``value``, ``grad``, ...) reach every transform that takes
    them.
    """

    transforms: tuple[AbstractTransform, ...]
    takes_extra_args = True

    def is_elementwise(self) -> bool:
        return all(t.is_elementwise() for t in self.transforms)

    def expects_per_example_grads(self) -> bool:
        # the first transform sees the gradients as given
        return bool(self.transforms) and self.transforms[0].expects_per_example_grads()

    def init(self, params: Params) -> tuple[State, ...]:
        return tuple(t.init(params) for t in self.transforms)

    def update(
        self,
        grads: Updates,
        state: tuple[State, ...],
        params: Params | None = None,
        **extra_args: Any,
    ) -> tuple[Updates, tuple[State, ...]]:
        if len(state) != len(self.transforms):
            raise ValueError(
                f"chain of {len(self.transforms)} transforms got a state of "
                f"{len(state)}; was the state made by another optimizer?"
            )
        new_states = []
        for transform, inner in zip(self.transforms, state, strict=True):
            grads, inner = update_with_extra_args(
                transform, grads, inner, params, extra_args
            )
            new_states.append(inner)
        return grads, tuple(new_states)


def chain(*transforms: Any) -> Chain:
    """Compose transforms: the updates of each feed the next.

    Each argument is a shardopt transform or an optax ``GradientTransformation``
    (wrapped in :class:`~shardopt.OptaxTransform`), so the two libraries mix.
    """
    return Chain(
        tuple(as_transform(t, f"chain argument {i}") for i, t in enumerate(transforms))
    )


class MaskedState(eqx.Module):
    inner_state: State


class Masked(AbstractTransform):
    """Apply ``inner`` only where ``mask`` is True; other updates pass through.

    ``mask`` is a tree of Python bools shaped like the parameters (or a prefix of
    them), or a function of the parameters that returns one. The inner state
    holds ``None`` where the mask is False, so it costs no memory there.
    """

    inner: AbstractTransform
    mask: Callable[[Params], Params] | StaticTree = eqx.field(static=True)
    takes_extra_args = True

    def _mask_for(self, tree: Params) -> Any:
        mask = self.mask.tree if isinstance(self.mask, StaticTree) else self.mask(tree)
        try:
            jax.tree.map(lambda m, _: bool(m), mask, tree)
        except (ValueError, TypeError) as err:
            raise ValueError(
                "the mask must be a tree of bools shaped like the parameters (or "
                f"a prefix of them): {err}"
            ) from err
        return mask

    def init(self, params: Params) -> MaskedState:
        mask = self._mask_for(params)
        return MaskedState(self.inner.init(_keep(mask, params)))

    def update(
        self,
        grads: Updates,
        state: MaskedState,
        params: Params | None = None,
        **extra_args: Any,
    ) -> tuple[Updates, MaskedState]:
        mask = self._mask_for(grads)
        inner_params = None if params is None else _keep(mask, params)
        new, inner_state = update_with_extra_args(
            self.inner, _keep(mask, grads), state.inner_state, inner_params, extra_args
        )
        updates = jax.tree.map(lambda m, n, g: n if m else g, mask, new, grads)
        return updates, MaskedState(inner_state)


def _keep(mask: Any, tree: Params) -> Params:
    return jax.tree.map(lambda m, x: x if m else None, mask, tree)


def masked(inner: Any, mask: Params | Callable[[Params], Params]) -> Masked:
    """Apply ``inner`` (shardopt or optax) to the leaves where ``mask`` is True."""
    inner = as_transform(inner, "masked's inner transform")
    return Masked(inner, mask if callable(mask) else _static_mask(mask))


def _static_mask(mask: Params) -> StaticTree:
    try:
        return StaticTree(mask, bool, "masked's mask")
    except (TypeError, jax.errors.ConcretizationTypeError) as err:
        raise TypeError(
            "masked's mask must be a tree of Python bools (or a function of the "
            f"parameters that returns one): {err}"
        ) from err
