"""Training objectives of the two models.

Baseline (``BaselineUNet3D``, the primary model) regresses dose / Rx::

    loss = MSE(pred, dose / Rx) + penalty_weight * mean(relu(-pred)^2)

(``loss="l1"``: the mean absolute error replaces the MSE, in both models.)

With a loss mask (``Objective.loss_mask``, e.g. OpenKBP's ``possible_dose_mask``) the data term
(MSE or L1) is averaged over the voxels inside the mask only, as the dose score is: voxels that
can receive no dose then take no share of the loss (on OpenKBP only 3-13 % of a patch is inside).
The batch carries the mask as ``loss_mask`` (B, 1, X, Y, Z), inside where > 0.5; the penalty stays over
all voxels. A patch with no voxel inside contributes nothing.

DDPM (``SimpleUNet3D``) predicts the noise added to x0 = ``dose_to_unit(dose, Rx)`` (in [-1, 1])::

    loss = MSE(eps_hat, eps) + penalty_weight * mean_b[ alpha_bar_t * mean(relu(-d0_hat)^2) ]

where ``d0_hat = unit_to_dose(x0_hat, 1) = 0.6 (x0_hat + 1)`` is the dose / Rx implied by the
x0 recovered from the predicted noise, ``x0_hat = (x_t - sqrt(1 - ab) eps_hat) / sqrt(ab)``.

Why the ``alpha_bar_t`` weight: the error of x0_hat is ``sqrt((1 - ab) / ab)`` times the error of
eps_hat, which is about 2e4 at t = 999 of this package's cosine schedule (ab ~ 2.4e-9; the
training guide quotes 6e4 for its schedule); an unweighted penalty
on x0_hat would then dominate the loss and its gradients by orders of magnitude whenever a very
noisy sample is drawn. Multiplying by ab bounds the squared term by ``(1 - ab) |eps_hat - eps|^2``
(because x0 >= -1, the part of x0_hat below -1 is no larger than its error), so the penalty stays
on the scale of the MSE at every t, acts mostly at low noise levels where x0_hat is meaningful,
and vanishes smoothly as t -> T. The penalty is computed in float32 outside autocast.

``penalty_weight`` defaults to 0.1 (the training guide's value). Both losses return a
``LossParts`` (total, mse, penalty, data) of float32 scalars: ``data`` is the term trained on
(MSE or L1), ``mse`` is always the MSE (for logs that compare runs).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ..conventions import dose_to_unit, unit_to_dose


@dataclass
class LossParts:
    total: torch.Tensor
    mse: torch.Tensor
    penalty: torch.Tensor
    data: torch.Tensor


LOSS_KINDS = ("mse", "l1")


def data_loss(prediction: torch.Tensor, target: torch.Tensor, kind: str = "mse",
              mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(the data term of ``kind`` ("mse" or "l1"), the MSE) of two float32 tensors, averaged over
    all voxels or, with ``mask`` (same shape; inside where > 0.5), over the voxels inside."""
    if kind not in LOSS_KINDS:
        raise ValueError(f"loss: expected one of {', '.join(LOSS_KINDS)}, got {kind!r}")
    if mask is None:
        mse = F.mse_loss(prediction, target)
        return (mse if kind == "mse" else F.l1_loss(prediction, target)), mse
    weight = (mask > 0.5).to(torch.float32)
    inside = weight.sum().clamp_min(1.0)
    difference = prediction - target
    mse = (difference.square() * weight).sum() / inside
    return (mse if kind == "mse" else (difference.abs() * weight).sum() / inside), mse


def autocast_context(device: torch.device, dtype: Optional[torch.dtype]):
    """``torch.autocast`` for ``device`` with ``dtype`` (bf16/fp16), or a no-op for fp32 (None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def negative_dose_penalty(dose_over_rx: torch.Tensor) -> torch.Tensor:
    """Per-sample mean of relu(-d)^2 for d = dose / Rx (B, 1, X, Y, Z) -> (B,) float32."""
    return F.relu(-dose_over_rx.float()).pow(2).flatten(1).mean(1)


def baseline_inputs(batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Network input of the baseline: cat([ct, masks_sdf]) (B, 1 + S, X, Y, Z)."""
    return torch.cat([batch["ct"], batch["masks_sdf"]], dim=1)


def regression_loss(prediction: torch.Tensor, target: torch.Tensor, penalty_weight: float = 0.1,
                    loss: str = "mse", mask: Optional[torch.Tensor] = None) -> LossParts:
    """Baseline loss from a prediction and target in dose / Rx units (B, 1, X, Y, Z); ``mask``:
    optional (B, 1, X, Y, Z) loss mask, inside where > 0.5 (module doc)."""
    prediction = prediction.float()
    data, mse = data_loss(prediction, target.float(), loss, mask)
    penalty = negative_dose_penalty(prediction).mean()
    return LossParts(total=data + penalty_weight * penalty, mse=mse, penalty=penalty, data=data)


def noise_loss(eps_hat: torch.Tensor, noise: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, schedule,
               penalty_weight: float = 0.1, loss: str = "mse", mask: Optional[torch.Tensor] = None) -> LossParts:
    """DDPM loss from the predicted noise (module doc): MSE (or L1) + alpha-bar-weighted penalty on
    x0_hat; ``mask``: optional (B, 1, X, Y, Z) loss mask."""
    eps_hat = eps_hat.float()
    data, mse = data_loss(eps_hat, noise.float(), loss, mask)
    x0_hat = schedule.predict_x0(x_t, eps_hat, t)
    alpha_bar = schedule.alpha_bar(t).to(device=eps_hat.device, dtype=torch.float32)
    penalty = (alpha_bar * negative_dose_penalty(unit_to_dose(x0_hat, 1.0))).mean()
    return LossParts(total=data + penalty_weight * penalty, mse=mse, penalty=penalty, data=data)


def baseline_loss(model, batch: Dict[str, torch.Tensor], rx_dose_gy: float, penalty_weight: float = 0.1,
                  autocast_dtype: Optional[torch.dtype] = None, loss: str = "mse") -> LossParts:
    """Regression loss on a batch (tensors on the model's device, dose in Gy)."""
    target = batch["dose"].float() / rx_dose_gy
    with autocast_context(target.device, autocast_dtype):
        prediction = model(baseline_inputs(batch), batch["constraints"])
    return regression_loss(prediction, target, penalty_weight, loss, batch.get("loss_mask"))


def diffusion_loss(model, batch: Dict[str, torch.Tensor], schedule, rx_dose_gy: float, penalty_weight: float = 0.1,
                   generator: Optional[torch.Generator] = None,
                   autocast_dtype: Optional[torch.dtype] = None, loss: str = "mse") -> LossParts:
    """Noise-prediction loss with the alpha-bar-weighted negative-dose penalty (module doc).

    Timesteps and noise are drawn with ``generator`` (on the generator's device, then moved).
    """
    x0 = dose_to_unit(batch["dose"].float(), rx_dose_gy)
    t = schedule.sample_timesteps(x0.shape[0], generator=generator, device=x0.device)
    draw_device = generator.device if generator is not None else x0.device
    noise = torch.randn(x0.shape, generator=generator, device=draw_device, dtype=torch.float32).to(x0.device)
    x_t = schedule.add_noise(x0, noise, t)
    condition = baseline_inputs(batch)
    with autocast_context(x0.device, autocast_dtype):
        eps_hat = model(torch.cat([x_t, condition], dim=1), t, batch["constraints"])
    return noise_loss(eps_hat, noise, x_t, t, schedule, penalty_weight, loss, batch.get("loss_mask"))


@dataclass
class Objective:
    """Which model is trained and how its loss is computed.

    kind: "baseline" or "ddpm"; schedule: the ``NoiseSchedule`` (ddpm only); loss_kind: "mse" or "l1";
    loss_mask: the name of the case extra whose voxels the data term is averaged over (module
    doc), or None for all voxels. Training batches then carry it as ``loss_mask``.
    """
    kind: str
    rx_dose_gy: float
    penalty_weight: float = 0.1
    schedule: Optional[torch.nn.Module] = None
    loss_kind: str = "mse"
    loss_mask: Optional[str] = None

    def __post_init__(self):
        if self.kind not in ("baseline", "ddpm"):
            raise ValueError(f"kind: expected 'baseline' or 'ddpm', got {self.kind!r}")
        if self.kind == "ddpm" and self.schedule is None:
            raise ValueError("schedule: a NoiseSchedule is required for kind='ddpm'")
        if self.loss_kind not in LOSS_KINDS:
            raise ValueError(f"loss: expected one of {', '.join(LOSS_KINDS)}, got {self.loss_kind!r}")

    def loss(self, model, batch, generator: Optional[torch.Generator] = None,
             autocast_dtype: Optional[torch.dtype] = None) -> LossParts:
        if self.kind == "baseline":
            return baseline_loss(model, batch, self.rx_dose_gy, self.penalty_weight, autocast_dtype, self.loss_kind)
        return diffusion_loss(model, batch, self.schedule, self.rx_dose_gy, self.penalty_weight,
                              generator, autocast_dtype, self.loss_kind)
