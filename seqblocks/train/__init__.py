"""Training: the loop, its optimizer and schedule, atomic checkpoints, owned run directories, and
data-parallel wrapping."""

from seqblocks.train.checkpointing import latest_checkpoint, load_train_state, resolve_checkpoint, save_checkpoint
from seqblocks.train.config import TrainConfig
from seqblocks.train.distributed import DistInfo, init_distributed, wrap_model
from seqblocks.train.metrics import read_metrics
from seqblocks.train.optim import lr_factor, make_optimizer, make_scheduler, param_groups
from seqblocks.train.regression import RegressionResult, fit_regression
from seqblocks.train.rundir import RunDirectory, RunDirectoryError, RunDirectoryWriteError
from seqblocks.train.trainer import TrainResult, evaluate, train

__all__ = ["TrainConfig", "TrainResult", "train", "evaluate", "param_groups", "make_optimizer", "make_scheduler",
           "lr_factor", "save_checkpoint", "latest_checkpoint", "load_train_state", "resolve_checkpoint",
           "DistInfo", "init_distributed", "wrap_model", "RunDirectory", "RunDirectoryError", "RunDirectoryWriteError",
           "read_metrics", "RegressionResult", "fit_regression"]
