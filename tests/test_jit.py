"""shardopt.jit_step: the same numbers as eqx.filter_jit, one flattening a call,
one compilation for all steps, and donated buffers reused."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import shardopt


def _model():
    return eqx.nn.MLP(3, 2, width_size=4, depth=1, key=jax.random.key(0))


def _loss(model, x):
    return jnp.mean(jax.vmap(model)(x) ** 2)


def _step(model, opt, x):
    grads = eqx.filter_grad(_loss)(model, x)
    return opt.step(model, grads)


X = jnp.linspace(-1.0, 1.0, 12, dtype=jnp.float32).reshape(4, 3)


def _arrays(tree):
    return [np.asarray(x) for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array))]


def _run(step, steps=3):
    model = _model()
    opt = shardopt.Optimizer(shardopt.adamw(1e-2, weight_decay=1e-3), model)
    for _ in range(steps):
        model, opt = step(model, opt, X)
    return model, opt


def test_same_numbers_as_filter_jit_on_an_equinox_model():
    ours = _run(shardopt.jit_step(_step, donate_argnums=(0, 1)))
    theirs = _run(eqx.filter_jit(_step))
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    for a, b in zip(_arrays(ours), _arrays(theirs), strict=True):
        np.testing.assert_array_equal(a, b)
    # the static leaves (the MLP's activation functions) come back as they were
    assert ours[0].activation is _model().activation


def test_one_trace_for_every_step_and_new_hyperparameters():
    traces = []

    def step(model, opt, x):
        traces.append(1)
        return _step(model, opt, x)

    jitted = shardopt.jit_step(step, donate_argnums=(0, 1))
    model, opt = _run(jitted, steps=4)
    opt = opt.with_hyperparameters(learning_rate=1e-3, weight_decay=0.0)
    model, opt = jitted(model, opt, X)
    assert len(traces) == 1
    assert jitted.splits == 1
    assert int(opt.count) == 5


class Box:
    """A pytree node that counts how often it is flattened and rebuilt."""

    flattened = 0
    unflattened = 0

    def __init__(self, value):
        self.value = value


def _flatten(box):
    Box.flattened += 1
    return (box.value,), None


def _unflatten(_, children):
    Box.unflattened += 1
    return Box(children[0])


jax.tree_util.register_pytree_node(Box, _flatten, _unflatten)


def test_a_call_flattens_its_arguments_once_and_rebuilds_its_results_once():
    params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
    opt = shardopt.Optimizer(shardopt.sgd(0.1, momentum=0.9), params)
    grads = {"w": jnp.full((2, 3), 0.5), "b": jnp.ones(3)}

    def update(box, opt, grads):
        params, opt = opt.step(box.value, grads)
        return Box(params), opt

    jitted = shardopt.jit_step(update, donate_argnums=(0, 1))
    box, opt = jitted(Box(params), opt, grads)  # traces: flattens more often
    Box.flattened = Box.unflattened = 0
    for _ in range(3):
        box, opt = jitted(box, opt, grads)
    assert (Box.flattened, Box.unflattened) == (3, 3)
    # eqx.filter_jit walks the arguments several times a call
    filtered = eqx.filter_jit(update)
    params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}  # the first were donated
    opt2 = shardopt.Optimizer(shardopt.sgd(0.1, momentum=0.9), params)
    box2, opt2 = filtered(Box(params), opt2, grads)
    Box.flattened = 0
    filtered(box2, opt2, grads)
    assert Box.flattened > 1


def test_donated_buffers_are_reused_and_the_others_kept():
    params = {"w": jnp.ones((64, 64))}
    opt = shardopt.Optimizer(shardopt.adamw(1e-2), params)
    grads = {"w": jnp.full((64, 64), 0.5)}
    jitted = shardopt.jit_step(lambda p, o, g: o.step(p, g), donate_argnums=(0, 1))
    params, opt = jitted(params, opt, grads)  # compiled
    old = jax.tree.leaves((params, opt))
    pointers = {x.unsafe_buffer_pointer() for x in old if x.size > 1}
    new = jax.tree.leaves(jitted(params, opt, grads))
    assert all(x.is_deleted() for x in old)
    assert not grads["w"].is_deleted()
    reused = {x.unsafe_buffer_pointer() for x in new if x.size > 1}
    assert reused == pointers  # the weight and both moments, in place


def test_a_new_static_value_is_a_new_split_with_its_own_numbers():
    def scaled(x, factor):
        return x * factor

    jitted = shardopt.jit_step(scaled)
    x = jnp.arange(3.0)
    np.testing.assert_array_equal(jitted(x, 2.0), [0.0, 2.0, 4.0])
    np.testing.assert_array_equal(jitted(x, 3.0), [0.0, 3.0, 6.0])
    np.testing.assert_array_equal(jitted(x, 2.0), [0.0, 2.0, 4.0])
    assert jitted.splits == 2


def test_a_leaf_no_longer_an_array_is_split_anew():
    def apply(f, x):
        return f(x) if callable(f) else f * x

    jitted = shardopt.jit_step(apply)
    x = jnp.arange(3.0)
    np.testing.assert_array_equal(jitted(jnp.float32(2.0), x), [0.0, 2.0, 4.0])
    np.testing.assert_array_equal(jitted(jnp.negative, x), [0.0, -1.0, -2.0])
    assert jitted.splits == 1  # the structure is the same: the split replaced


def test_results_whose_structure_follows_shapes_raise():
    jitted = shardopt.jit_step(lambda x: x if x.shape[0] > 2 else (x, x))
    jitted(jnp.ones(3))
    with pytest.raises(ValueError, match="returned another structure"):
        jitted(jnp.ones(2))


def test_bad_donate_argnums_raise():
    with pytest.raises(ValueError, match="donate_argnums"):
        shardopt.jit_step(lambda x: x, donate_argnums=(-1,))
    with pytest.raises(TypeError, match="needs a function"):
        shardopt.jit_step(3)


def test_same_numbers_as_filter_jit_under_a_zero_plan():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    plan = shardopt.zero(1, mesh, min_size=8)
    params = {"w": jnp.arange(64.0).reshape(16, 4) / 64, "b": jnp.ones(4)}
    grads = {"w": jnp.full((16, 4), 0.25), "b": jnp.full(4, -0.5)}

    def run(jit):
        p = plan.shard_params(params)
        opt = shardopt.Optimizer(shardopt.adamw(1e-2), p, plan=plan)
        step = jit(lambda p, o, g: o.step(p, g))
        for _ in range(2):
            p, opt = step(p, opt, grads)
        return p, opt

    ours, theirs = run(shardopt.jit_step), run(eqx.filter_jit)
    for a, b in zip(_arrays(ours), _arrays(theirs), strict=True):
        np.testing.assert_array_equal(a, b)
    layouts = lambda t: [x.sharding for x in jax.tree.leaves(t)]
    assert layouts(ours[1].state) == layouts(theirs[1].state)


def test_plain_jax_jit_with_donation_gives_the_same_numbers():
    def run(jit):
        params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.zeros(3)}
        opt = shardopt.Optimizer(shardopt.adamw(1e-2), params)
        step = jit(lambda p, o, x: _dict_step(p, o, x), donate_argnums=(0, 1))
        for _ in range(2):
            params, opt = step(params, opt, X[:, :2])
        return params, opt

    ours, plain = run(shardopt.jit_step), run(jax.jit)
    for a, b in zip(_arrays(ours), _arrays(plain), strict=True):
        np.testing.assert_array_equal(a, b)


def _dict_step(params, opt, x):
    loss = lambda p: jnp.sum((x @ p["w"] + p["b"]) ** 2)
    return opt.step(params, jax.grad(loss)(params))


def _modules(treedef) -> int:
    """How many Equinox Modules a tree structure holds (each a Python call
    when the tree is flattened or rebuilt)."""
    data = treedef.node_data()
    own = data is not None and isinstance(data[0], type)
    own = own and issubclass(data[0], eqx.Module)
    return int(own) + sum(_modules(child) for child in treedef.children())


def test_the_transform_is_stored_flat_and_rebuilt_on_access():
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    opt = shardopt.Optimizer(shardopt.adamw(1e-2, weight_decay=1e-3), params)
    # the Optimizer, ScaleByAdamState and two CountStates; the transform's
    # Chain and its three Modules are a flat tuple of their six leaves
    assert _modules(jax.tree.structure(opt)) == 4
    assert len(opt.transform_leaves) == 6  # b1, b2, eps, eps_root, decay, lr
    assert _modules(jax.tree.structure(opt.transform)) == 4
    # the leaves in the order of the former fields: transform, state, count
    assert jax.tree.leaves(opt) == (
        jax.tree.leaves(opt.transform) + jax.tree.leaves(opt.stored_state) + [opt.count]
    )
    # eqx.tree_at reaches a leaf of the transform; replace_transform the whole
    b1 = eqx.tree_at(lambda o: o.transform.transforms[0].b1, opt, jnp.float32(0.5))
    assert float(b1.transform.transforms[0].b1) == 0.5
    other = opt.replace_transform(shardopt.adamw(1e-3, weight_decay=1e-3))
    assert float(other.transform.transforms[-1].learning_rate) == pytest.approx(1e-3)
    assert other.stored_state is opt.stored_state and other.count is opt.count


def test_a_copied_or_pickled_optimizer_keeps_its_structure():
    import copy
    import pickle

    params = {"w": jnp.ones((3, 2))}
    opt = shardopt.Optimizer(shardopt.sgd(1e-2, momentum=0.9), params)
    for copied in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert jax.tree.structure(copied) == jax.tree.structure(opt)
        assert jax.tree.structure(copied.transform) == jax.tree.structure(opt.transform)


def test_repr_shows_the_transform_and_state_not_the_storage():
    opt = shardopt.Optimizer(shardopt.adamw(1e-3), {"w": jnp.ones(3)})
    text = repr(opt)
    assert text.startswith("Optimizer(\n  transform=Chain(")
    assert "ScaleByAdamState(count=i32[], mu={'w': f32[3]}" in text
    assert "transform_leaves" not in text and "TreeStructure" not in text
