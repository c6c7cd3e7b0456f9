"""Training: optimizers and schedules, the train state, jit-compiled steps, fit(), checkpoints,
data parallelism and the ``jcnn-train`` command line."""

from jcnn.train import schedules
from jcnn.train.optim import OPTIMIZERS, default_decay_mask, optimizer
from jcnn.train.state import TrainState
from jcnn.train.steps import eval_step, train_step

__all__ = [
    "schedules",
    "optimizer",
    "default_decay_mask",
    "OPTIMIZERS",
    "TrainState",
    "train_step",
    "eval_step",
]
