"""Every jcnn.data augmentation applied to a few CIFAR-10 test images, as one labelled figure.

Usage: python experiments/augment_grid.py [--data-dir DIR] [--out docs/figures/augmentations.png]

Rows are augmentations, columns the same test images; each random op gets its own key per image
(as under ``apply_batch``), so a row shows several draws.
"""

from __future__ import annotations

import argparse
import functools
import io
from pathlib import Path

import _common
import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jcnn import data, train  # noqa: E402
from jcnn.data import augment as A  # noqa: E402

PICK_EVERY = 7  # test images 0, 7, 14, ...: varied classes
MAX_IMAGES = (10_000 - 1) // PICK_EVERY + 1
CLASSES = "airplane automobile bird cat deer dog frog horse ship truck".split()

PER_EXAMPLE = {
    "original": lambda key, image: image,
    "crop pad 4 (zeros)": functools.partial(A.random_crop, padding=4),
    "crop pad 4 (reflect)": functools.partial(A.random_crop, padding=4, pad_mode="reflect"),
    "translate <= 6 px": functools.partial(A.random_translate, max_shift=6),
    "horizontal flip": lambda key, image: A.hflip(image),
    "vertical flip": lambda key, image: A.vflip(image),
    "rotate +-45 deg": functools.partial(A.random_rotate, degrees=45),
    "random resized crop": functools.partial(A.random_resized_crop, size=32),
    "autocontrast": lambda key, image: A.autocontrast(image),
    "equalize": lambda key, image: A.equalize(image),
    "posterize 3 bits": lambda key, image: A.posterize(image, 3),
    "solarize >= 128": lambda key, image: A.solarize(image, 128),
    "colour jitter 0.5": functools.partial(
        A.color_jitter, brightness=0.5, contrast=0.5, saturation=0.5
    ),
    "cutout 12": functools.partial(A.cutout, size=12),
    "pattern (PixMix)": lambda key, image: (A.pattern(key, image.shape) * 255).astype(jnp.uint8),
    "PixMix": A.pixmix,
    "RandAugment 2x9": A.rand_augment,
    "TrivialAugment": A.trivial_augment,
}

BATCH = {
    "mixup a=1": functools.partial(A.mixup, alpha=1.0, num_classes=10),
    "cutmix a=1": functools.partial(A.cutmix, alpha=1.0, num_classes=10),
}


def _soft_caption(soft):
    top = np.argsort(soft)[::-1][:2]
    return " / ".join(f"{CLASSES[k]} {soft[k]:.2f}" for k in top if soft[k] > 0.005)


def _image_count(text: str) -> int:
    count = int(text)
    if not 1 <= count <= MAX_IMAGES:
        raise argparse.ArgumentTypeError(f"expected an int in [1, {MAX_IMAGES}], got {count}")
    return count


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir",
        default=None,
        help="folder holding cifar10/ (default: ../shared/data where it exists, else "
        "JCNN_DATA_DIR, then the per-user cache)",
    )
    parser.add_argument("--out", type=_common.figure_path, default="docs/figures/augmentations.png")
    parser.add_argument("--images", type=_image_count, default=6)
    parser.add_argument("--seed", type=_common.seed, default=0, help="an int in [0, 2**32)")
    args = parser.parse_args(argv)
    data_dir = args.data_dir
    if data_dir == "":  # Path("") is the current folder
        parser.error("argument --data-dir: expected a datasets folder, got ''")
    if data_dir is not None and not Path(data_dir).expanduser().is_dir():
        parser.error(f"argument --data-dir: no such folder: {data_dir}")
    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    if data_dir is None and shared.is_dir():
        data_dir = shared
    images, labels = data.load("cifar10", "test", data_dir=data_dir)
    picks = np.arange(args.images) * PICK_EVERY
    batch, batch_labels = jnp.asarray(images[picks]), jnp.asarray(labels[picks])
    key = jax.random.key(args.seed)

    rows = []
    for i, (name, op) in enumerate(PER_EXAMPLE.items()):
        out = A.apply_batch(op, jax.random.fold_in(key, i), batch)
        rows.append((name, np.asarray(out), [CLASSES[k] for k in labels[picks]]))
    for i, (name, op) in enumerate(BATCH.items()):
        mixed, soft = op(jax.random.fold_in(key, 100 + i), batch, batch_labels)
        mixed = np.clip(np.round(np.asarray(mixed)), 0, 255).astype(np.uint8)
        rows.append((name, mixed, [_soft_caption(s) for s in np.asarray(soft)]))

    fig, axes = plt.subplots(
        len(rows),
        args.images,
        figsize=(1.35 * args.images + 1.6, 1.35 * len(rows)),
        squeeze=False,
    )
    for r, (name, row_images, captions) in enumerate(rows):
        for c in range(args.images):
            ax = axes[r, c]
            ax.imshow(row_images[c], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0 or name in BATCH:
                ax.set_title(captions[c], fontsize=6)
        axes[r, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle("jcnn.data.augment on CIFAR-10 test images", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    out = Path(args.out)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    out.parent.mkdir(parents=True, exist_ok=True)
    # through a rename: a failed run leaves the earlier figure whole
    train.run_folder.write_atomically(out, png.getvalue())
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
