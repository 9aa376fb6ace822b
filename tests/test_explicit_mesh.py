"""Rows of the conformance table on a data x model mesh with Explicit axes.

The table's ZeRO column runs on a 1-D mesh with Auto axes. With Explicit axes
an array's type carries its layout and JAX raises where an operation's output
layout is ambiguous: a contraction over a dim sharded on "model" (the inner
products of D-Adaptation, Prodigy and Mechanic), a ravel of such a leaf
(flatten), the whole-matrix SVD and projections of GaLore. These rows, and
one of each other kind of math (elementwise, whole-matrix, Hessian estimate),
run here with a tensor-parallel cube under ZeRO stages 1 and 3 and must give
the unsharded numbers to the table's ZeRO tolerance.

Rows where a bfloat16 value of the state is rounded inside a fused update
(10 of the table, listed in docs/zero.md) are not here: XLA may skip such a
rounding (``--xla_allow_excess_precision``, on by default), and which it
skips depends on the program, so their state can differ from the unsharded
run by an ulp, which later steps carry on. With that flag off they match too
(run by hand).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from conformance import ROWS_BY_NAME, make_shardable_params, ours_step
from jax.sharding import PartitionSpec as P
from test_conformance import SHARDED_STEPS, assert_trees_close, unsharded

import shardopt

NAMES = [
    "dadapt_adamw",
    "prodigy",
    "mechanize_adam",
    "flatten_adam",
    "galore",
    "galore_dimension_numbers_decay_masked",
    "adam",
    "muon",
    "sophia_squared_gradient_estimate",
]
# the cube's last dim on "model" (tensor parallel), the rest replicated on it
SPECS = {"cube": P(None, None, "model")}


@pytest.mark.parametrize("stage", [1, 3])
@pytest.mark.parametrize("name", NAMES)
def test_row_on_an_explicit_data_by_model_mesh(name, stage):
    mesh = jax.make_mesh((4, 2), ("data", "model"))  # Explicit axes
    plan = shardopt.zero(stage, mesh, ("data",), min_size=0)
    params = plan.shard_params(make_shardable_params(), SPECS)
    opt = shardopt.Optimizer(ROWS_BY_NAME[name].ours(), params, plan=plan)
    for step in range(SHARDED_STEPS):  # the table's unsharded runs are shared
        params, opt = ours_step(jnp.int32(step), params, opt)
    want = unsharded(name)
    assert_trees_close(params, want.params)
    assert_trees_close((opt.state, opt.count), (want.final.state, want.final.count))
    assert params["cube"].sharding.spec == P(None, None, "model")
