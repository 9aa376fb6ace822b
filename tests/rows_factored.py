"""Conformance rows of the matrix-wise family: Adafactor, SM3, per-block clipping.

Factoring thresholds are small (``min_dim_size_to_factor`` 2 or 4) so that the
table's matrices and cubes really are factored, on both the odd-sized tree and
the shardable one ((8, 3), (3, 5, 16), (16, 3) bfloat16).
"""

import jax
import jax.numpy as jnp
import optax
from conformance import EXACT_B1, EXACT_B2, Row, weight_mask

import shardopt


def _bounded_decay(step, rate):
    """Zhai et al.'s bounded second-moment decay, for both libraries."""
    t = jnp.asarray(step + 1, jnp.float32)
    return jnp.minimum(1.0 - t ** (-rate), 0.95)


def _scalars_as_vectors(tx: optax.GradientTransformation):
    """optax's SM3 raises IndexError on 0-d leaves (it indexes their empty list
    of accumulators); the oracle runs it on them as 1-element vectors, which is
    what shardopt's SM3 does with a scalar."""

    def lift(tree):
        return jax.tree.map(lambda x: x.reshape(1) if x.ndim == 0 else x, tree)

    def init(params):
        return tx.init(lift(params))

    def update(updates, state, params=None):
        lifted = None if params is None else lift(params)
        new, state = tx.update(lift(updates), state, lifted)
        return jax.tree.map(lambda u, g: u.reshape(g.shape), new, updates), state

    return optax.GradientTransformation(init, update)


ROWS = [
    Row(
        "adafactor_factored",
        lambda: shardopt.adafactor(1e-2, min_dim_size_to_factor=2),
        lambda: optax.adafactor(1e-2, min_dim_size_to_factor=2),
    ),
    Row(
        # 4: the (5, 3) and (11, 3) leaves stay unfactored, the cube is factored
        "adafactor_momentum_weight_decay",
        lambda: shardopt.adafactor(
            1e-2,
            min_dim_size_to_factor=4,
            clipping_threshold=None,
            multiply_by_parameter_scale=False,
            momentum=EXACT_B1,
            weight_decay_rate=1e-3,
            weight_decay_mask=weight_mask,
        ),
        lambda: optax.adafactor(
            1e-2,
            min_dim_size_to_factor=4,
            clipping_threshold=None,
            multiply_by_parameter_scale=False,
            momentum=EXACT_B1,
            weight_decay_rate=1e-3,
            weight_decay_mask=weight_mask,
        ),
    ),
    Row(
        "scale_by_factored_rms_bounded_decay",
        lambda: shardopt.chain(
            shardopt.scale_by_factored_rms(
                min_dim_size_to_factor=2, decay_rate_fn=_bounded_decay
            ),
            shardopt.scale(-1e-2),
        ),
        lambda: optax.chain(
            optax.scale_by_factored_rms(
                min_dim_size_to_factor=2, decay_rate_fn=_bounded_decay
            ),
            optax.scale(-1e-2),
        ),
    ),
    Row(
        "sm3",
        lambda: shardopt.sm3(1e-2, momentum=EXACT_B1),
        lambda: _scalars_as_vectors(optax.sm3(1e-2, momentum=EXACT_B1)),
    ),
    Row(
        "scale_by_sm3_b2",
        lambda: shardopt.chain(
            shardopt.scale_by_sm3(EXACT_B1, EXACT_B2), shardopt.scale(-1e-2)
        ),
        lambda: _scalars_as_vectors(
            optax.chain(optax.scale_by_sm3(EXACT_B1, EXACT_B2), optax.scale(-1e-2))
        ),
    ),
    Row(
        "clip_by_block_rms",
        lambda: shardopt.chain(shardopt.clip_by_block_rms(0.5), shardopt.scale(-0.1)),
        lambda: optax.chain(optax.clip_by_block_rms(0.5), optax.scale(-0.1)),
    ),
    Row(
        "adaptive_grad_clip",
        lambda: shardopt.chain(shardopt.adaptive_grad_clip(1.0), shardopt.scale(-0.1)),
        lambda: optax.chain(optax.adaptive_grad_clip(1.0), optax.scale(-0.1)),
    ),
]
