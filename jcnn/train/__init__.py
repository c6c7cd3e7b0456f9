"""Training: optimizers and schedules, the train state, jit-compiled steps, fit(), checkpoints,
data parallelism and the ``jcnn-train`` command line."""

from jcnn.train import callbacks, parallel, run_folder, schedules
from jcnn.train.callbacks import BestCheckpoint, Callback, CallbackError, EarlyStopping, RunContext
from jcnn.train.checkpoint import CheckpointError, CheckpointManager
from jcnn.train.lookahead import lookahead
from jcnn.train.loop import NonFiniteLossError, TrainConfig, evaluate, fit
from jcnn.train.optim import OPTIMIZERS, default_decay_mask, optimizer
from jcnn.train.param_groups import active_for, label_by_path
from jcnn.train.protocol import TrainLoader
from jcnn.train.run_folder import RunFolderError
from jcnn.train.runs import Run, load_run
from jcnn.train.splits import split_validation
from jcnn.train.state import TrainState
from jcnn.train.steps import eval_step, train_step, train_steps
from jcnn.train.tta import flip_translate_views, tta_logits, with_tta

__all__ = [
    "schedules",
    "optimizer",
    "default_decay_mask",
    "OPTIMIZERS",
    "TrainState",
    "train_step",
    "train_steps",
    "eval_step",
    "TrainConfig",
    "fit",
    "evaluate",
    "NonFiniteLossError",
    "CheckpointManager",
    "CheckpointError",
    "parallel",
    "label_by_path",
    "active_for",
    "lookahead",
    "flip_translate_views",
    "tta_logits",
    "with_tta",
    "callbacks",
    "Callback",
    "CallbackError",
    "RunContext",
    "EarlyStopping",
    "BestCheckpoint",
    "TrainLoader",
    "split_validation",
    "load_run",
    "Run",
    "RunFolderError",
    "run_folder",
]
