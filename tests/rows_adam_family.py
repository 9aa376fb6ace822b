"""The conformance rows of Adam's relatives: Nadam, Adamax, AMSGrad, AdaBelief,
Yogi, RAdam, NovoGrad, Adan and the optimistic methods."""

from __future__ import annotations

import warnings

import jax.numpy as jnp
import optax
from conformance import EXACT_B1, EXACT_B2, Row, weight_mask

import shardopt

# Adan's second beta weighs the gradient's change; any float32-exact value will
# do, distinct from b1 so that a swapped argument shows.
ADAN_B2 = 1 - 2**-4


def _optimistic_adam(lib):
    # deprecated on both sides (and the suite turns warnings into errors)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return lib.optimistic_adam(3e-3, 1e-3, EXACT_B1, EXACT_B2)


ROWS = [
    Row(
        "nadam_exact_betas",
        lambda: shardopt.nadam(1e-2, EXACT_B1, EXACT_B2),
        lambda: optax.nadam(1e-2, EXACT_B1, EXACT_B2),
    ),
    Row(
        "nadamw_masked_exact_betas",
        lambda: shardopt.nadamw(
            1e-2, EXACT_B1, EXACT_B2, weight_decay=0.1, mask=weight_mask
        ),
        lambda: optax.nadamw(
            1e-2, EXACT_B1, EXACT_B2, weight_decay=0.1, mask=weight_mask
        ),
    ),
    Row(
        "adamax_exact_betas",
        lambda: shardopt.adamax(1e-2, EXACT_B1, EXACT_B2),
        lambda: optax.adamax(1e-2, EXACT_B1, EXACT_B2),
    ),
    Row(
        "adamaxw_masked_exact_betas",
        lambda: shardopt.adamaxw(
            1e-2, EXACT_B1, EXACT_B2, weight_decay=0.1, mask=weight_mask
        ),
        lambda: optax.adamaxw(
            1e-2, EXACT_B1, EXACT_B2, weight_decay=0.1, mask=weight_mask
        ),
    ),
    Row(
        "amsgrad_exact_betas",
        lambda: shardopt.amsgrad(1e-2, EXACT_B1, EXACT_B2),
        lambda: optax.amsgrad(1e-2, EXACT_B1, EXACT_B2),
    ),
    Row(
        # the paper's form (no bias correction) with a float32 first moment
        "amsgrad_mu_f32_no_bias_correction_exact_betas",
        lambda: shardopt.amsgrad(
            1e-2,
            EXACT_B1,
            EXACT_B2,
            mu_dtype=jnp.float32,
            bias_correction_mu=False,
            bias_correction_nu=False,
        ),
        lambda: optax.amsgrad(
            1e-2,
            EXACT_B1,
            EXACT_B2,
            mu_dtype=jnp.float32,
            bias_correction_mu=False,
            bias_correction_nu=False,
        ),
    ),
    Row(
        "adabelief_exact_betas",
        lambda: shardopt.adabelief(1e-2, EXACT_B1, EXACT_B2),
        lambda: optax.adabelief(1e-2, EXACT_B1, EXACT_B2),
    ),
    Row(
        "yogi_exact_betas",
        lambda: shardopt.yogi(1e-2, EXACT_B1, EXACT_B2),
        lambda: optax.yogi(1e-2, EXACT_B1, EXACT_B2),
    ),
    Row(
        # the rectified step starts at step 6 (rho_t ~ t with these betas)
        "radam_exact_betas",
        lambda: shardopt.radam(1e-2, EXACT_B1, EXACT_B2),
        lambda: optax.radam(1e-2, EXACT_B1, EXACT_B2),
    ),
    Row(
        # also the Nesterov path AdaBelief shares
        "radam_nesterov_exact_betas",
        lambda: shardopt.radam(1e-2, EXACT_B1, EXACT_B2, nesterov=True),
        lambda: optax.radam(1e-2, EXACT_B1, EXACT_B2, nesterov=True),
    ),
    Row(
        "novograd_weight_decay_exact_betas",
        lambda: shardopt.novograd(1e-2, EXACT_B1, 0.75, weight_decay=1e-2),
        lambda: optax.novograd(1e-2, EXACT_B1, 0.75, weight_decay=1e-2),
    ),
    Row(
        "adan_masked_exact_betas",
        lambda: shardopt.adan(
            1e-2, EXACT_B1, ADAN_B2, EXACT_B2, weight_decay=0.1, mask=weight_mask
        ),
        lambda: optax.adan(
            1e-2, EXACT_B1, ADAN_B2, EXACT_B2, weight_decay=0.1, mask=weight_mask
        ),
    ),
    Row(
        "optimistic_gradient_descent",
        lambda: shardopt.optimistic_gradient_descent(1e-2, alpha=0.5, beta=0.25),
        lambda: optax.optimistic_gradient_descent(1e-2, alpha=0.5, beta=0.25),
    ),
    Row(
        "optimistic_adam_exact_betas",
        lambda: _optimistic_adam(shardopt),
        lambda: _optimistic_adam(optax),
    ),
    Row(
        "optimistic_adam_v2_exact_betas",
        lambda: shardopt.optimistic_adam_v2(
            1e-2, alpha=0.5, beta=0.25, b1=EXACT_B1, b2=EXACT_B2
        ),
        lambda: optax.optimistic_adam_v2(
            1e-2, alpha=0.5, beta=0.25, b1=EXACT_B1, b2=EXACT_B2
        ),
    ),
]
