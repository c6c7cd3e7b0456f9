"""Invariance and equivariance (lectures 003, 004): convolution commutes with translation exactly
under circular padding and up to edge effects otherwise; pooling is locally invariant to small
shifts; rotations do not commute with a convolution.

Run: ``python experiments/invariance.py [--quick] [--data-dir DIR]`` (full: 3 min measured on
2 cores shared with other work; the same properties are asserted in
``tests/functional/test_equivariance.py``).
"""

from __future__ import annotations

import _common
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from jcnn import data
from jcnn import functional as F
from jcnn.data import augment as A


def relative(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def shift(x, s):
    """Circular shift of an ``(N, H, W, C)`` batch by ``s`` pixels down and right."""
    return jnp.roll(x, (s, s), axis=(1, 2))


def main(argv=None):
    args = _common.parse_args(__doc__.splitlines()[0], argv)
    quick = args.quick
    count = 8 if quick else 64
    page = _common.Page("invariance", "Translation equivariance, pooling invariance, rotations",
                        args)
    images, _ = _common.load(args, "cifar10", "test", max(count, 16))
    x = jnp.asarray(data.Standardize.fit(images)(images[:count]))
    key = jax.random.key(args.seed)
    w = jax.random.normal(key, (5, 5, 3, 16)) * 0.1
    shifts = list(range(0, 5 if quick else 9))

    circ = lambda v: F.conv(v, w, padding=2, padding_mode="circular")  # noqa: E731
    zero = lambda v: F.conv(v, w, padding=2)  # noqa: E731
    err_circular = [relative(circ(shift(x, s)), shift(circ(x), s)) for s in shifts]
    err_zero = [relative(zero(shift(x, s)), shift(zero(x), s)) for s in shifts]
    interior = [relative(zero(shift(x, s))[:, 2 + s:-2, 2 + s:-2],
                         shift(zero(x), s)[:, 2 + s:-2, 2 + s:-2]) for s in shifts]

    features = F.relu(circ(x))
    pool_err = {}
    for window in (2, 4, 8):
        pooled = F.max_pool(features, window)
        pool_err[window] = [relative(F.max_pool(shift(features, s), window), pooled)
                            for s in shifts]
    unpooled = [relative(shift(features, s), features) for s in shifts]

    angles = [0, 90, 180, 270] if quick else [0, 15, 30, 45, 60, 75, 90, 135, 180, 270]
    rot = lambda v, a: jax.vmap(lambda im: A.rotate(im, a))(v)  # noqa: E731
    symmetric = (w + jnp.rot90(w, 1) + jnp.rot90(w, 2) + jnp.rot90(w, 3)) / 4
    err_rot, err_rot_symmetric = [], []
    centre = slice(8, 24)
    for angle in angles:
        for kernel, out in ((w, err_rot), (symmetric, err_rot_symmetric)):
            a = F.conv(rot(x, angle), kernel, padding=2, padding_mode="circular")
            b = rot(F.conv(x, kernel, padding=2, padding_mode="circular"), angle)
            out.append(relative(a[:, centre, centre], b[:, centre, centre]))

    page.text(
        f"{count} standardized CIFAR-10 test images, a random 5x5 conv (3 -> 16 channels, padding "
        "2). Errors are relative L2 norms `||f(T x) - T f(x)|| / ||T f(x)||` for equivariance and "
        "`||f(T x) - f(x)|| / ||f(x)||` for invariance; T shifts circularly by s pixels down and "
        "right.")
    page.table(["shift s", "conv, circular padding", "conv, zero padding",
                "zero padding, interior only", "no pooling (invariance)",
                "max pool 2", "max pool 4", "max pool 8"],
               [[s, err_circular[i], err_zero[i], interior[i], unpooled[i],
                 pool_err[2][i], pool_err[4][i], pool_err[8][i]] for i, s in enumerate(shifts)])
    page.table(["rotation (degrees)", "random kernel", "kernel symmetric under rot90"],
               [[a, err_rot[i], err_rot_symmetric[i]] for i, a in enumerate(angles)])
    exact = max(err_circular) < 1e-5
    page.text(
        "## Beside the notes\n"
        f"- Convolution is translation equivariant: with circular padding the error is at float "
        f"rounding (max {max(err_circular):.1e}){'' if exact else ' — **larger than rounding**'}; "
        f"with zero padding the border differs (up to {max(err_zero):.2f}) while the interior "
        f"away from the wrapped border matches ({max(interior):.1e}).\n"
        "- Max pooling gives *local* invariance: its error grows with the shift and is smaller "
        "for larger windows at small shifts; it is not invariant to large shifts.\n"
        "- Rotations: a generic kernel is not rotation equivariant (relative errors of order "
        "one); a kernel symmetric under 90° rotations is equivariant to multiples of 90° "
        "(exactly) but not to other angles (interpolation, and the kernel is not isotropic).")

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    axes[0].semilogy(shifts, np.maximum(err_circular, 1e-9), "o-", label="circular padding")
    axes[0].semilogy(shifts, np.maximum(err_zero, 1e-9), "s-", label="zero padding")
    axes[0].semilogy(shifts, np.maximum(interior, 1e-9), "^-", label="zero padding, interior")
    axes[0].set_title("conv: equivariance error vs shift", fontsize=9)
    axes[1].plot(shifts, unpooled, "k--", label="no pooling")
    for window, errors in pool_err.items():
        axes[1].plot(shifts, errors, "o-", label=f"max pool {window}")
    axes[1].set_title("pooling: invariance error vs shift", fontsize=9)
    axes[2].plot(angles, err_rot, "o-", label="random kernel")
    axes[2].plot(angles, err_rot_symmetric, "s-", label="rot90-symmetric kernel")
    axes[2].set_title("conv: rotation equivariance error", fontsize=9)
    axes[0].set_xlabel("shift (pixels)")
    axes[1].set_xlabel("shift (pixels)")
    axes[2].set_xlabel("angle (degrees)")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    page.figure(fig, "errors", "Measured equivariance and invariance errors")
    page.write()


if __name__ == "__main__":
    main()
