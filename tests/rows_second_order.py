"""Rows of the conformance table for second order and line search: none.

Their updates need ``value``, ``grad`` and ``value_fn``, which the table's
step does not pass; tests/test_lbfgs.py runs them against optax instead.
"""

ROWS = []
ELSEWHERE = {
    name: "tests/test_lbfgs.py (value=, grad=, value_fn=)"
    for name in (
        "lbfgs",
        "scale_by_lbfgs",
        "scale_by_backtracking_linesearch",
        "scale_by_zoom_linesearch",
        "value_and_grad_from_state",
    )
}
