"""Layout-independent checksums of arrays: per shard on device at save, numpy to verify.

For the bits ``b`` of an array read as unsigned integers in row-major order
(an 8-byte element counts as two 4-byte words), the checksum is the pair
``(sum_i b_i * (i * K1 + 1), sum_i b_i * (i * K2 + 1))`` modulo ``2**32``.
Modular sums do not depend on the order in which their parts are added, so the
value is the same whichever devices hold which shard, on any mesh. It is
sensitive to both the values and their positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

K1 = 2654435761
K2 = 2246822519
MASK = 0xFFFFFFFF


def _bits_jax(x: jax.Array) -> jax.Array:
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = jnp.dtype(x.dtype).itemsize
    if size == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


@jax.jit
def _checksum(x: jax.Array) -> jax.Array:
    bits = _bits_jax(x).reshape(-1)
    index = jax.lax.iota(jnp.uint32, bits.shape[0])
    one = jnp.uint32(1)
    first = jnp.sum(bits * (index * jnp.uint32(K1) + one), dtype=jnp.uint32)
    second = jnp.sum(bits * (index * jnp.uint32(K2) + one), dtype=jnp.uint32)
    return jnp.stack([first, second])


def dispatch(leaves: list[jax.Array]) -> list[jax.Array | None]:
    """Start the checksums of ``leaves`` on device; returns at once.

    A replicated leaf is summed on one device; a sharded one by every device
    over its own shard, then added across devices. Starting the computation
    before ``save`` returns keeps it valid if the caller then donates or
    deletes the arrays. With several processes, process 0 holds the sums and
    the others ``None`` (their part is zero).
    """
    out: list[jax.Array | None] = []
    with jax.numpy_dtype_promotion("standard"):
        for leaf in leaves:
            if leaf.sharding.is_fully_replicated:
                if jax.process_index() != 0:
                    out.append(None)
                    continue
                leaf = leaf.addressable_shards[0].data
            out.append(_checksum(leaf))
    return out


def combine(parts: list[jax.Array | None]) -> list[list[int]]:
    """Block on the checksums started by :func:`dispatch`: ``[c1, c2]`` per leaf."""
    multi = jax.process_count() > 1
    out = []
    for part in parts:
        if part is None or (multi and jax.process_index() != 0):
            out.append([0, 0])
        else:
            out.append([int(v) for v in np.asarray(part.addressable_data(0))])
    return out


def add_partials(partials: list[list[list[int]]]) -> list[list[int]]:
    """Add per-process partial checksums (mod 2**32)."""
    return (
        [
            [sum(p[i][k] for p in partials) & MASK for k in range(2)]
            for i in range(len(partials[0]))
        ]
        if partials
        else []
    )


def checksum_numpy(x: np.ndarray) -> list[int]:
    """The checksum of a whole array, computed on the host."""
    x = np.ascontiguousarray(x)
    if x.dtype == np.bool_:
        bits = x.astype(np.uint32)
    elif x.dtype.itemsize == 8:
        bits = x.view(np.uint32)
    else:
        unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]
        bits = x.view(unsigned).astype(np.uint32)
    bits = bits.reshape(-1)
    index = np.arange(bits.shape[0], dtype=np.uint32)
    with np.errstate(over="ignore"):
        first = np.sum(bits * (index * np.uint32(K1) + np.uint32(1)), dtype=np.uint32)
        second = np.sum(bits * (index * np.uint32(K2) + np.uint32(1)), dtype=np.uint32)
    return [int(first), int(second)]
