"""DP-SGD on scattering features of CIFAR-10 (Tramer and Boneh 2021), at epsilon 3 and 7.53.

    python experiments/dp_cifar10_scatternet.py --data-dir DIR      # full: 30 min per epsilon
    python experiments/dp_cifar10_scatternet.py --quick --synthetic --out /tmp/dp   # seconds

Tramer and Boneh's ScatterNet+CNN: the images' scattering transform (kymatio, J=2: 8x8 maps of
243 channels, a fixed transform computed once, no privacy cost), GroupNorm without parameters,
then a two-layer tanh CNN trained with DP-SGD; Poisson batches of 8192, clip norm 0.1, SGD with
momentum 0.9 at learning rate 4 for 60 epochs (see experiments/_dp.py). The same budget as
dp_cifar10.py, whose end-to-end CNN is trained on the pixels.
"""

import _dp

STUDY = _dp.Study(
    name="dp_cifar10_scatternet",
    title="DP-SGD on CIFAR-10's scattering features",
    dataset="cifar10",
    network=(
        "Tramer and Boneh's ScatterNet+CNN: kymatio's scattering transform (J=2) of the "
        "standardized images, then GroupNorm and a tanh CNN (experiments/_dp.py: "
        "scatternet_cnn_32)"
    ),
    make_model=_dp.scatternet_cnn_32,
    features=_dp.scattering,
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
    published=(
        _dp.Published(3.0, 69.3, "Tramer and Boneh 2021, ScatterNet+CNN"),
        _dp.Published(7.53, 66.2, "Papernot et al. 2021, tanh CNN"),
    ),
    epsilons=(3.0, 7.53),
    epochs=60,
    batch_size=8192,
    clip=0.1,
    lr=4.0,
    momentum=0.9,
)


def main(argv=None) -> list[dict]:
    return _dp.main(STUDY, argv)


if __name__ == "__main__":
    main()
