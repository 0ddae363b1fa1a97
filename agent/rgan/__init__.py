"""The RGAN of "Self-recoverable adversarial examples" (arXiv 2204.12050).

config.py   every option, typed         nets.py     G / R / D and their shared blocks
reducer.py  the dimension reducer DR    model.py    protect / recover, model files
losses.py   eq. 8–14                    train.py    the joint training loop
evaluate.py held-back metrics           checkpoint.py  resumable training state
"""

from .config import ModelConfig, ReducerConfig, TrainConfig
from .model import RGAN, load_model, save_model

__all__ = ["ModelConfig", "ReducerConfig", "TrainConfig", "RGAN", "load_model", "save_model"]
