"""DDIM sampler (Song et al. 2021) for a noise-predicting model.

One update from timestep ``t`` to ``t_prev`` (alpha-bar ``a_t``, ``a_p``; ``a_p = 1`` when
``t_prev = -1``, i.e. after the last step)::

    x0    = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)           # clipped to clip_x0, then
    eps   = (x_t - sqrt(a_t) x0) / sqrt(1 - a_t)             # eps re-derived from the clipped x0
    sigma = eta * sqrt((1 - a_p) / (1 - a_t)) * sqrt(1 - a_t / a_p)
    x_p   = sqrt(a_p) x0 + sqrt(1 - a_p - sigma^2) eps + sigma z,   z ~ N(0, I)

eta = 0 is the deterministic DDIM sampler; eta = 1 with steps = timesteps is ancestral DDPM
sampling (sigma^2 equals the DDPM posterior variance). eta must lie in [0, 1]: above 1, sigma^2
exceeds 1 - a_p, the eps term is cut to 0 and the sample gets more noise than its timestep
holds. The last step returns the (clipped) x0.

Timestep spacing: "trailing" (default) starts at T - 1, e.g. 999, 979, ..., 19 for T = 1000 and
50 steps, so the first step starts from (nearly) pure noise as in training; "leading"
(980, 960, ..., 0) never starts at T - 1 and is offered only for comparison, as is
"linspace" (999, ..., 0).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm

from .schedule import NoiseSchedule

SPACINGS = ("trailing", "leading", "linspace")


def ddim_timesteps(timesteps: int, steps: int, spacing: str = "trailing") -> np.ndarray:
    """The ``steps`` timesteps (int64, descending, unique) a DDIM run visits out of ``timesteps``."""
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    if not 1 <= steps <= timesteps:
        raise ValueError(f"steps must lie in [1, {timesteps}] (the schedule's timesteps), got {steps}")
    if spacing == "trailing":
        ts = np.round(timesteps - np.arange(steps) * (timesteps / steps)).astype(np.int64) - 1
    elif spacing == "leading":
        ts = (np.arange(steps, dtype=np.int64) * (timesteps // steps))[::-1]
    else:
        ts = np.round(np.linspace(timesteps - 1, 0, steps)).astype(np.int64)
    return np.ascontiguousarray(ts)


def check_eta(eta) -> float:
    """``eta`` as a float, checked to be a number in [0, 1] (ValueError naming eta otherwise)."""
    try:
        value = float(eta)
    except (TypeError, ValueError):
        raise ValueError(f"eta must be a number in [0, 1], got {eta!r}") from None
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"eta must be a number in [0, 1] (0 = deterministic DDIM, 1 = DDPM-like), got {eta!r}")
    return value


def _randn(shape, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal float32 noise on ``like``'s device, drawn on the generator's device."""
    draw_device = generator.device if generator is not None else like.device
    noise = torch.randn(tuple(shape), generator=generator, device=draw_device, dtype=torch.float32)
    return noise.to(like.device)


class DDIMSampler:
    """DDIM sampling with ``steps`` model calls over a ``NoiseSchedule``.

    ``eta`` must lie in [0, 1] (ValueError otherwise; see the module docstring).
    Attributes: ``schedule``, ``steps``, ``eta``, ``spacing``, ``clip_x0`` ((low, high) or None)
    and ``timesteps`` (LongTensor (steps,), descending; first T - 1 for "trailing").
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        steps: int = 50,
        eta: float = 0.0,
        spacing: str = "trailing",
        clip_x0: tuple[float, float] | None = (-1.0, 1.0),
    ):
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
            raise TypeError(f"steps must be an int, got {steps!r}")
        eta = check_eta(eta)
        if clip_x0 is not None:
            low, high = (float(v) for v in clip_x0)
            if not low < high:
                raise ValueError(f"clip_x0 must be (low, high) with low < high, or None; got {clip_x0}")
            clip_x0 = (low, high)
        self.schedule = schedule
        self.steps = int(steps)
        self.eta = eta
        self.spacing = spacing
        self.clip_x0 = clip_x0
        self.timesteps = torch.from_numpy(ddim_timesteps(schedule.timesteps, self.steps, spacing))
        # alpha-bar at t = -1, 0, ..., T - 1 as Python floats, read once: a step on a schedule
        # whose tables live on a GPU would otherwise wait for the GPU at every lookup
        self._alpha_bars = [1.0] + schedule.alphas_cumprod.detach().double().cpu().tolist()

    def __len__(self) -> int:
        return self.steps

    def __repr__(self) -> str:
        return (
            f"DDIMSampler(steps={self.steps}, eta={self.eta}, spacing={self.spacing!r}, "
            f"clip_x0={self.clip_x0}, timesteps={self.schedule.timesteps})"
        )

    def pairs(self):
        """Yield (t, t_prev) python ints for every step; the last t_prev is -1 (alpha-bar 1)."""
        ts = self.timesteps.tolist()
        yield from zip(ts, ts[1:] + [-1])

    def _alpha_bar(self, t) -> float:
        step = int(t)
        if not -1 <= step < len(self._alpha_bars) - 1:
            raise ValueError(f"t must lie in [-1, {len(self._alpha_bars) - 2}] (-1 = no noise), got {step}")
        return self._alpha_bars[step + 1]

    def sigma(self, t, t_prev) -> float:
        """Standard deviation of the noise added in the step t -> t_prev."""
        a_t, a_p = self._alpha_bar(t), self._alpha_bar(t_prev)
        if self.eta == 0.0 or a_p >= 1.0:
            return 0.0
        variance = (1.0 - a_p) / (1.0 - a_t) * (1.0 - a_t / a_p)
        return self.eta * math.sqrt(max(variance, 0.0))

    def step(
        self,
        eps: torch.Tensor,
        t,
        t_prev,
        x_t: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """One DDIM update: x_t (B, C, ...) and predicted noise ``eps`` (same shape) -> x_prev float32.

        ``t``, ``t_prev``: ints or 0-d integer tensors (``t_prev = -1`` after the last step, where
        the result is the (clipped) x0 estimate). Noise for eta > 0 is drawn with ``generator``.
        """
        t, t_prev = int(t), int(t_prev)
        if not t_prev < t:
            raise ValueError(f"t_prev must be smaller than t, got t={t}, t_prev={t_prev}")
        if eps.shape != x_t.shape:
            raise ValueError(f"eps and x_t must have the same shape, got {tuple(eps.shape)} and {tuple(x_t.shape)}")
        a_t, a_p = self._alpha_bar(t), self._alpha_bar(t_prev)
        with torch.autocast(device_type=x_t.device.type, enabled=False):
            x_t, eps = x_t.float(), eps.float()
            x0 = (x_t - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
            if self.clip_x0 is not None:
                x0 = x0.clamp(*self.clip_x0)
                eps = (x_t - math.sqrt(a_t) * x0) / math.sqrt(1.0 - a_t)
            sigma = self.sigma(t, t_prev)
            direction = math.sqrt(max(1.0 - a_p - sigma**2, 0.0))
            x_prev = math.sqrt(a_p) * x0 + direction * eps
            if sigma > 0.0:
                x_prev = x_prev + sigma * _randn(x_t.shape, x_t, generator)
            return x_prev

    @torch.no_grad()
    def sample(
        self,
        model,
        condition: torch.Tensor,
        constraints: torch.Tensor | None,
        generator: torch.Generator | None = None,
        progress: bool = False,
        shape=None,
    ) -> torch.Tensor:
        """Draw x0 (B, 1, X, Y, Z) float32, clipped to ``clip_x0``, for a batch of conditions.

        ``model(torch.cat([x_t, condition], 1), t_batch, constraints)`` must predict the noise;
        ``condition``: (B, C, X, Y, Z); ``constraints``: passed through unchanged (e.g. (B, K)
        or None); ``t_batch``: LongTensor (B,). x_T is drawn with ``generator``. ``shape``
        overrides the sample shape (B, C_x, X, Y, Z) when the model's x has more than 1 channel.
        The model's mode (train/eval) is left as it is; call ``model.eval()`` first.
        """
        if condition.dim() < 3:
            raise ValueError(f"condition must be (B, C, *spatial), got shape {tuple(condition.shape)}")
        batch, spatial = condition.shape[0], tuple(condition.shape[2:])
        shape = (batch, 1, *spatial) if shape is None else tuple(int(s) for s in shape)
        if len(shape) != condition.dim() or shape[0] != batch or shape[2:] != spatial:
            raise ValueError(
                f"shape must be (B={batch}, C, {', '.join(map(str, spatial))}) to match condition, got {shape}"
            )
        condition = condition.float()
        x = _randn(shape, condition, generator)
        for t, t_prev in tqdm(self.pairs(), total=len(self), desc="DDIM", disable=not progress):
            t_batch = torch.full((batch,), t, dtype=torch.long, device=condition.device)
            eps = model(torch.cat([x, condition], dim=1), t_batch, constraints).float()
            x = self.step(eps, t, t_prev, x, generator)
        return x
