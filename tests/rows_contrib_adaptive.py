"""The conformance rows of optax.contrib's adaptive optimizers: ACProp, AdEMAMix
(and simplified), ADOPT, COCOB, D-Adaptation AdamW, Prodigy, DoG, DoWG, MADGRAD
and normalize.

MoMo and MoMo-Adam need the loss at every step, which the table's step does not
pass: tests/test_contrib_momo.py checks them against optax instead.
"""

from __future__ import annotations

import optax
from conformance import DECIMAL_BETAS_RTOL, EXACT_B1, EXACT_B2, Row, weight_mask

import shardopt

# a b2 whose square root float32 also holds exactly: D-Adaptation and Prodigy
# use sqrt(b2), which optax folds in float64
SQRT_EXACT_B2 = (1 - 2**-5) ** 2
EXACT_B3 = 1 - 2**-12


def _alpha(lib):
    return lib.linear_schedule(0.0, 5.0, 40)


ROWS = [
    Row(
        "acprop",
        lambda: shardopt.acprop(1e-2),
        lambda: optax.contrib.acprop(1e-2),
        DECIMAL_BETAS_RTOL,
        "b2=0.999: optax folds 1 - b2 in float64, shardopt in float32",
    ),
    Row(
        "acprop_masked_decay_exact_betas",
        lambda: shardopt.acprop(
            1e-2, EXACT_B1, EXACT_B2, weight_decay=0.1, mask=weight_mask
        ),
        lambda: optax.contrib.acprop(
            1e-2, EXACT_B1, EXACT_B2, weight_decay=0.1, mask=weight_mask
        ),
    ),
    Row(
        "ademamix",
        lambda: shardopt.ademamix(1e-2),
        lambda: optax.contrib.ademamix(1e-2),
        DECIMAL_BETAS_RTOL,
        "b1, b2, b3 decimal: optax folds 1 - b in float64, shardopt in float32",
    ),
    Row(
        "ademamix_alpha_schedule_exact_betas",
        lambda: shardopt.ademamix(
            1e-2,
            EXACT_B1,
            EXACT_B2,
            EXACT_B3,
            _alpha(shardopt),
            weight_decay=0.1,
            mask=weight_mask,
        ),
        lambda: optax.contrib.ademamix(
            1e-2,
            EXACT_B1,
            EXACT_B2,
            EXACT_B3,
            _alpha(optax),
            weight_decay=0.1,
            mask=weight_mask,
        ),
    ),
    Row(
        "simplified_ademamix",
        lambda: shardopt.simplified_ademamix(1e-2),
        lambda: optax.contrib.simplified_ademamix(1e-2),
    ),
    Row(
        "simplified_ademamix_alpha_exact_betas",
        # b2 = 1 - 2**-10 drives the bfloat16 leaf's ``g**2 + b2 (n - g**2)``
        # below zero in optax too (NaN in both): a b2 bfloat16 can carry
        lambda: shardopt.simplified_ademamix(
            1e-2, EXACT_B1, 0.75, alpha=2.0, weight_decay=0.1
        ),
        lambda: optax.contrib.simplified_ademamix(
            1e-2, EXACT_B1, 0.75, alpha=2.0, weight_decay=0.1
        ),
    ),
    Row("adopt", lambda: shardopt.adopt(1e-2), lambda: optax.contrib.adopt(1e-2)),
    Row(
        "adopt_nesterov_unclipped",
        lambda: shardopt.adopt(1e-2, nesterov=True, use_clipping=False),
        lambda: optax.contrib.adopt(1e-2, nesterov=True, use_clipping=False),
    ),
    Row("cocob", lambda: shardopt.cocob(), lambda: optax.contrib.cocob()),
    Row(
        "cocob_masked_decay",
        lambda: shardopt.cocob(0.5, alpha=10.0, weight_decay=0.1, mask=weight_mask),
        lambda: optax.contrib.cocob(
            0.5, alpha=10.0, weight_decay=0.1, mask=weight_mask
        ),
    ),
    Row(
        "dadapt_adamw",
        lambda: shardopt.dadapt_adamw(),
        lambda: optax.contrib.dadapt_adamw(),
        DECIMAL_BETAS_RTOL,
        "betas (0.9, 0.999) are float32 leaves: optax folds 1 - b1, sqrt(b2) and "
        "1 - sqrt(b2) in float64, and d, a ratio of two EMAs, carries the gap "
        "to every leaf (2.7e-6 measured; 2e-7 with the exact betas below)",
    ),
    Row(
        "dadapt_adamw_decay_exact_betas",
        lambda: shardopt.dadapt_adamw(0.5, (EXACT_B1, SQRT_EXACT_B2), weight_decay=0.1),
        lambda: optax.contrib.dadapt_adamw(
            0.5, (EXACT_B1, SQRT_EXACT_B2), weight_decay=0.1
        ),
    ),
    Row("prodigy", lambda: shardopt.prodigy(), lambda: optax.contrib.prodigy()),
    Row(
        "prodigy_safeguard_decay_exact_betas",
        lambda: shardopt.prodigy(
            0.5,
            (EXACT_B1, SQRT_EXACT_B2),
            beta3=EXACT_B1,
            weight_decay=0.1,
            safeguard_warmup=True,
        ),
        lambda: optax.contrib.prodigy(
            0.5,
            (EXACT_B1, SQRT_EXACT_B2),
            beta3=EXACT_B1,
            weight_decay=0.1,
            safeguard_warmup=True,
        ),
    ),
    Row("dog", lambda: shardopt.dog(), lambda: optax.contrib.dog()),
    Row(
        "dog_learning_rate_init",
        lambda: shardopt.dog(0.5, ("learning_rate", 1e-3)),
        lambda: optax.contrib.dog(0.5, ("learning_rate", 1e-3)),
    ),
    Row(
        "dog_distance_init_masked_decay",
        lambda: shardopt.dog(
            init_step=("distance", 1e-3), weight_decay=0.1, mask=weight_mask
        ),
        lambda: optax.contrib.dog(
            init_step=("distance", 1e-3), weight_decay=0.1, mask=weight_mask
        ),
    ),
    Row("dowg", lambda: shardopt.dowg(), lambda: optax.contrib.dowg()),
    Row(
        "dowg_init_masked_decay",
        lambda: shardopt.dowg(
            0.5, init_estim_sq_dist=1e-2, weight_decay=0.1, mask=weight_mask
        ),
        lambda: optax.contrib.dowg(
            0.5, init_estim_sq_dist=1e-2, weight_decay=0.1, mask=weight_mask
        ),
    ),
    Row("madgrad", lambda: shardopt.madgrad(1e-2), lambda: optax.contrib.madgrad(1e-2)),
    Row(
        "madgrad_decay_exact_momentum",
        lambda: shardopt.madgrad(1e-2, momentum=EXACT_B1, weight_decay=0.1),
        lambda: optax.contrib.madgrad(1e-2, momentum=EXACT_B1, weight_decay=0.1),
    ),
    Row(
        "normalize_sgd",
        lambda: shardopt.chain(shardopt.normalize(), shardopt.sgd(1e-1)),
        lambda: optax.chain(optax.contrib.normalize(), optax.sgd(1e-1)),
    ),
]

# MoMo's step needs the loss (value=), which the table's step does not pass.
ELSEWHERE = {
    "momo": "tests/test_contrib_momo.py (value= through Optimizer.step)",
    "momo_adam": "tests/test_contrib_momo.py (value= through Optimizer.step)",
}
