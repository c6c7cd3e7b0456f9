"""LeNet-5: the course's version (ReLU, max pooling) and the 1998 one (tanh, average pooling).

Parameters are named after the layers: ``conv1``, ``conv2``, ``fc1``, ``fc2`` (and ``fc3`` in the
1998 version), each with ``kernel`` and ``bias``; activations and pools are parameter-free named
submodules (``relu1``, ``pool1``, ...). ``flatten`` is channels-last (NHWC): a PyTorch ``fc1``
weight ``(500, 50 * 7 * 7)`` maps to ``kernel = w.reshape(500, 50, 7, 7).transpose(2, 3, 1, 0)
.reshape(2450, 500)``.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from jcnn import init
from jcnn.functional._checks import check_array, check_bool
from jcnn.models._checks import check_image_size, check_num_classes
from jcnn.nn import AvgPool, Conv, Dense, Flatten, MaxPool, ReLU, Tanh

__all__ = ["LeNet5"]


class LeNet5(nn.Module):
    """LeNet-5 for ``(N, 28, 28, 1)`` digits.

    The default is exactly the course table (001): conv 20@5x5 pad 2, ReLU, max pool 2, conv
    50@5x5 pad 2, ReLU, max pool 2, flatten (2450), dense 500, ReLU, dense ``num_classes``:
    1,256,080 parameters for 10 classes.

    With ``original=True`` it is the 1998 network (tanh, 2x2 average pooling): conv 6@5x5 pad 2
    (a 28x28 image padded to the paper's 32x32), conv 16@5x5, dense 120, dense 84, dense
    ``num_classes``; 61,706 parameters (C3 fully connected, pooling without trainable coefficients,
    a linear output instead of the RBF units).

    Attributes:
        num_classes: number of outputs (logits).
        original: build the 1998 version instead of the course's.

    Example:
        >>> import jcnn
        >>> model = jcnn.models.LeNet5()
        >>> x = jnp.zeros((2, 28, 28, 1))
        >>> variables = model.init(jax.random.key(0), x)
        >>> model.apply(variables, x).shape
        (2, 10)
        >>> sum(p.size for p in jax.tree.leaves(variables["params"]))
        1256080
    """

    num_classes: int = 10
    original: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits ``(N, num_classes)`` for images ``x`` ``(N, H, W, 1)``; ``train`` is unused."""
        check_array(x, "x", ndim=4)
        num_classes = check_num_classes(self.num_classes)
        if check_bool(self.original, "original"):
            check_image_size(x, [(2, 2, 0), (5, 1, 0), (2, 2, 0)], "LeNet5 (original)")
            return self._lecun1998(x, num_classes)
        check_image_size(x, [(2, 2, 0)] * 2, "LeNet5")
        x = Conv(20, (5, 5), padding=2, name="conv1")(x)
        x = ReLU(name="relu1")(x)
        x = MaxPool(2, name="pool1")(x)
        x = Conv(50, (5, 5), padding=2, name="conv2")(x)
        x = ReLU(name="relu2")(x)
        x = MaxPool(2, name="pool2")(x)
        x = Flatten(name="flatten")(x)
        x = Dense(500, name="fc1")(x)
        x = ReLU(name="relu3")(x)
        return Dense(num_classes, kernel_init=init.lecun_normal(), name="fc2")(x)

    def _lecun1998(self, x, num_classes):
        tanh_init = init.lecun_normal()
        x = Conv(6, (5, 5), padding=2, kernel_init=tanh_init, name="conv1")(x)
        x = Tanh(name="tanh1")(x)
        x = AvgPool(2, name="pool1")(x)
        x = Conv(16, (5, 5), kernel_init=tanh_init, name="conv2")(x)
        x = Tanh(name="tanh2")(x)
        x = AvgPool(2, name="pool2")(x)
        x = Flatten(name="flatten")(x)
        x = Dense(120, kernel_init=tanh_init, name="fc1")(x)
        x = Tanh(name="tanh3")(x)
        x = Dense(84, kernel_init=tanh_init, name="fc2")(x)
        x = Tanh(name="tanh4")(x)
        return Dense(num_classes, kernel_init=tanh_init, name="fc3")(x)
