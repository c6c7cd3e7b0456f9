"""The model zoo: Flax modules ``LeNet5``, ``AlexNet``, ``VGG``, ``ResNet`` (``resnet18/34/50``,
``resnet20/56``), ``AirbenchNet``, ``JarrettNet``,
``MobileNetV2`` (``mobilenet_v2``, ``mobilenet_v2_cifar``), ``ConvNeXt`` (``convnext_tiny``,
``convnext_cifar``), ``UNet`` and ``SmallC3D``.

Every model is called as ``model.apply(variables, x, train=False)`` on channels-last images
``(N, H, W, C)`` and returns logits ``(N, num_classes)``; layers are named submodules (``conv1``,
``bn1``, ``fc``, ...; see each model's docstring and docs/models.md), so their parameters sit at
readable paths and Flax's method interception sees every layer.
"""

from jcnn.models.airbench import *  # noqa: F403
from jcnn.models.airbench import __all__ as _airbench
from jcnn.models.alexnet import *  # noqa: F403
from jcnn.models.alexnet import __all__ as _alexnet
from jcnn.models.c3d import *  # noqa: F403
from jcnn.models.c3d import __all__ as _c3d
from jcnn.models.convnext import *  # noqa: F403
from jcnn.models.convnext import __all__ as _convnext
from jcnn.models.fast_mnist import *  # noqa: F403
from jcnn.models.fast_mnist import __all__ as _fast_mnist
from jcnn.models.jarrett import *  # noqa: F403
from jcnn.models.jarrett import __all__ as _jarrett
from jcnn.models.lenet import *  # noqa: F403
from jcnn.models.lenet import __all__ as _lenet
from jcnn.models.mobilenet import *  # noqa: F403
from jcnn.models.mobilenet import __all__ as _mobilenet
from jcnn.models.resnet import *  # noqa: F403
from jcnn.models.resnet import __all__ as _resnet
from jcnn.models.unet import *  # noqa: F403
from jcnn.models.unet import __all__ as _unet
from jcnn.models.vgg import *  # noqa: F403
from jcnn.models.vgg import __all__ as _vgg

__all__ = [*_lenet, *_alexnet, *_vgg, *_resnet, *_airbench, *_jarrett]
__all__ += [*_mobilenet, *_convnext, *_unet, *_c3d, *_fast_mnist]
