"""8-bit block-wise quantized optimizer state, for any transform.

Dettmers, Lewis, Shleifer & Zettlemoyer, "8-bit Optimizers via Block-wise
Quantization", ICLR 2022. Each large floating state leaf (a moment that mirrors
a parameter) is stored as one ``uint8`` code per element plus one ``float32``
scale per block of ``block_size`` consecutive elements along the last axis of
each row. A block ``x`` is stored as ``s = max|x|`` and ``code_i`` = the index
of the value of the *dynamic* map ``Q`` (256 values, non-linear: dense near 0,
a decimal exponent and a linear fraction) nearest to ``x_i / s``; it reads back
as ``Q[code_i] * s``. Blocks whose values are all >= 0 (Adam's second moment,
always) use the unsigned map, which has twice the resolution; the others use
the signed map. The map a block uses is the sign of its stored scale, so the
state is still one byte per element and one float per block.

Blocks run along the last axis, so that a ZeRO partition of any other axis
keeps whole rows (hence whole blocks) on each device; the plan partitions the
last axis only when its shards hold whole blocks (``shardopt.sharding`` reads
:attr:`QuantizedArray.block_fields`). Quantizing a block reads that block only,
so the numbers do not depend on the layout.
"""

from __future__ import annotations

from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PyTree

from .._base import (
    AbstractTransform,
    Params,
    State,
    Updates,
    update_with_extra_args,
)

STATE_BITS = (8,)


def dynamic_map(signed: bool) -> np.ndarray:
    """The 256 values of Dettmers' dynamic quantization map, sorted, float32.

    With ``E = 7`` exponent levels, level ``i`` holds the midpoints of an even
    split of ``[0.1, 1]`` into ``2**i`` (signed: and their negatives) or
    ``2**(i+1)`` (unsigned) parts, times ``10**(i - 6)``; plus 0 and 1. This is
    ``bitsandbytes.functional.create_dynamic_map(signed)`` (the signed map has
    1 but not -1).
    """
    values = [0.0, 1.0]
    for i in range(7):
        parts = 2**i if signed else 2 ** (i + 1)
        bounds = np.linspace(0.1, 1.0, parts + 1)
        means = (bounds[:-1] + bounds[1:]) / 2.0 * 10.0 ** (i - 6)
        values += list(means) + (list(-means) if signed else [])
    out = np.sort(np.asarray(values, np.float64)).astype(np.float32)
    assert out.shape == (256,)
    return out


SIGNED_MAP = dynamic_map(signed=True)
UNSIGNED_MAP = dynamic_map(signed=False)
# x / s goes to code i when MID[i-1] < x / s <= MID[i]: the nearest value.
# Both maps' 255 midpoints, each padded with +inf to 256 and laid end to end
# (unsigned first), for the binary search of _nearest_code.
_MIDS = np.concatenate(
    [
        np.append((m[:-1] + (m[1:] - m[:-1]) / 2).astype(np.float32), np.inf)
        for m in (UNSIGNED_MAP, SIGNED_MAP)
    ]
).astype(np.float32)


def _nearest_code(y: Array, signed: Array) -> Array:
    """The index of the map value nearest to each ``y``: the number of the
    map's midpoints below it (``searchsorted(mids, y, side="left")``).

    A branchless binary search over the 256-entry padded table, 8 probes an
    element, in the signed or unsigned table as ``signed`` says: comparing
    each element with all 255 midpoints of both maps costs 64x as much.
    """
    base = jnp.broadcast_to(jnp.where(signed, 256, 0), y.shape).astype(jnp.int32)
    mids = jnp.asarray(_MIDS)
    pos = jnp.zeros(y.shape, jnp.int32)
    for step in (128, 64, 32, 16, 8, 4, 2, 1):
        below = ~(mids[base + pos + (step - 1)] >= y)  # NaN: last, as sorting
        pos = jnp.where(below, pos + step, pos)
    return pos


class QuantizedArray(eqx.Module):
    """One state leaf in 8 bits: ``codes`` (uint8, the leaf's shape) and
    ``scales`` (float32, one per block of ``block_size`` along the last axis:
    shape ``(*shape[:-1], ceil(shape[-1] / block_size))``; negative: the block
    uses the signed map). ``dtype`` is the leaf's dtype when read back."""

    # Read by the sharding plan (without importing this layer): for each field,
    # whether its last axis counts blocks of ``block_size`` of the leaf's last
    # axis (True) or is that axis itself (False). The plan lays both out like
    # the state leaf they replace, partitioning the last axis only where each
    # shard holds whole blocks.
    block_fields: ClassVar[dict[str, bool]] = {"codes": False, "scales": True}

    codes: Array
    scales: Array
    block_size: int = eqx.field(static=True)
    dtype: Any = eqx.field(static=True)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)


def _blocks(x: Array, block_size: int, fill: Any) -> Array:
    """``x`` padded with ``fill`` to whole blocks and split: ``(..., nb, B)``."""
    last = x.shape[-1]
    nb = -(-last // block_size)
    pad = [(0, 0)] * (x.ndim - 1) + [(0, nb * block_size - last)]
    if nb * block_size != last:
        x = jnp.pad(x, pad, constant_values=fill)
    return x.reshape(*x.shape[:-1], nb, block_size)


def quantize(x: Array, block_size: int) -> QuantizedArray:
    """Block-wise dynamic 8-bit quantization of ``x`` along its last axis."""
    if x.ndim == 0:
        raise ValueError(f"cannot quantize a scalar ({x.dtype}) in blocks")
    blocks = _blocks(x.astype(jnp.float32), block_size, 0.0)
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    signed = jnp.min(blocks, axis=-1) < 0
    safe = jnp.where(absmax > 0, absmax, jnp.float32(1))
    y = blocks / safe[..., None]
    code = _nearest_code(y, signed[..., None]).astype(jnp.uint8)
    code = code.reshape(*x.shape[:-1], -1)[..., : x.shape[-1]]
    scales = jnp.where(signed, -absmax, absmax)
    return QuantizedArray(code, scales, block_size, jnp.dtype(x.dtype))


def dequantize(q: QuantizedArray) -> Array:
    """The values ``q`` stands for: ``Q[code] * |scale|``, in ``q.dtype``."""
    codes = _blocks(q.codes, q.block_size, 0)
    scale = q.scales[..., None]
    table = jnp.where(
        scale < 0, jnp.asarray(SIGNED_MAP)[codes], jnp.asarray(UNSIGNED_MAP)[codes]
    )
    out = (table * jnp.abs(scale)).reshape(*q.codes.shape[:-1], -1)
    return out[..., : q.codes.shape[-1]].astype(q.dtype)


def _is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedArray)


class QuantizeState(AbstractTransform):
    """``inner`` with its large floating state leaves kept in 8 bits.

    See :func:`quantize_state`.
    """

    takes_extra_args: ClassVar[bool] = True

    inner: AbstractTransform
    block_size: int = eqx.field(static=True)
    min_size: int = eqx.field(static=True)

    def _wanted(self, leaf: Any) -> bool:
        return (
            eqx.is_array(leaf)
            and jnp.issubdtype(leaf.dtype, jnp.floating)
            and leaf.ndim >= 1
            and leaf.size >= self.min_size
        )

    def init(self, params: Params) -> State:
        # The barrier keeps XLA from constant-folding the quantization of a
        # constant state (zeros), which is slow to evaluate at compile time.
        state = jax.lax.optimization_barrier(self.inner.init(params))
        return jax.tree.map(
            lambda x: quantize(x, self.block_size) if self._wanted(x) else x, state
        )

    def update(
        self,
        grads: Updates,
        state: State,
        params: Params | None = None,
        **extra_args: Any,
    ) -> tuple[Updates, State]:
        inner_state = jax.tree.map(
            lambda x: dequantize(x) if _is_quantized(x) else x,
            state,
            is_leaf=_is_quantized,
        )
        updates, new = update_with_extra_args(
            self.inner, grads, inner_state, params, extra_args
        )

        def store(old: Any, x: PyTree) -> PyTree:
            if not _is_quantized(old):
                return x
            return quantize(x.astype(old.dtype), old.block_size)

        return updates, jax.tree.map(store, state, new, is_leaf=_is_quantized)


def quantize_state(
    inner: AbstractTransform,
    *,
    block_size: int = 256,
    min_size: int = 4096,
) -> QuantizeState:
    """Keep ``inner``'s state in 8 bits: 1 byte per element + 4 per block.

    Every floating state leaf of ``min_size`` elements or more (the moments
    that mirror large parameters) is stored block-wise quantized
    (:class:`QuantizedArray`: Dettmers et al. 2022, dynamic map, one absmax
    scale per ``block_size`` elements along the last axis); counts, scalars
    and small leaves stay as they are. Each update reads the state back in its
    own dtype (float32), runs ``inner``, and quantizes the new state. AdamW's
    state costs ``2 + 8 / block_size`` bytes per parameter (float32: 8).

    Args:
        inner: any transform, e.g. ``shardopt.adamw(1e-3)``; the catalogue's
            ``adam``, ``adamw``, ``lion`` and ``sgd`` take ``state_bits=8``.
        block_size: elements per scale, along the last axis of each row (a
            row's last block may be shorter). Blocks never straddle a ZeRO
            shard: the plan partitions another axis instead.
        min_size: smaller leaves stay unquantized.
    """
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if not isinstance(min_size, int) or min_size < 1:
        raise ValueError(f"min_size must be a positive int, got {min_size!r}")
    return QuantizeState(inner, block_size, min_size)


def with_state_bits(
    transform: AbstractTransform, state_bits: int | None
) -> AbstractTransform:
    """``transform`` itself (``state_bits=None``) or its 8-bit state form."""
    if state_bits is None:
        return transform
    if state_bits not in STATE_BITS:
        raise ValueError(
            f"state_bits must be None (the state's own dtype) or one of "
            f"{STATE_BITS}, got {state_bits!r}"
        )
    return quantize_state(transform)
