"""The suite's own scheduling under pytest-xdist (tests/conftest.py): a worker
takes a whole module, or a whole conformance row, at a time."""

import pathlib

import conftest
import pytest

pytest.importorskip("xdist")


def test_a_conformance_row_is_one_unit_and_every_other_module_is_one(request):
    rows: dict[str, set[str]] = {}  # row -> the scopes of its tests
    modules: dict[str, set[str]] = {}
    for item in request.session.items:
        scope = conftest.work_unit(item.nodeid)
        module = item.nodeid.partition("::")[0]
        row = conftest._sharing(item)[1]
        if row is None:
            modules.setdefault(module, set()).add(scope)
        else:
            rows.setdefault(row, set()).add(scope)
    for row, scopes in rows.items():
        assert len(scopes) == 1, (row, scopes)
    assert len({scope for scopes in rows.values() for scope in scopes}) == len(rows)
    for module, scopes in modules.items():
        if pathlib.PurePath(module).stem != conftest.CONFORMANCE:
            assert scopes == {module}, (module, scopes)


def test_the_stage_is_cut_from_the_row_not_from_a_name_with_dashes():
    module = "tests/test_conformance.py"
    stage = f"{module}::test_zero_stages_match_unsharded[a-b-3]"
    parity = f"{module}::test_matches_optax[a-b]"
    assert conftest.work_unit(stage) == conftest.work_unit(parity) == f"{module}::a-b"


class _Config:
    """What xdist's controller asks of its config to make a scheduler."""

    def __init__(self, dist: str) -> None:
        self.values = {"dist": dist, "tx": ["2*popen"]}

    def getvalue(self, name: str):
        return self.values[name]


def test_scripts_test_runs_the_suite_with_this_scheduler():
    from xdist.scheduler import LoadScopeScheduling

    command = (pathlib.Path(__file__).parents[1] / "scripts" / "test").read_text()
    assert "--dist loadscope --no-loadscope-reorder" in command
    scheduling = conftest.pytest_xdist_make_scheduler(_Config("loadscope"), None)
    assert isinstance(scheduling, LoadScopeScheduling)
    assert scheduling.numnodes == 2
    row = "tests/test_conformance.py::test_zero_stages_match_unsharded[adam-1]"
    assert scheduling._split_scope(row) == "tests/test_conformance.py::adam"
    # any other mode is xdist's own
    assert conftest.pytest_xdist_make_scheduler(_Config("load"), None) is None
