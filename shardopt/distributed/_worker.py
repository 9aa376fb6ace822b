"""The child side of shardopt.launch_local (``python -m shardopt.distributed._worker``).

Joins the job (``jax.distributed.initialize`` through initialize_multihost),
runs the target, writes its pickled return value, and exits. Every path out is
bounded: a watchdog dumps every thread's stack and exits when the time is up,
and an exception exits at once (``os._exit``) rather than waiting in JAX's
shutdown barrier for peers that may be stuck in a collective.
"""

from __future__ import annotations

import faulthandler
import importlib
import os
import pickle
import runpy
import sys
import traceback
from typing import Any


def _to_host(tree: Any) -> Any:
    import jax
    import numpy as np

    def convert(x):
        if not isinstance(x, jax.Array):
            return x
        if x.is_fully_addressable:
            return np.asarray(x)
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        raise TypeError(
            f"a returned array ({x.dtype}{list(x.shape)}, sharding {x.sharding}) "
            "spans several processes and is not replicated, so no process holds "
            "all of it: return jax.experimental.multihost_utils.process_allgather"
            "(x, tiled=True) instead."
        )

    return jax.tree.map(convert, tree)


def _run(spec: dict[str, Any]) -> Any:
    import jax

    for name, value in spec["jax_config"].items():
        jax.config.update(name, value)

    from shardopt.distributed._multihost import initialize_multihost

    initialize_multihost()
    kind, where, name = spec["target"]
    if kind == "script":
        sys.argv = [where, *map(str, spec["args"])]
        runpy.run_path(where, run_name="__main__")
        return None
    if kind == "main":
        function: Any = runpy.run_path(where, run_name="__shardopt_main__")
        first, _, rest = name.partition(".")
        function = function[first]
        name = rest
    else:
        function = importlib.import_module(where)
    for part in filter(None, name.split(".")):
        function = getattr(function, part)
    return function(*spec["args"], **spec["kwargs"])


def main() -> None:
    with open(sys.argv[1], "rb") as file:
        spec = pickle.load(file)
    # Exit by ourselves, with every thread's stack, before the launcher kills us.
    faulthandler.dump_traceback_later(spec["timeout"], exit=True)
    try:
        value = _to_host(_run(spec))
        with open(spec["result_path"], "wb") as file:
            pickle.dump(value, file)
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    import jax

    # All processes finished: leave together (a bounded barrier).
    jax.distributed.shutdown()
    faulthandler.cancel_dump_traceback_later()


if __name__ == "__main__":
    main()
