"""A research script on jcnn's open training engine.

A custom Flax CNN mixing ``jcnn.nn`` and ``flax.linen`` layers is trained through
``jcnn.train.fit`` with its own Optax optimizer, its own loss (focal loss), an extra metric (top-3
accuracy) and callbacks (a custom one, early stopping, best checkpoint), on a validation split
carved from the training images; the run is then reloaded with ``jcnn.train.load_run`` and
evaluated on test images it never saw. 512 Fashion-MNIST images and one epoch: seconds on a CPU.

    python docs/examples/research_script.py --data-dir ../shared/data --out runs/research

The test suite runs it (``tests/docs/test_research_script.py``).
"""

from __future__ import annotations

import argparse
import functools

import flax.linen as fnn
import jax
import jax.numpy as jnp
import optax

from jcnn import data, nn, train


class MixedCNN(fnn.Module):
    """jcnn layers (Conv, BatchNorm, MaxPool) and Flax layers (Conv, Dropout, Dense) together."""

    num_classes: int = 10

    @fnn.compact
    def __call__(self, x, train: bool = False):  # fit calls it with train=True/False
        x = nn.Conv(16, 3, padding=1)(x)
        x = nn.BatchNorm(momentum=0.9)(x, train=train)
        x = nn.MaxPool(2)(fnn.relu(x))
        x = fnn.relu(fnn.Conv(32, (3, 3), strides=2)(x))
        x = jnp.mean(x, axis=(1, 2))
        x = fnn.Dropout(0.1, deterministic=not train)(x)
        return fnn.Dense(self.num_classes)(x)


def focal_loss(logits, labels, gamma: float = 2.0):
    """Per-example focal loss (Lin et al. 2017): fit averages the (N,) values."""
    log_p = jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]
    return -((1.0 - jnp.exp(log_p)) ** gamma) * log_p


def top3_accuracy(logits, labels):
    """A scalar per batch: the share of examples whose class is among the 3 highest logits."""
    top = jnp.argsort(logits, axis=-1)[:, -3:]
    return jnp.mean(jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32))


class PrintEvaluations(train.Callback):
    """A callback of our own: keeps and prints every validation evaluation."""

    def __init__(self):
        self.seen = []

    def on_evaluation(self, run, metrics):
        self.seen.append(metrics)
        print(
            f"step {metrics['step']}: val loss {metrics['val_loss']:.4f}, "
            f"top-3 {metrics['val_top3']:.3f}"
        )

    def state_dict(self):  # saved with each checkpoint, so a resumed run keeps it
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = state["seen"]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="runs/research")
    parser.add_argument("--train-images", type=int, default=512)
    args = parser.parse_args(argv)

    images, labels = data.load("fashion_mnist", "train", data_dir=args.data_dir)
    test_images, test_labels = data.load("fashion_mnist", "test", data_dir=args.data_dir)
    images, labels = images[: args.train_images], labels[: args.train_images]
    test_images, test_labels = test_images[:256], test_labels[:256]

    # raw uint8 images: fit carves the validation split, then fits the standardization on the
    # remaining training images only and applies it to the training, validation and test sets
    augment = functools.partial(data.augment.random_translate, max_shift=2)
    train_loader = data.Loader(images, labels, batch_size=64, seed=0, augment=augment)
    test_loader = data.Loader(
        test_images, test_labels, batch_size=256, shuffle=False, drop_remainder=False
    )

    steps = (args.train_images - 128) // 64
    schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, warmup_steps=2, decay_steps=steps)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=1e-4))
    printer = PrintEvaluations()
    config = train.TrainConfig(
        epochs=1,
        optimizer=tx,
        val_split=128,
        standardize="per_channel",
        eval_every_steps=2,
        out=args.out,
        progress=False,
    )
    result = train.fit(
        MixedCNN(),
        train_loader,
        None,
        config,
        test_loader=test_loader,
        loss=focal_loss,
        metrics={"top3": top3_accuracy},
        callbacks=[
            printer,
            train.EarlyStopping("val_loss", mode="min", patience=3),
            train.BestCheckpoint("val_top3", mode="max"),
        ],
    )

    # MixedCNN lives in this script (__main__), so load_run is given the model to rebuild
    run = train.load_run(args.out, which="best", model=MixedCNN())
    report = run.evaluate(test_images, test_labels)  # raw images: standardized as in training
    print(f"best checkpoint (step {run.step}): test accuracy {report['accuracy']:.3f}")
    for label, accuracy in enumerate(report["per_class_accuracy"]):
        print(f"  class {label}: {accuracy:.3f}")
    return {"fit": result, "run": run, "report": report, "evaluations": printer.seen}


if __name__ == "__main__":
    main()
