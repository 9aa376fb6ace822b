"""Combinators: run transforms one after another, or on part of the tree only."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax

from ._base import AbstractTransform, Params, State, Updates


class Chain(AbstractTransform):
    """Apply ``transforms`` in order; the state is the tuple of their states."""

    transforms: tuple[AbstractTransform, ...]

    def init(self, params: Params) -> tuple[State, ...]:
        return tuple(t.init(params) for t in self.transforms)

    def update(
        self, grads: Updates, state: tuple[State, ...], params: Params | None = None
    ) -> tuple[Updates, tuple[State, ...]]:
        if len(state) != len(self.transforms):
            raise ValueError(
                f"chain of {len(self.transforms)} transforms got a state of "
                f"{len(state)}; was the state made by another optimizer?"
            )
        new_states = []
        for transform, inner in zip(self.transforms, state, strict=True):
            grads, inner = transform.update(grads, inner, params)
            new_states.append(inner)
        return grads, tuple(new_states)


def chain(*transforms: AbstractTransform) -> Chain:
    """Compose transforms: the updates of each feed the next."""
    for i, transform in enumerate(transforms):
        if not isinstance(transform, AbstractTransform):
            raise TypeError(
                f"chain argument {i} is a {type(transform).__name__}, not a "
                "shardopt transform"
            )
    return Chain(tuple(transforms))


class MaskedState(eqx.Module):
    inner_state: State


class Masked(AbstractTransform):
    """Apply ``inner`` only where ``mask`` is True; other updates pass through.

    ``mask`` is a tree of Python bools shaped like the parameters (or a prefix of
    them), or a function of the parameters that returns one. The inner state
    holds ``None`` where the mask is False, so it costs no memory there.
    """

    inner: AbstractTransform
    mask: Any

    def _mask_for(self, tree: Params) -> Any:
        mask = self.mask(tree) if callable(self.mask) else self.mask
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
        self, grads: Updates, state: MaskedState, params: Params | None = None
    ) -> tuple[Updates, MaskedState]:
        mask = self._mask_for(grads)
        inner_params = None if params is None else _keep(mask, params)
        new, inner_state = self.inner.update(
            _keep(mask, grads), state.inner_state, inner_params
        )
        updates = jax.tree.map(lambda m, n, g: n if m else g, mask, new, grads)
        return updates, MaskedState(inner_state)


def _keep(mask: Any, tree: Params) -> Params:
    return jax.tree.map(lambda m, x: x if m else None, mask, tree)


def masked(
    inner: AbstractTransform, mask: Params | Callable[[Params], Params]
) -> Masked:
    """Apply ``inner`` to the leaves where ``mask`` is True only."""
    return Masked(inner, mask)
