"""The conformance rows of the matrix optimizers: Muon against optax.contrib.muon.

The table's tree has a (8, 3) matrix and a (16, 3) bfloat16 matrix (Muon's),
a scalar, a vector and a (3, 5, 16) cube (AdamW's, or Muon's as three 5 x 16
matrices when dimension numbers say so). Shampoo and SOAP have no optax
oracle: their tests are named in ELSEWHERE.
"""

from __future__ import annotations

import jax
import optax
from conformance import DECIMAL_BETAS_RTOL, EXACT_B1, EXACT_B2, Row

import shardopt

# every dimension-numbers tree below is shaped like the table's parameters
CUBE_AS_MATRICES = {
    "cube": shardopt.MuonDimensionNumbers(1, 2),
    "half": shardopt.MuonDimensionNumbers(),
    "matrix": shardopt.MuonDimensionNumbers(),
    "scalar": None,
    "vector": None,
}
CUBE_AS_MATRICES_OPTAX = {
    k: None if v is None else optax.contrib.MuonDimensionNumbers(*v)
    for k, v in CUBE_AS_MATRICES.items()
}
# the spectral norm is an SVD, which XLA:CPU has no bfloat16 kernel for
FLOAT32_MATRIX_LABELS = {
    "cube": "sgd",
    "half": "sgd",
    "matrix": "muon",
    "scalar": "sgd",
    "vector": "sgd",
}
EXACT_ADAM = {"adam_b1": EXACT_B1, "adam_b2": EXACT_B2}


def _every_matrix(updates):
    return jax.tree.map(lambda _: optax.contrib.MuonDimensionNumbers(), updates)


def _muon(lib, learning_rate=3e-2, **kw):
    module = shardopt if lib == "shardopt" else optax.contrib
    return lambda: module.muon(learning_rate, **kw)


ROWS = [
    Row(
        "muon",
        _muon("shardopt", 1e-2),
        _muon("optax", 1e-2),
        DECIMAL_BETAS_RTOL,
        note="the AdamW fallback's b2 = 0.999 (see DECIMAL_BETAS_RTOL)",
    ),
    Row(
        "muon_adaptive_aol_exact_betas",
        _muon(
            "shardopt", beta=0.875, adaptive=True, preconditioning="aol", **EXACT_ADAM
        ),
        _muon("optax", beta=0.875, adaptive=True, preconditioning="aol", **EXACT_ADAM),
    ),
    Row(
        "muon_dion_no_nesterov_consistent_rms_decay_exact_betas",
        _muon(
            "shardopt",
            ns_coeffs="dion",
            beta=0.875,
            nesterov=False,
            consistent_rms=0.2,
            weight_decay=0.1,
            **EXACT_ADAM,
        ),
        _muon(
            "optax",
            ns_coeffs="dion",
            beta=0.875,
            nesterov=False,
            consistent_rms=0.2,
            weight_decay=0.1,
            **EXACT_ADAM,
        ),
    ),
    Row(
        "muon_cube_dimension_numbers_schatten_exact_betas",
        lambda: shardopt.muon(
            3e-2,
            beta=0.875,
            preconditioning="schatten",
            muon_weight_dimension_numbers=CUBE_AS_MATRICES,
            **EXACT_ADAM,
        ),
        lambda: optax.contrib.muon(
            3e-2,
            beta=0.875,
            preconditioning="schatten",
            muon_weight_dimension_numbers=CUBE_AS_MATRICES_OPTAX,
            **EXACT_ADAM,
        ),
    ),
    Row(
        "scale_by_muon_spectral_scale_by_shape",
        lambda: shardopt.partition(
            {
                "muon": shardopt.chain(
                    shardopt.scale_by_muon(beta=0.875, preconditioning="spectral"),
                    shardopt.scale_by_shape(),
                    shardopt.scale(-3e-2),
                ),
                "sgd": shardopt.scale(-3e-2),
            },
            FLOAT32_MATRIX_LABELS,
        ),
        lambda: optax.partition(
            {
                "muon": optax.chain(
                    # optax's fail on None (a tree of updates), though their
                    # docstrings allow it: ours take None as "every leaf 2-D"
                    optax.contrib.scale_by_muon(
                        beta=0.875,
                        preconditioning="spectral",
                        weight_dimension_numbers=_every_matrix,
                    ),
                    optax.contrib._muon.scale_by_shape(_every_matrix),
                    optax.scale(-3e-2),
                ),
                "sgd": optax.scale(-3e-2),
            },
            FLOAT32_MATRIX_LABELS,
        ),
    ),
]

_SECOND_ORDER = (
    "tests/test_matrix.py (no optax oracle: convergence on a quadratic, on "
    "Rosenbrock and on a small MLP; ZeRO stages 0-3 on 8 devices; collectives)"
)
ELSEWHERE: dict[str, str] = {
    "shampoo": _SECOND_ORDER,
    "scale_by_shampoo": _SECOND_ORDER,
    "soap": _SECOND_ORDER,
    "scale_by_soap": _SECOND_ORDER,
}
