"""Training: the run flow on the HF Trainer, methods, adapters and callbacks."""

from .model import load_model
from .run import TrainResult, train

__all__ = ["TrainResult", "load_model", "train"]
