"""Flax linen: a CNN classifies handwritten digits, with logical axis rules.

The model names its parameters' axes logically (``nn.with_logical_partitioning``:
"conv_out", "embed", "mlp", ...); one list of rules maps them onto a
(data=4, model=2) mesh. ``shardopt.linen.TrainState`` reads the boxed
parameters and the rules, lays the parameters out tensor-parallel over
"model", and partitions the optimizer state over "data" (ZeRO stage from
``--stage``). Changing the layout means changing the rules, not the model.

Data: scikit-learn's bundled digits (1797 8x8 images, no download).

    python examples/flax_linen_cnn.py --stage 1 --steps 300 --plots examples/out

Prints the final training loss and the test accuracy; writes
``linen_cnn.png`` (loss and test accuracy) where ``--plots`` says (needs
matplotlib; skipped without it).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from sklearn.datasets import load_digits
from tqdm import tqdm

import shardopt
import shardopt.linen

BATCH = 128
RULES = [
    ("conv_out", "model"),  # convolution channels split over "model"
    ("mlp", "model"),  # the hidden layer of the head too
    ("conv_in", None),
    ("embed", None),
    ("classes", None),
]


def conv_init(names):
    return nn.with_logical_partitioning(nn.initializers.lecun_normal(), names)


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):  # x: [batch, 8, 8, 1]
        x = nn.Conv(32, (3, 3), kernel_init=conv_init((None, None, None, "conv_out")))(
            x
        )
        x = nn.relu(x)
        x = nn.Conv(
            64, (3, 3), kernel_init=conv_init((None, None, "conv_in", "conv_out"))
        )(x)
        x = nn.relu(x)
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))  # [batch, 4, 4, 64]
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(256, kernel_init=conv_init(("embed", "mlp")))(x))
        return nn.Dense(10, kernel_init=conv_init(("mlp", "classes")))(x)


def loss_fn(params, apply_fn, x, labels):
    logits = apply_fn({"params": params}, x)
    picked = jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)
    return -jnp.mean(picked)


@jax.jit
def train_step(state, x, labels):
    loss, grads = jax.value_and_grad(loss_fn)(state.params, state.apply_fn, x, labels)
    return state.apply_gradients(grads=grads), loss


@jax.jit
def accuracy(state, x, labels):
    logits = state.apply_fn({"params": state.params}, x)
    return jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))


def digits():
    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[..., None]
    labels = data.target.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(x))
    x, labels = x[order], labels[order]
    return (x[:1500], labels[:1500]), (x[1500:], labels[1500:])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", type=int, default=1, choices=[0, 1, 2, 3])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--plots", default=None, help="directory for PNG plots")
    args = parser.parse_args(argv)

    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    print(f"{jax.device_count()} devices, mesh {dict(mesh.shape)}, ZeRO {args.stage}")
    (x_train, y_train), (x_test, y_test) = digits()
    batch_sharding = NamedSharding(mesh, P("data"))

    model = CNN()
    boxed = model.init(jax.random.key(0), x_train[:1])["params"]
    schedule = shardopt.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=3e-3, warmup_steps=20, decay_steps=args.steps
    )
    state = shardopt.linen.TrainState.create(
        apply_fn=model.apply,
        params=boxed,
        tx=shardopt.adamw(schedule, weight_decay=1e-4),
        plan=shardopt.zero(args.stage, mesh),
        rules=RULES,
    )
    for name in ("Conv_1", "Dense_0"):
        kernel = state.params[name]["kernel"]
        mu = state.opt_state[0].mu[name]["kernel"]
        print(
            f"{name}.kernel {kernel.shape}: parameter {kernel.sharding.spec}, "
            f"AdamW moment {mu.sharding.spec}"
        )

    rng = np.random.default_rng(1)
    losses, accuracies = [], []
    start = time.perf_counter()
    with tqdm(range(args.steps), unit="step") as bar:
        for step in bar:
            pick = rng.choice(len(x_train), BATCH, replace=False)
            x = jax.device_put(x_train[pick], batch_sharding)
            labels = jax.device_put(y_train[pick], batch_sharding)
            state, loss = train_step(state, x, labels)
            if step % 10 == 0 or step == args.steps - 1:
                losses.append((step, float(loss)))
                rate = (step + 1) * BATCH / (time.perf_counter() - start)
                bar.set_postfix(loss=f"{losses[-1][1]:.4f}", samples_s=f"{rate:.0f}")
            if step % 50 == 0 or step == args.steps - 1:
                accuracies.append((step, float(accuracy(state, x_test, y_test))))

    result = {
        "final_loss": losses[-1][1],
        "test_accuracy": accuracies[-1][1],
        "steps": int(state.step),
        "seconds": time.perf_counter() - start,
    }
    if args.plots:
        plot(losses, accuracies, args.plots)
    print(f"test accuracy {result['test_accuracy']:.4f}")
    print(f"final loss {result['final_loss']:.6f}")
    return result


def plot(losses, accuracies, directory: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install shardopt[examples])")
        return
    os.makedirs(directory, exist_ok=True)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(*zip(*losses, strict=True))
    left.set(xlabel="step", ylabel="training cross-entropy", yscale="log")
    right.plot(*zip(*accuracies, strict=True), marker="o")
    right.set(xlabel="step", ylabel="test accuracy", ylim=(0, 1))
    fig.suptitle("linen CNN on digits: logical axis rules + ZeRO")
    path = os.path.join(directory, "linen_cnn.png")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
