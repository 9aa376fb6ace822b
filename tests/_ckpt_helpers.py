"""Shared pieces of the checkpoint tests: a small model, meshes, target trees."""

from __future__ import annotations

import os

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import shardopt


def model():
    return eqx.nn.MLP(8, 8, 16, 2, key=jax.random.key(0))


def trained(transform=None, steps=2):
    """A model and an optimizer after a few steps, so moments are non-zero."""
    params = model()
    opt = shardopt.Optimizer(transform or shardopt.adamw(1e-2), params)
    for i in range(steps):
        scale = 0.1 * (i + 1)
        grads = jax.tree.map(
            lambda x, s=scale: jnp.full_like(x, s) if eqx.is_array(x) else None,
            params,
        )
        params, opt = opt.step(params, grads)
    return params, opt


def mesh(n, shape=None, names=("data",)):
    devices = np.array(jax.devices()[:n])
    return Mesh(devices.reshape(shape or (n,)), names)


def zero1(tree, mesh_):
    """Moments partitioned over 'data' on their first dimension; the rest replicated."""

    def put(x):
        if not eqx.is_array(x):
            return x
        spec = P("data") if x.ndim and x.shape[0] % mesh_.shape["data"] == 0 else P()
        return jax.device_put(x, NamedSharding(mesh_, spec))

    return jax.tree.map(put, tree)


def replicate(tree, mesh_):
    return jax.tree.map(
        lambda x: (
            jax.device_put(x, NamedSharding(mesh_, P())) if eqx.is_array(x) else x
        ),
        tree,
    )


def abstract(tree, spec_fn):
    """ShapeDtypeStructs with the sharding spec_fn(leaf) gives."""
    return jax.tree.map(
        lambda x: (
            jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=spec_fn(x))
            if eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)
            else x
        ),
        tree,
    )


def arrays_equal(a, b):
    la = jax.tree.leaves(eqx.filter(a, eqx.is_array))
    lb = jax.tree.leaves(eqx.filter(b, eqx.is_array))
    return len(la) == len(lb) and all(
        x.shape == y.shape and x.dtype == y.dtype and np.array_equal(x, y)
        for x, y in zip(la, lb, strict=True)
    )


def array_files(directory) -> list[str]:
    """The files holding array bytes under a step directory."""
    found = []
    for root, _, files in os.walk(directory):
        if os.sep + "d" in root[len(str(directory)) :] and "arrays" in root:
            found += [os.path.join(root, f) for f in files]
    return found


def damage(directory, how: str, lands=lambda: True) -> str:
    """Truncate the largest array data file of a step to half, or flip a
    byte of it: in the middle, or, unless ``lands()`` says the flip hit the
    bytes meant (not OCDBT's index, say, which the writer may place there),
    a third of the way in, two thirds, and so on. Returns the file's name."""
    (name,) = sorted(array_files(directory), key=os.path.getsize)[-1:]
    size = os.path.getsize(name)
    if how == "truncate":
        os.truncate(name, size // 2)
        return os.path.basename(name)
    for where in (1 / 2, 1 / 3, 2 / 3, 1 / 4, 3 / 4, 1 / 5, 4 / 5):
        with open(name, "r+b") as f:
            f.seek(int(size * where))
            byte = f.read(1)[0]
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte ^ 0xFF]))
        if lands():
            return os.path.basename(name)
        with open(name, "r+b") as f:  # undone
            f.seek(int(size * where))
            f.write(bytes([byte]))
    raise AssertionError(f"no flipped byte of {name} landed where meant")
