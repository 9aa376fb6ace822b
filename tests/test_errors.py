"""A catalogue of bad inputs across the API, each with the error a user sees.

Every row names the exception type and a pattern the message must contain:
the argument, path, value or file at fault. The error must come from
shardopt's own code (or argparse, for the command line), never be a bare
traceback from inside JAX, Equinox or Orbax. Cases already in
test_bad_input.py and test_sharding_inputs.py are not repeated here.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import traceback
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import shardopt
from shardopt.checkpoint import (
    CheckpointError,
    CheckpointLockedError,
    CheckpointManager,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    main,
)
from shardopt.distributed import check_processes_agree, launch_local

PARAMS = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
MESH = Mesh(np.array(jax.devices()), ("data",))


@dataclasses.dataclass
class Ctx:
    """What the rows need: a fresh directory per row and a saved checkpoint."""

    tmp: str
    saved: str

    def fresh(self, name: str = "fresh") -> str:
        return os.path.join(self.tmp, name)

    def damaged(self, remove: str) -> str:
        """A copy of the saved checkpoint without the file ``remove`` of step 1."""
        copy = self.fresh("damaged")
        shutil.copytree(self.saved, copy)
        os.remove(os.path.join(copy, "1", remove))
        return copy


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> str:
    directory = str(tmp_path_factory.mktemp("saved"))
    opt = shardopt.Optimizer(shardopt.adam(1e-3), PARAMS)
    with CheckpointManager(directory) as ckpt:
        ckpt.save(1, params=PARAMS, opt=opt)
    return directory


def _a_file(ctx: Ctx) -> str:
    path = ctx.fresh("file.txt")
    with open(path, "w") as f:
        f.write("not a checkpoint")
    return path


def _two_writers(ctx: Ctx) -> None:
    first = CheckpointManager(ctx.fresh())
    first.save(1, params=PARAMS)
    first.wait()
    CheckpointManager(ctx.fresh()).save(2, params=PARAMS)


def _cli(*argv: str) -> Callable[[Ctx], None]:
    def run(ctx: Ctx) -> None:
        args = [a.format(saved=ctx.saved, file=_a_file(ctx)) for a in argv]
        code = main(args)
        if code:
            raise SystemExit(code)

    return run


def _restore_into_sgd(ctx: Ctx) -> None:
    sgd = shardopt.Optimizer(shardopt.sgd(1e-3, momentum=0.9), PARAMS)
    CheckpointManager(ctx.saved).restore(opt=sgd)


def _local_target() -> int:
    return 1


def _adam_update_with_sgd_state(ctx: Ctx) -> None:
    adam, sgd = shardopt.adam(1e-3), shardopt.sgd(1e-3)
    adam.update(PARAMS, sgd.init(PARAMS), PARAMS)


def _opt() -> shardopt.Optimizer:
    return shardopt.Optimizer(shardopt.adam(1e-3), PARAMS)


# (id, what the user does, error type, pattern the message must contain)
CASES: list[tuple[str, Callable[[Ctx], object], type[BaseException], str]] = [
    # ---------------------------------------------------------- hyperparameters
    ("adam_eps_zero", lambda c: shardopt.adam(1e-3, eps=0.0), ValueError,
     r"eps \+ eps_root must be > 0, got eps=0.0, eps_root=0.0"),
    ("amsgrad_eps_zero", lambda c: shardopt.amsgrad(1e-3, eps=0.0), ValueError,
     r"ScaleByAmsgrad: eps \+ eps_root must be > 0"),
    ("adamax_eps_zero", lambda c: shardopt.adamax(1e-3, eps=0.0), ValueError,
     r"ScaleByAdamax: eps must be > 0, got eps=0.0"),
    ("rmsprop_eps_zero", lambda c: shardopt.rmsprop(1e-3, eps=0.0), ValueError,
     r"eps \+ initial_scale must be > 0"),
    ("eps_root_negative", lambda c: shardopt.adam(1e-3, eps_root=-1.0), ValueError,
     r"eps_root must be >= 0, got -1.0"),
    ("lion_b1_one", lambda c: shardopt.lion(1e-3, b1=1.0), ValueError,
     r"b1 must be in \[0, 1\), got 1.0"),
    ("learning_rate_string", lambda c: shardopt.adam("1e-3"), ValueError,
     r"learning_rate must be a real scalar or a schedule"),
    ("learning_rate_vector", lambda c: shardopt.adam(jnp.ones(3)), ValueError,
     r"learning_rate must be a real scalar .* shape \(3,\)"),
    ("learning_rate_nan", lambda c: shardopt.adam(float("nan")), ValueError,
     r"learning_rate must be finite, got nan"),
    ("weight_decay_inf", lambda c: shardopt.adamw(1e-3, weight_decay=float("inf")),
     ValueError, r"weight_decay must be finite, got inf"),
    ("max_norm_negative", lambda c: shardopt.clip_by_global_norm(-1.0), ValueError,
     r"max_norm must be >= 0, got -1.0"),
    ("adafactor_decay_rate", lambda c: shardopt.adafactor(1e-3, decay_rate=-1.0),
     ValueError, r"decay_rate must be >= 0, got -1.0"),
    ("schedule_decay_rate", lambda c: shardopt.exponential_decay(1.0, 10, -0.5),
     ValueError, r"decay_rate must be >= 0, got -0.5"),
    ("schedule_decay_steps", lambda c: shardopt.cosine_decay_schedule(1.0, 0),
     ValueError, r"decay_steps must be > 0, got 0"),
    ("unknown_hyperparameter", lambda c: _opt().with_hyperparameters(lr=1.0),
     ValueError, r"no hyperparameter named 'lr'; this optimizer has: .*learning_rate"),
    ("hyperparameter_string", lambda c: _opt().with_hyperparameters(b1="0.9"),
     ValueError, r"b1 must be a real scalar"),
    # ------------------------------------------------- another optimizer's state
    ("sgd_state_to_adam", _adam_update_with_sgd_state, TypeError,
     r"Chain\(ScaleByAdam, ScaleByLearningRate\)\.update was given a state .* got "
     r"\(EmptyState, .*expected \(ScaleByAdamState"),
    ("adam_checkpoint_into_sgd", _restore_into_sgd, CheckpointMismatchError,
     r"step 1 .*opt_state.* in the checkpoint but not in the target: .*mu/"),
    # ------------------------------------------------------------------- trees
    ("apply_updates_missing_leaf",
     lambda c: shardopt.apply_updates(PARAMS, {"w": jnp.ones((4, 3))}),
     ValueError, r"missing from the updates: \['b'\]"),
    ("grads_none", lambda c: _opt().step(PARAMS, None), ValueError,
     r"missing from grads: \['b'\], \['w'\]"),
    ("restore_bare_array",
     lambda c: CheckpointManager(c.saved).restore(params=jnp.ones(3)),
     ValueError, r"a bare array cannot be saved as a tree"),
    # ------------------------------------------------------- plans and meshes
    ("stage_string", lambda c: shardopt.zero("2", MESH), TypeError,
     r"stage must be an int, got '2'"),
    ("stage_float", lambda c: shardopt.zero(1.5, MESH), TypeError,
     r"stage must be an int, got 1.5"),
    ("stage_bool", lambda c: shardopt.zero(True, MESH), TypeError,
     r"stage must be an int, got True"),
    ("stage_out_of_range", lambda c: shardopt.zero(5, MESH), ValueError,
     r"stage must be in 0..3, got 5"),
    ("mesh_not_a_mesh", lambda c: shardopt.zero(1, "mesh"), TypeError,
     r"the plan needs a jax.sharding.Mesh .* got str"),
    ("min_size_negative", lambda c: shardopt.zero(1, MESH, min_size=-1), ValueError,
     r"min_size must be >= 0, got -1"),
    ("override_not_a_spec",
     lambda c: shardopt.zero(1, MESH, overrides={"w": "data"}), TypeError,
     r"override for w must be a PartitionSpec, got 'data'"),
    ("data_axes_empty", lambda c: shardopt.zero(1, MESH, data_axes=()), ValueError,
     r"data_axes is empty"),
    ("data_axes_repeated",
     lambda c: shardopt.zero(1, MESH, data_axes=("data", "data")), ValueError,
     r"data_axes repeats an axis: \('data', 'data'\)"),
    ("plan_not_a_plan",
     lambda c: shardopt.Optimizer(shardopt.adam(1e-3), PARAMS, plan="zero1"),
     TypeError, r"plan must be a ShardingPlan .* got str"),
    ("override_unknown_path",
     lambda c: shardopt.Optimizer(
         shardopt.adam(1e-3), PARAMS,
         plan=shardopt.zero(1, MESH, overrides={"decoder": P("data")})),
     ValueError, r"the plan overrides decoder, which are neither"),
    # ---------------------------------------------------- checkpoint arguments
    ("directory_is_a_file", lambda c: CheckpointManager(_a_file(c)),
     CheckpointNotFoundError, r"file.txt is not a directory"),
    ("directory_not_a_path", lambda c: CheckpointManager(3), TypeError,
     r"directory must be a path, got int"),
    ("max_to_keep_zero", lambda c: CheckpointManager(c.fresh(), max_to_keep=0),
     ValueError, r"max_to_keep must be >= 1, got 0"),
    ("keep_every_string", lambda c: CheckpointManager(c.fresh(), keep_every="5"),
     TypeError, r"keep_every must be an int, got '5'"),
    ("step_string", lambda c: CheckpointManager(c.fresh()).save("abc", params=PARAMS),
     TypeError, r"step must be an int, got 'abc'"),
    ("step_negative", lambda c: CheckpointManager(c.fresh()).save(-1, params=PARAMS),
     ValueError, r"step must be >= 0, got -1"),
    ("restore_step_string",
     lambda c: CheckpointManager(c.saved).restore("latest", params=PARAMS),
     TypeError, r"step must be an int, got 'latest'"),
    ("nothing_to_save", lambda c: CheckpointManager(c.fresh()).save(1), ValueError,
     r"nothing to save: pass params=, opt= or rng="),
    ("params_without_arrays",
     lambda c: CheckpointManager(c.fresh()).save(1, params={"w": "x"}), ValueError,
     r"params has no array leaves to save"),
    ("transform_as_opt",
     lambda c: CheckpointManager(c.fresh()).save(1, opt=shardopt.adam(1e-3)),
     TypeError, r"opt must be a shardopt.Optimizer"),
    ("rng_not_a_key", lambda c: CheckpointManager(c.fresh()).save(1, rng="key"),
     TypeError, r"rng must be a JAX PRNG key .* got str"),
    ("data_not_json",
     lambda c: CheckpointManager(c.fresh()).save(1, params=PARAMS, data=object()),
     TypeError, r"data must be JSON-serialisable"),
    ("metadata_not_a_dict",
     lambda c: CheckpointManager(c.fresh()).save(1, params=PARAMS, metadata=[1]),
     TypeError, r"metadata must be a dict, got list"),
    ("two_writers", _two_writers, CheckpointLockedError,
     r"fresh is being written by another CheckpointManager of this process"),
    # ----------------------------------------------------- checkpoint contents
    ("record_missing",
     lambda c: CheckpointManager(c.damaged("shardopt/metadata")).restore(params=PARAMS),
     CheckpointError, r"step 1 .* has no readable shardopt record"),
    ("checksums_missing",
     lambda c: CheckpointManager(c.damaged("checksums/partial_0.json")).restore(
         params=PARAMS),
     CheckpointError, r"reading step 1 .*no checksums in .*checksums"),
    # ------------------------------------------------------------ command line
    ("cli_file_not_directory", _cli("inspect", "{file}"), SystemExit, "2"),
    ("cli_unknown_command", _cli("frobnicate"), SystemExit, "2"),
    ("cli_export_without_flag", _cli("export", "{saved}", "out.npz"), SystemExit, "2"),
    ("cli_step_not_int", _cli("inspect", "{saved}", "--step", "x"), SystemExit, "2"),
    ("cli_missing_step", _cli("inspect", "{saved}", "--step", "9"), SystemExit, "2"),
    # -------------------------------------------------------------- launcher
    ("launch_zero_processes", lambda c: launch_local("m:f", 0), ValueError,
     r"num_processes and devices_per_process must be >= 1, got 0"),
    ("launch_processes_string", lambda c: launch_local("m:f", "2"), TypeError,
     r"num_processes must be an int, got '2'"),
    ("launch_lambda", lambda c: launch_local(lambda: 1, 1), ValueError,
     r"needs a function that other processes can import"),
    ("launch_missing_script", lambda c: launch_local("nope.py", 1), FileNotFoundError,
     r"no script at .*nope.py"),
    ("launch_bad_target", lambda c: launch_local("no_colon", 1), ValueError,
     r"target 'no_colon' is neither a script path"),
    ("launch_target_int", lambda c: launch_local(3, 1), TypeError,
     r"target must be a function or a string, got int"),
    ("agree_nothing", lambda c: check_processes_agree(), TypeError,
     r"check_processes_agree needs at least one named item"),
]  # fmt: skip

# what the command line prints on stderr for each CLI row
CLI_STDERR = {
    "cli_file_not_directory": r"file.txt is a file, not a checkpoint directory",
    "cli_unknown_command": r"invalid choice: 'frobnicate'",
    "cli_export_without_flag": r"the following arguments are required: --params-only",
    "cli_step_not_int": r"argument --step: invalid int value: 'x'",
    "cli_missing_step": r"no step 9 in .*steps present: \[1\]",
}

OURS = (os.sep + "shardopt" + os.sep, os.sep + "argparse.py")


def test_the_catalogue_is_large_and_unique():
    names = [case[0] for case in CASES]
    assert len(names) == len(set(names)) and len(names) >= 40


@pytest.mark.parametrize(
    ("make", "error", "pattern"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_bad_input(make, error, pattern, saved, tmp_path, capsys, request):
    ctx = Ctx(str(tmp_path), saved)
    with pytest.raises(error) as info:
        make(ctx)
    name = request.node.callspec.id
    if error is SystemExit:
        assert str(info.value.code) == pattern
        assert _matches(CLI_STDERR[name], capsys.readouterr().err)
        return
    assert _matches(pattern, str(info.value)), str(info.value)
    # raised by shardopt itself (or argparse), not deep inside a dependency
    raised_in = traceback.extract_tb(info.tb)[-1].filename
    assert any(part in raised_in for part in OURS), raised_in


def _matches(pattern: str, text: str) -> bool:
    return re.search(pattern, text, re.DOTALL) is not None
