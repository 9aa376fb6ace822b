"""Print the largest relative difference to optax of every optimizer in the test table.

    PYTHONPATH=. python scripts/parity.py

The table (tests/conformance.py) runs 50 steps of each optimizer on a tree
of float32 and bfloat16 leaves; the difference is max |ours - optax| / max |optax|
per leaf, reported as the largest over float32 and over bfloat16 leaves.
"""

import os
import pathlib
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))

import jax
import jax.numpy as jnp
from conformance import (
    ROWS,
    make_shardable_params,
    relative_difference,
    run_oracle,
    run_ours,
)

jax.config.update("jax_numpy_dtype_promotion", "strict")


def main() -> None:
    dtypes = {name: leaf.dtype for name, leaf in make_shardable_params().items()}
    print("| optimizer | float32 max rel. diff | bfloat16 max rel. diff | bound |")
    print("|---|---|---|---|")
    for row in ROWS:
        diffs = relative_difference(run_ours(row).params, run_oracle(row))
        f32 = max(d for k, d in diffs.items() if dtypes[k] == jnp.float32)
        bf16 = max(d for k, d in diffs.items() if dtypes[k] == jnp.bfloat16)
        print(f"| {row.name} | {f32:.1e} | {bf16:.1e} | {row.rtol:.0e} |")


if __name__ == "__main__":
    main()
