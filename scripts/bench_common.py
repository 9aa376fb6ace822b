"""What the benchmark scripts share: the models, the optax baseline's sharding by
hand, and the measurements of bytes and collectives.

Imported by ``bench.py``, ``bench_zero.py`` and ``bench_buckets.py`` (run them
from the repository root with ``PYTHONPATH=.``; each puts ``scripts/`` on the
path by being run from it).
"""

import platform

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from shardopt import sharding as sh

MiB = 2**20
KINDS = {"all-reduce": "AR", "all-gather": "AG", "reduce-scatter": "RS"}


# ------------------------------------------------------------------ models
class Block(eqx.Module):
    ln1: eqx.nn.LayerNorm
    qkv: eqx.nn.Linear
    proj: eqx.nn.Linear
    ln2: eqx.nn.LayerNorm
    up: eqx.nn.Linear
    down: eqx.nn.Linear
    heads: int = eqx.field(static=True)

    def __init__(self, dim, heads, key):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.ln1 = eqx.nn.LayerNorm(dim)
        self.qkv = eqx.nn.Linear(dim, 3 * dim, key=k1)
        self.proj = eqx.nn.Linear(dim, dim, key=k2)
        self.ln2 = eqx.nn.LayerNorm(dim)
        self.up = eqx.nn.Linear(dim, 4 * dim, key=k3)
        self.down = eqx.nn.Linear(4 * dim, dim, key=k4)
        self.heads = heads

    def __call__(self, x):  # x: (T, dim)
        t, d = x.shape
        q, k, v = jnp.split(jax.vmap(self.qkv)(jax.vmap(self.ln1)(x)), 3, axis=-1)
        q, k, v = (a.reshape(t, self.heads, d // self.heads) for a in (q, k, v))
        scores = jnp.einsum("thd,shd->hts", q, k) / np.sqrt(d // self.heads)
        scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -1e9)
        att = jnp.einsum("hts,shd->thd", jax.nn.softmax(scores, axis=-1), v)
        x = x + jax.vmap(self.proj)(att.reshape(t, d))
        h = jax.nn.gelu(jax.vmap(self.up)(jax.vmap(self.ln2)(x)))
        return x + jax.vmap(self.down)(h)


class Transformer(eqx.Module):
    embed: eqx.nn.Embedding
    pos: jax.Array
    blocks: tuple
    ln_f: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __init__(self, vocab, dim, heads, layers, seq, key):
        keys = jax.random.split(key, layers + 3)
        self.embed = eqx.nn.Embedding(vocab, dim, key=keys[0])
        self.pos = 0.02 * jax.random.normal(keys[1], (seq, dim))
        self.blocks = tuple(Block(dim, heads, k) for k in keys[3:])
        self.ln_f = eqx.nn.LayerNorm(dim)
        self.head = eqx.nn.Linear(dim, vocab, key=keys[2])

    def __call__(self, tokens):  # (T,) int32 -> (T, vocab) logits
        x = jax.vmap(self.embed)(tokens) + self.pos[: tokens.shape[0]]
        for block in self.blocks:
            x = block(x)
        return jax.vmap(self.head)(jax.vmap(self.ln_f)(x))


# ------------------------------------------------------------------ optax by hand
def optax_shardings(plan, arrays, tx):
    """The shardings optax needs to reproduce ``plan``'s layout by hand.

    Returns ``(param_sh, grad_sh, state_sh)`` for the array tree ``arrays``:
    parameters partitioned at stage 3, gradients at stage 2+, and every state
    leaf shaped like its parameter (moments) partitioned at stage 1+, found
    with ``optax.tree_map_params``; other state leaves (counts, factored
    statistics) replicated.
    """
    mesh = plan.mesh
    rep = NamedSharding(mesh, P())
    stage = plan.stage
    layout = plan.layout(arrays)

    def sharding_tree(partitioned):
        def one(path, _):
            leaf = layout[jax.tree_util.keystr(path)]
            return NamedSharding(mesh, leaf.partitioned if partitioned else leaf.base)

        return jax.tree_util.tree_map_with_path(one, arrays)

    param_sh = sharding_tree(stage >= 3)
    grad_sh = sharding_tree(stage >= 2)
    moment_sh = sharding_tree(stage >= 1)
    abstract = jax.eval_shape(tx.init, arrays)
    masked = lambda x: isinstance(x, optax.MaskedNode)

    def place(s, sharding, p):
        if masked(s):  # a leaf another branch of a partition owns
            return s
        return sharding if s.shape == p.shape else rep

    state_sh = optax.tree_map_params(
        tx,
        place,
        abstract,
        moment_sh,
        arrays,
        transform_non_params=lambda _: rep,
        is_leaf=masked,
    )
    return param_sh, grad_sh, state_sh


# ------------------------------------------------------------------ helpers
def nbytes_per_device(tree, mesh):
    per = {d.id: 0 for d in mesh.devices.flat}
    for leaf in jax.tree.leaves(eqx.filter(tree, eqx.is_array)):
        for shard in leaf.addressable_shards:
            per[shard.device.id] += shard.data.nbytes
    return max(per.values())


def total_bytes(tree):
    return sum(x.nbytes for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array)))


def compile_and_count(fn, *args):
    """The compiled step (run it, not ``fn``: one compile) and its collectives."""
    compiled = fn.lower(*args).compile()
    text = getattr(compiled, "compiled", compiled).as_text()
    counts = sh.count_collectives(text)
    parts = [f"{KINDS.get(k, k)} {n}" for k, n in sorted(counts.items()) if n]
    return compiled, ", ".join(parts) or "none"


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return model
