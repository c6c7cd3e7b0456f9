"""Plot every learning-rate schedule of ``jcnn.train.schedules`` into docs/figures/schedules.png.

Run: ``python experiments/plot_schedules.py [--out PNG]`` (seconds on a CPU).
"""

import argparse
import io
from pathlib import Path

import _common
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jcnn import train  # noqa: E402
from jcnn.train import schedules as S  # noqa: E402

TOTAL = 100
ALPHA0 = 0.1
FIGURE = Path(__file__).resolve().parents[1] / "docs" / "figures" / "schedules.png"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=_common.figure_path, default=FIGURE, help=f"the PNG (default: {FIGURE})"
    )
    out = parser.parse_args(argv).out
    curves = {
        "constant": S.constant(ALPHA0),
        "step (x0.1 at 30/60/90)": S.step(ALPHA0, [30, 60, 90], 0.1),
        "exponential e^(-kt), k=0.03": S.exponential(ALPHA0, 0.03),
        "inverse time 1/(1+kt), k=0.1": S.inverse_time(ALPHA0, 0.1),
        "cosine": S.cosine(ALPHA0, TOTAL),
        "linear": S.linear(ALPHA0, TOTAL),
        "inverse sqrt": S.inverse_sqrt(ALPHA0),
        "warmup(10) + cosine": S.warmup(S.cosine(ALPHA0, TOTAL - 10), 10),
        "one-cycle": S.one_cycle(ALPHA0, TOTAL),
    }
    steps = np.arange(TOTAL + 1)
    fig, axes = plt.subplots(3, 3, figsize=(11, 8), sharex=True, sharey=True)
    for ax, (label, schedule) in zip(axes.flat, curves.items(), strict=True):
        values = [float(schedule(int(t))) for t in steps]
        ax.plot(steps, values, color="tab:blue", drawstyle="steps-post")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("step t (T = 100)")
    for ax in axes[:, 0]:
        ax.set_ylabel("learning rate")
    fig.suptitle(f"jcnn.train.schedules, alpha0 = {ALPHA0}")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    out.parent.mkdir(parents=True, exist_ok=True)
    # through a rename: a failed run leaves the earlier figure whole
    train.run_folder.write_atomically(out, png.getvalue())
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
