"""Flax NNX: an MLP classifies handwritten digits, tensor parallel plus ZeRO.

The model's Variables are annotated for tensor parallelism over the "model"
axis of a (data=4, model=2) mesh (Megatron style: the first kernel split by
columns, the second by rows). ``shardopt.nnx.Optimizer`` reads those
annotations and partitions AdamW's state over the "data" axis on top (ZeRO
stage from ``--stage``), so each device holds 1/8 of every moment.

Data: scikit-learn's bundled digits (1797 8x8 images, no download).

    python examples/flax_nnx_mlp.py --stage 1 --steps 400 --plots examples/out

Prints the final training loss and the test accuracy; writes
``nnx_mlp_loss.png`` where ``--plots`` says (needs matplotlib; skipped
without it).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from sklearn.datasets import load_digits
from tqdm import tqdm

import shardopt
import shardopt.nnx

BATCH = 128
init = nnx.initializers.lecun_normal()


class MLP(nnx.Module):
    """64 -> 512 -> 512 -> 10, the two large kernels split over "model"."""

    def __init__(self, rngs: nnx.Rngs):
        columns = nnx.with_partitioning(init, (None, "model"))
        rows = nnx.with_partitioning(init, ("model", None))
        self.up = nnx.Linear(64, 512, kernel_init=columns, rngs=rngs)
        self.mid = nnx.Linear(512, 512, kernel_init=rows, rngs=rngs)
        self.out = nnx.Linear(512, 10, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.gelu(self.up(x))
        x = jax.nn.gelu(self.mid(x))
        return self.out(x)


def loss_fn(model, x, labels):
    logits = model(x)
    picked = jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)
    return -jnp.mean(picked)


@nnx.jit
def train_step(model, optimizer, x, labels):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, labels)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def accuracy(model, x, labels):
    return jnp.mean((jnp.argmax(model(x), axis=-1) == labels).astype(jnp.float32))


def digits():
    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    labels = data.target.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(x))
    x, labels = x[order], labels[order]
    return (x[:1500], labels[:1500]), (x[1500:], labels[1500:])


def state_bytes_per_device(optimizer) -> int:
    """Bytes of optimizer state on the first device (one shard of each leaf)."""
    leaves = jax.tree.leaves(nnx.state(optimizer))
    return sum(leaf.addressable_shards[0].data.nbytes for leaf in leaves)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", type=int, default=1, choices=[0, 1, 2, 3])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--plots", default=None, help="directory for PNG plots")
    args = parser.parse_args(argv)

    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    print(f"{jax.device_count()} devices, mesh {dict(mesh.shape)}, ZeRO {args.stage}")
    (x_train, y_train), (x_test, y_test) = digits()
    batch_sharding = NamedSharding(mesh, P("data"))

    with jax.set_mesh(mesh):
        model = MLP(nnx.Rngs(0))
    schedule = shardopt.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=2e-3, warmup_steps=20, decay_steps=args.steps
    )
    optimizer = shardopt.nnx.Optimizer(
        model,
        shardopt.chain(shardopt.clip_by_global_norm(1.0), shardopt.adamw(schedule)),
        wrt=nnx.Param,
        plan=shardopt.zero(args.stage, mesh),
    )
    kernel = optimizer.opt_state[1][0].mu["mid"]["kernel"][...]
    print(f"AdamW moment of mid.kernel {kernel.shape}: {kernel.sharding.spec}")

    rng = np.random.default_rng(1)
    losses = []
    start = time.perf_counter()
    with jax.set_mesh(mesh), tqdm(range(args.steps), unit="step") as bar:
        for step in bar:
            pick = rng.choice(len(x_train), BATCH, replace=False)
            x = jax.device_put(x_train[pick], batch_sharding)
            labels = jax.device_put(y_train[pick], batch_sharding)
            loss = train_step(model, optimizer, x, labels)
            if step % 10 == 0 or step == args.steps - 1:
                losses.append((step, float(loss)))
                rate = (step + 1) * BATCH / (time.perf_counter() - start)
                bar.set_postfix(loss=f"{losses[-1][1]:.4f}", samples_s=f"{rate:.0f}")
        test_accuracy = float(accuracy(model, x_test, y_test))

    result = {
        "final_loss": losses[-1][1],
        "test_accuracy": test_accuracy,
        "state_bytes_per_device": state_bytes_per_device(optimizer),
        "seconds": time.perf_counter() - start,
    }
    print(f"optimizer state per device: {result['state_bytes_per_device']} bytes")
    if args.plots:
        plot(losses, args.plots)
    print(f"test accuracy {test_accuracy:.4f}")
    print(f"final loss {result['final_loss']:.6f}")
    return result


def plot(losses, directory: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install shardopt[examples])")
        return
    os.makedirs(directory, exist_ok=True)
    steps, values = zip(*losses, strict=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, values)
    ax.set(xlabel="step", ylabel="cross-entropy", yscale="log")
    ax.set_title("NNX MLP on digits: tensor parallel + ZeRO")
    path = os.path.join(directory, "nnx_mlp_loss.png")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
