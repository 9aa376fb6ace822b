"""Every catalogue entry whose state holds floating accumulators has a storage
dtype for them: walked over the whole catalogue, so a new entry without one
fails here.

Each entry is built as its first conformance row builds it (the arguments of
that call are recorded), then again with bfloat16 for every ``*_dtype``
argument it has; the bfloat16 build must keep every accumulator in bfloat16.
An accumulator is a floating state leaf of one dim or more, except the fields
in ``NOT_ACCUMULATORS`` (copies of the parameters and the like, each with the
reason it keeps the parameters' dtype).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conformance import ROWS, make_shardable_params
from jax.sharding import Mesh
from test_catalogue import CATALOGUE

import shardopt
from shardopt._base import update_with_extra_args

BF16 = jnp.dtype(jnp.bfloat16)

# State fields that hold no accumulator, and why they keep their dtype.
NOT_ACCUMULATORS = {
    "x0": "madgrad's starting parameters: subtracted from the parameters",
    "params0": "prodigy's starting parameters: subtracted from the parameters",
    "init_params": "DoG's starting parameters: subtracted from the parameters",
    "init_particles": "COCOB's starting parameters: the bet is added to them",
    "previous_gradient": "the previous gradient, subtracted from the next one",
    "g": "Adan's previous gradient, subtracted from the next one",
    "ns_coeffs": "Muon's Newton-Schulz coefficients, not a per-parameter state",
    "projector": "GaLore's orthonormal projection, refreshed, not accumulated",
    "step_sizes": "Rprop's per-element step sizes: multiplied, not averaged",
    "prev_updates": "Rprop's previous gradient signs",
    "cache": "SAM's saved parameters, restored exactly after the ascent step",
    "measurements": "the measures' own state (measure_with_ema has its dtype)",
    "left": "Shampoo's factors: their inverse roots need float32",
    "right": "Shampoo's factors: their inverse roots need float32",
    "q_left": "SOAP's eigenbases, recomputed from the factors",
    "q_right": "SOAP's eigenbases, recomputed from the factors",
    "params": "L-BFGS's and the line searches' last iterate",
    "updates": "L-BFGS's last update",
    "diff_params_memory": "L-BFGS's curvature pairs, differences kept exact",
    "diff_updates_memory": "L-BFGS's curvature pairs, differences kept exact",
    "grad": "the line search's gradient at the accepted point",
}

# Catalogue entries no conformance row calls: how each is built here (on the
# conformance tree's names, or on matrices where it takes matrices only), or
# why it is no transform with state of its own.
_MATRICES = {"matrix": jax.ShapeDtypeStruct((8, 3), jnp.float32)}
ROWLESS = {
    "QuantizeState": lambda **d: shardopt.quantize_state(shardopt.identity(), **d),
    "quantize_state": lambda **d: shardopt.quantize_state(shardopt.identity(), **d),
    "differentially_private_aggregate": (
        lambda **d: shardopt.differentially_private_aggregate(1.0, 0.5, 0, **d)
    ),
    "dpsgd": lambda **d: shardopt.dpsgd(1e-2, 1.0, 0.5, 0, momentum=0.9, **d),
    "hutchinson_estimator_diag_hessian": (
        lambda **d: shardopt.hutchinson_estimator_diag_hessian(**d)
    ),
    "lbfgs": lambda **d: shardopt.lbfgs(**d),
    "scale_by_lbfgs": lambda **d: shardopt.scale_by_lbfgs(**d),
    "lookahead": lambda **d: shardopt.lookahead(shardopt.identity(), 2, 0.5, **d),
    "momo": lambda **d: shardopt.momo(**d),
    "momo_adam": lambda **d: shardopt.momo_adam(**d),
    "polyak_sgd": lambda **d: shardopt.polyak_sgd(**d),
    "scale_by_polyak": lambda **d: shardopt.scale_by_polyak(**d),
    "reduce_on_plateau": lambda **d: shardopt.reduce_on_plateau(**d),
    "scale_by_backtracking_linesearch": (
        lambda **d: shardopt.scale_by_backtracking_linesearch(10, **d)
    ),
    "scale_by_zoom_linesearch": lambda **d: shardopt.scale_by_zoom_linesearch(10, **d),
    "shampoo": lambda **d: shardopt.shampoo(1e-2, **d),
    "soap": lambda **d: shardopt.soap(1e-2, **d),
    "scale_by_shampoo": (_MATRICES, lambda **d: shardopt.scale_by_shampoo(**d)),
    "scale_by_soap": (_MATRICES, lambda **d: shardopt.scale_by_soap(**d)),
}
NOT_STATEFUL = {
    "dequantize": "a function on arrays",
    "quantize": "a function on arrays",
    "dynamic_map": "a function of a transform's state",
    "periodic_update": "a function on trees",
    "group_table": "a table of parameter groups",
    "microbatch": "a function transform",
    "scale_gradient": "a function on arrays",
    "schedule_free_eval_params": "a function of the state",
    "skip_large_updates": "a should-skip predicate for MultiSteps",
    "skip_not_finite": "a should-skip predicate for MultiSteps",
    "value_and_grad_from_state": "a function transform",
    "per_example_global_norm_clip": "a function on per-example gradients",
    "per_example_layer_norm_clip": "a function on per-example gradients",
}


def _inner_replaced(value):
    """``value`` with every transform in it (also in dicts, tuples and lists)
    replaced by ``identity()``: a wrapper built so has only its own state."""
    if isinstance(value, shardopt.AbstractTransform | optax.GradientTransformation):
        return shardopt.identity()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return dataclasses.replace(value, **_inner_replaced(fields))
    if isinstance(value, dict):
        return {k: _inner_replaced(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(_inner_replaced(v) for v in value)
    return value


@functools.cache
def first_calls() -> dict[str, tuple[str, tuple, dict]]:
    """For each catalogue entry, the first conformance row that calls it and
    that call's arguments, as ``(row name, args, kwargs)``."""
    entries = [
        e
        for e in CATALOGUE.entries()
        if e.kind == "Transforms" or e.kind == "Optimizers"
    ]
    by_code: dict[object, list[str]] = {}
    for entry in entries:
        by_code.setdefault(entry.code, []).append(entry.name)
    calls: dict[str, tuple[str, tuple, dict]] = {}
    for row in ROWS:

        def profile(frame, event, arg, row=row):
            if event == "call" and frame.f_code in by_code:
                for name in by_code[frame.f_code]:
                    if name not in calls:
                        calls[name] = (row.name, *_arguments(name, frame.f_locals))

        sys.setprofile(profile)
        try:
            with jax.numpy_dtype_promotion("standard"):
                row.ours()
        finally:
            sys.setprofile(None)
    return calls


def _arguments(name: str, local: dict) -> tuple[tuple, dict]:
    """The call's positional and keyword arguments, from its frame's locals."""
    args, kwargs = [], {}
    for parameter in inspect.signature(getattr(shardopt, name)).parameters.values():
        value = local[parameter.name]
        if parameter.kind is parameter.VAR_POSITIONAL:
            args.extend(value)
        elif parameter.kind is parameter.VAR_KEYWORD:
            kwargs.update(value)
        elif parameter.kind is parameter.POSITIONAL_ONLY:
            args.append(value)
        else:
            kwargs[parameter.name] = value
    return tuple(args), kwargs


def storage_options(name: str) -> list[str]:
    """The entry's storage-dtype arguments (8-bit ``state_bits`` is another test's)."""
    return [
        d for d in CATALOGUE.low_precision(getattr(shardopt, name)) if d != "state_bits"
    ]


def _params():
    """The conformance tree, as shapes (the rows' masks and labels name its
    leaves): float32 leaves, and a bfloat16 one."""
    return jax.tree.map(
        lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), make_shardable_params()
    )


def accumulators(transform, params=None) -> dict[str, jnp.dtype]:
    """The state's floating leaves laid out like the parameters (under one of
    their names) with one dim or more, by path, with their dtypes."""
    params = _params() if params is None else params
    names = set(params)
    with jax.numpy_dtype_promotion("standard"):
        state = jax.eval_shape(transform.init, params)
    found = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        fields = [k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey)]
        if fields and fields[-1] in NOT_ACCUMULATORS:
            continue
        keys = {k.key for k in path if isinstance(k, jax.tree_util.DictKey)}
        floating = jnp.issubdtype(leaf.dtype, jnp.floating)
        if keys & names and leaf.ndim >= 1 and floating:
            found[jax.tree_util.keystr(path)] = leaf.dtype
    return found


def build(name: str, **dtypes):
    """The entry as its first row calls it, any inner transform replaced by
    ``identity()`` (a wrapper answers for its own state only), with ``dtypes``."""
    if name in ROWLESS:
        return _rowless(name)[1](**dtypes)
    _, args, kwargs = first_calls()[name]
    args, kwargs = _inner_replaced(args), _inner_replaced(kwargs)
    with jax.numpy_dtype_promotion("standard"), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # optimistic_adam
        return getattr(shardopt, name)(*args, **{**kwargs, **dtypes})


def applicable_options(name: str) -> list[str]:
    """The storage options this configuration accepts (rmsprop's ``mu_dtype``
    needs ``centered=True``, for one: given otherwise it is an error)."""
    accepted = []
    for option in storage_options(name):
        try:
            build(name, **{option: jnp.bfloat16})
        except ValueError as err:
            assert "only" in str(err), err  # "... only with centered=True"
        else:
            accepted.append(option)
    return accepted


def _rowless(name: str):
    """``(params or None, builder)`` of an entry no row calls."""
    entry = ROWLESS[name]
    return entry if isinstance(entry, tuple) else (None, entry)


def _params_for(name: str):
    return _rowless(name)[0] if name in ROWLESS else None


@functools.cache
def _checked_entries() -> list[str]:
    """The entries that build a transform (``group`` builds a group spec)."""
    called = [n for n in first_calls() if hasattr(build(n), "init")]
    return sorted([*called, *ROWLESS])


def test_every_entry_is_walked_or_declared():
    entries = {
        e.name for e in CATALOGUE.entries() if e.kind in ("Transforms", "Optimizers")
    }
    rowless = entries - set(first_calls())
    assert rowless == set(ROWLESS) | set(NOT_STATEFUL)


def test_every_entry_with_accumulators_has_a_storage_dtype():
    missing = [
        name
        for name in _checked_entries()
        if accumulators(build(name), _params_for(name)) and not storage_options(name)
    ]
    assert missing == []


@pytest.mark.parametrize("name", _checked_entries())
def test_bfloat16_storage_keeps_every_accumulator_in_bfloat16(name):
    params = _params_for(name)
    default = accumulators(build(name), params)
    if not default:
        return
    options = applicable_options(name)
    narrow = build(name, **dict.fromkeys(options, jnp.bfloat16))
    narrow = accumulators(narrow, params)
    assert set(narrow) == set(default)
    wide = {path: dtype for path, dtype in narrow.items() if dtype != BF16}
    assert wide == {}, f"{name} given bfloat16 for {options} keeps these wider"


# Runs on a quadratic (float32 parameters, eager: the ops are compiled once and
# shared by every entry). Each optimizer, and each transform with accumulators
# of its own that no optimizer holds, three times: as built, with float32
# storage (the same numbers: float32 storage is the default), with bfloat16.
RUN_STEPS = 5
_START = {
    "matrix": jnp.linspace(-1.0, 1.0, 24, dtype=jnp.float32).reshape(8, 3),
    "vector": jnp.linspace(0.5, -0.5, 7, dtype=jnp.float32),
}
_GOAL = {k: jnp.cos(3 * v) for k, v in _START.items()}


def _loss(params):
    total = jnp.float32(0.1)  # a minimum above 0, for the loss-taking steps
    for name in sorted(params):
        d = params[name] - _GOAL[name]
        total = total + 0.5 * jnp.sum(d * d)
    return total


def _run(transform):
    params, state = _START, transform.init(_START)
    for _ in range(RUN_STEPS):
        value, grads = jax.value_and_grad(_loss)(params)
        extra = {"value": value, "obj_fn": _loss}  # MoMo's loss, Sophia's Hessian
        updates, state = update_with_extra_args(transform, grads, state, params, extra)
        params = shardopt.apply_updates(params, updates)
    return params


def _run_entries() -> list[str]:
    own = {"apply_every", "MultiSteps"}  # accumulators no optimizer holds
    kinds = {e.name: e.kind for e in CATALOGUE.entries()}
    return [
        name
        for name in _checked_entries()
        if (kinds[name] == "Optimizers" or name in own)
        and name != "dpsgd"  # takes per-example gradients: tests/test_privacy.py
        and accumulators(build(name), _params_for(name))
    ]


@pytest.mark.parametrize("name", _run_entries())
def test_float32_storage_is_the_default_and_bfloat16_stays_close(name):
    options = applicable_options(name)
    default = _run(build(name))
    wide = _run(build(name, **dict.fromkeys(options, jnp.float32)))
    narrow = _run(build(name, **dict.fromkeys(options, jnp.bfloat16)))
    for leaf in default:
        np.testing.assert_array_equal(wide[leaf], default[leaf])
    # bfloat16 keeps 8 bits: the run ends within 2**-5 of the larger of the
    # distance travelled and the parameters' size
    scale = max(
        max(float(jnp.max(jnp.abs(default[k] - _START[k]))) for k in default),
        max(float(jnp.max(jnp.abs(v))) for v in _START.values()),
    )
    gap = max(float(jnp.max(jnp.abs(narrow[k] - default[k]))) for k in default)
    assert gap <= 2**-5 * scale


@functools.cache
def _mesh8() -> Mesh:
    return Mesh(np.array(jax.devices()), ("data",))


def _memory_entries() -> list[str]:
    return [n for n in _checked_entries() if _params_for(n) is None and _float32s(n)]


def _float32s(name: str) -> set[str]:
    """The entry's float32 accumulators (on the tree's float32 leaves)."""
    found = accumulators(build(name))
    return {path for path, dtype in found.items() if dtype == jnp.float32}


@pytest.mark.parametrize("name", _memory_entries())
def test_memory_report_halves_every_accumulator_under_zero(name):
    """ZeRO-1 on 8 devices: each leaf bfloat16 storage narrows takes exactly
    half its float32 bytes on every device (every accumulator among them), every
    other state leaf the same bytes; the matrix, the cube and the half leaf
    are partitioned (1/8 of their bytes a device)."""
    params = _params()
    plan = shardopt.zero(1, _mesh8(), min_size=0)
    narrow = build(name, **dict.fromkeys(applicable_options(name), jnp.bfloat16))
    with jax.numpy_dtype_promotion("standard"):
        full = shardopt.memory_report(plan, params, build(name)).per_leaf()
        half = shardopt.memory_report(plan, params, narrow).per_leaf()
        dtypes = _state_dtypes(build(name)), _state_dtypes(narrow)
    assert full.keys() == half.keys()
    narrowed = {p for p, d in dtypes[0].items() if d != dtypes[1][p]}
    assert _float32s(name) <= narrowed
    assert all(dtypes[1][p] == BF16 for p in narrowed)
    for (role, path), per_device in full.items():
        want = tuple(b // 2 for b in per_device) if path in narrowed else per_device
        assert half[role, path] == want, path
    matrix = [per_device for (_, path), per_device in half.items() if "matrix" in path]
    assert any(per_device == (8 * 3 * 2 // 8,) * 8 for per_device in matrix)


def _state_dtypes(transform) -> dict[str, jnp.dtype]:
    state = jax.eval_shape(transform.init, _params())
    leaves = jax.tree_util.tree_leaves_with_path(state)
    return {jax.tree_util.keystr(path): leaf.dtype for path, leaf in leaves}


def _option_cases() -> list[tuple[str, str]]:
    return [(n, o) for n in _checked_entries() for o in applicable_options(n)]


@pytest.mark.parametrize("name, option", _option_cases())
def test_a_storage_dtype_that_is_not_floating_is_a_value_error(name, option):
    for dtype in (jnp.int8, bool):
        with pytest.raises(ValueError, match=f"^{option} must be a floating dtype"):
            build(name, **{option: dtype})
