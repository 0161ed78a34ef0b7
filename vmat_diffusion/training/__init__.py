"""Training: plain-PyTorch loop pieces and the ``Trainer`` that composes them.

    from vmat_diffusion.training import TrainConfig, Trainer
    summary = Trainer(TrainConfig(data_dir="cases", epochs=50)).fit()

Pieces for a custom loop: ``train_step``, ``validate``, ``Objective`` (losses), ``EMA``,
``save_checkpoint`` / ``load_checkpoint`` / ``load_model_from_checkpoint``, the data helpers
in ``training.data`` and the output writers in ``training.run_logs``.
"""
from .checkpoint import (CheckpointError, capture_rng_state, load_checkpoint, load_model_from_checkpoint,
                         restore_rng_state, save_checkpoint)
from .config import TrainConfig
from .ema import EMA
from .losses import Objective, baseline_loss, diffusion_loss
from .loop import NonFiniteLossError, StepResult, Trainer, ValidationResult, cosine_lr, fit, train_step, validate

__all__ = [
    "TrainConfig", "Trainer", "fit", "train_step", "validate", "StepResult", "ValidationResult",
    "NonFiniteLossError", "cosine_lr", "Objective", "baseline_loss", "diffusion_loss", "EMA",
    "CheckpointError", "save_checkpoint", "load_checkpoint", "load_model_from_checkpoint",
    "capture_rng_state", "restore_rng_state",
]
