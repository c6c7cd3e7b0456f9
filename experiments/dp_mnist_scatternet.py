"""DP-SGD on scattering features of MNIST (Tramer and Boneh 2021) at epsilon 3.

    python experiments/dp_mnist_scatternet.py --data-dir DIR      # full: 10 min
    python experiments/dp_mnist_scatternet.py --quick --synthetic --out /tmp/dp   # seconds

Tramer and Boneh's ScatterNet+CNN: the images' scattering transform (kymatio, J=2: 7x7 maps of
81 channels, a fixed transform computed once, no privacy cost), GroupNorm without parameters,
then a small tanh CNN trained with DP-SGD (see experiments/_dp.py). The target is the 98.1% at
epsilon 3 of Tramer and Boneh's end-to-end CNN, which dp_mnist.py's end-to-end CNN does not reach.
"""

import _dp

STUDY = _dp.Study(
    name="dp_mnist_scatternet",
    title="DP-SGD on MNIST's scattering features",
    dataset="mnist",
    network=(
        "Tramer and Boneh's ScatterNet+CNN: kymatio's scattering transform (J=2) of the "
        "standardized images, then GroupNorm and a tanh CNN (experiments/_dp.py: "
        "scatternet_cnn_28)"
    ),
    make_model=_dp.scatternet_cnn_28,
    features=_dp.scattering,
    mean=(0.1307,),
    std=(0.3081,),
    published=(_dp.Published(3.0, 98.1, "Tramer and Boneh 2021, end-to-end CNN"),),
    epsilons=(3.0,),
    epochs=40,
    batch_size=4096,
    clip=0.1,
    lr=4.0,
    momentum=0.9,
)


def main(argv=None) -> list[dict]:
    return _dp.main(STUDY, argv)


if __name__ == "__main__":
    main()
