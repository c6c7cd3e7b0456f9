"""DP-SGD on MNIST at epsilon 1.2, 3 and 7.1 (delta 1e-5), beside Opacus' MNIST example.

    python experiments/dp_mnist.py --data-dir DIR               # full: about 10 min per epsilon
    python experiments/dp_mnist.py --epsilons 3.0 --data-dir DIR  # one budget (rows accumulate)
    python experiments/dp_mnist.py --quick --synthetic --out /tmp/dp   # seconds, no data needed

Tramer and Boneh's (2021) end-to-end CNN with tanh (Papernot et al. 2021), Poisson batches of 512,
clip norm 0.1, SGD at learning rate 4 for 40 epochs; see experiments/_dp.py.
"""

import _dp

STUDY = _dp.Study(
    name="dp_mnist",
    title="DP-SGD on MNIST",
    dataset="mnist",
    network="Tramer and Boneh's end-to-end CNN with tanh (experiments/_dp.py: tanh_cnn_28)",
    make_model=_dp.tanh_cnn_28,
    mean=(0.1307,),
    std=(0.3081,),
    published=(
        _dp.Published(1.2, 94.63, "Opacus MNIST example"),
        _dp.Published(3.0, 96.78, "Opacus MNIST example"),
        _dp.Published(7.1, 97.09, "Opacus MNIST example"),
        _dp.Published(3.0, 98.1, "Papernot et al. 2021 (stretch)"),
    ),
    epsilons=(1.2, 3.0, 7.1),
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
