"""Exponential moving average (EMA) of a model's weights.

``ema.module`` is a frozen copy of the model in eval mode whose floating-point parameters and
buffers follow ``ema = d * ema + (1 - d) * weights`` after every optimizer step, with the decay
warmed up as ``d = min(decay, (1 + n) / (10 + n))`` for the n-th update, so early, badly
trained weights are forgotten fast. Integer buffers are copied. Used for validation and saved
in checkpoints (default on for the diffusion model).
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model inside a DistributedDataParallel / DataParallel wrapper."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


class EMA:
    def __init__(self, model: nn.Module, decay: float = 0.999):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay: expected a number in (0, 1), got {decay!r}")
        self.decay = float(decay)
        self.num_updates = 0
        self.module = copy.deepcopy(unwrap_model(model)).eval().requires_grad_(False)

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average toward ``model``'s current weights (call after each optimizer step)."""
        decay = self.current_decay()
        source = unwrap_model(model).state_dict()
        for name, average in self.module.state_dict().items():
            value = source[name].detach()
            if average.dtype.is_floating_point:
                average.lerp_(value.to(average.dtype), 1.0 - decay)
            else:
                average.copy_(value)
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "module": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        self.module.load_state_dict(state["module"])
