"""DP-SGD on Fashion-MNIST at epsilon 3 (delta 1e-5), beside Tramer and Boneh (2021).

    python experiments/dp_fashion_mnist.py --data-dir DIR       # full: about 10 min
    python experiments/dp_fashion_mnist.py --quick --synthetic --out /tmp/dp   # seconds

The MNIST study's network and settings (experiments/dp_mnist.py) on Fashion-MNIST; Tramer and
Boneh report 86.0% for this end-to-end CNN at epsilon 3, Papernot et al. 86.1% at 2.7.
"""

import _dp

STUDY = _dp.Study(
    name="dp_fashion_mnist",
    title="DP-SGD on Fashion-MNIST",
    dataset="fashion_mnist",
    network="Tramer and Boneh's end-to-end CNN with tanh (experiments/_dp.py: tanh_cnn_28)",
    make_model=_dp.tanh_cnn_28,
    mean=(0.2860,),
    std=(0.3530,),
    published=(_dp.Published(3.0, 86.0, "Tramer & Boneh 2021, end-to-end CNN"),),
    epsilons=(3.0,),
    epochs=40,
    batch_size=512,
    clip=0.1,
    lr=4.0,
    momentum=0.0,
)


def main(argv=None) -> list[dict]:
    return _dp.main(STUDY, argv)


if __name__ == "__main__":
    main()
