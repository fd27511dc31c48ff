"""Training, evaluation, optimisation and metrics."""
from .config import TrainConfig, load_config
from .evaluate import evaluate
from .metrics import ConfusionMatrix
from .trainer import train

__all__ = ["ConfusionMatrix", "TrainConfig", "evaluate", "load_config", "train"]
