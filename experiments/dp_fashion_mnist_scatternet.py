"""DP-SGD on scattering features of Fashion-MNIST (Tramer and Boneh 2021) at epsilon 3.

    python experiments/dp_fashion_mnist_scatternet.py --data-dir DIR      # full: 10 min
    python experiments/dp_fashion_mnist_scatternet.py --quick --synthetic --out /tmp/dp   # seconds

Tramer and Boneh's ScatterNet+CNN: the images' scattering transform (kymatio, J=2: 7x7 maps of
81 channels, a fixed transform computed once, no privacy cost), GroupNorm without parameters,
then a small tanh CNN trained with DP-SGD: dp_mnist_scatternet.py's study on other files. The
target is the 86.0% at epsilon 3 of Tramer and Boneh's end-to-end CNN, which dp_fashion_mnist.py's
end-to-end CNN passes by a thin margin.
"""

import dataclasses

import _dp
import dp_mnist_scatternet

STUDY = dataclasses.replace(
    dp_mnist_scatternet.STUDY,
    name="dp_fashion_mnist_scatternet",
    title="DP-SGD on Fashion-MNIST's scattering features",
    dataset="fashion_mnist",
    mean=(0.2860,),
    std=(0.3530,),
    published=(_dp.Published(3.0, 86.0, "Tramer and Boneh 2021, end-to-end CNN"),),
)


def main(argv=None) -> list[dict]:
    return _dp.main(STUDY, argv)


if __name__ == "__main__":
    main()
