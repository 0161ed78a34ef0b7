"""Diffusion noise schedule: betas, alpha-bar, and the forward (noising) process.

The schedule is an ``nn.Module`` so that ``.to(device)`` moves it together with a model, but its
tables (``betas``, ``alphas_cumprod``) always stay **float64**: ``NoiseSchedule._apply`` lets
device moves through and ignores dtype casts, so ``model.half()``, ``model.to(torch.bfloat16)``
or ``schedule.float()`` never round alpha-bar (1 - alpha-bar near t = 0 is ~1e-5 and would be
badly rounded in half precision). The tables are non-persistent buffers: they are not written
to ``state_dict``; rebuild a schedule from its ``config`` (``NoiseSchedule(**s.config)``).

Notation (Ho et al. 2020): ``x_t = sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * eps`` for
integer timesteps ``t`` in ``[0, timesteps - 1]``; ``t = -1`` stands for "no noise at all"
(alpha-bar 1), which the DDIM sampler uses after its last step.
"""
from __future__ import annotations

import math
import operator

import torch
from torch import nn

SCHEDULES = ("cosine", "linear")
COSINE_OFFSET = 0.008  # s of Nichol & Dhariwal (2021)
MAX_BETA = 0.999  # cap of Nichol & Dhariwal: keeps the last steps from being pure noise with beta = 1
LINEAR_BETA_START = 1e-4  # DDPM values, for 1000 timesteps
LINEAR_BETA_END = 0.02
_PROTECTED_BUFFERS = ("betas", "alphas_cumprod")


def cosine_betas(timesteps: int, s: float = COSINE_OFFSET, max_beta: float = MAX_BETA) -> torch.Tensor:
    """Cosine schedule betas (timesteps,) float64.

    ``alpha_bar(t) = f(t) / f(0)``, ``f(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2)``, and
    ``beta_t = min(1 - alpha_bar(t + 1) / alpha_bar(t), max_beta)`` for ``t = 0 .. T - 1``.
    """
    steps = torch.arange(timesteps + 1, dtype=torch.float64)
    f = torch.cos((steps / timesteps + s) / (1 + s) * (math.pi / 2)) ** 2
    alpha_bar = f / f[0]
    betas = 1.0 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(min=0.0, max=max_beta)


def linear_betas(timesteps: int, max_beta: float = MAX_BETA) -> torch.Tensor:
    """DDPM linear betas (timesteps,) float64: 1e-4 .. 0.02 for 1000 steps, scaled by 1000 / timesteps.

    The scaling (Nichol & Dhariwal 2021) keeps the total amount of noise comparable for other
    step counts; betas are capped at ``max_beta`` so very short schedules stay valid.
    """
    scale = 1000.0 / timesteps
    betas = torch.linspace(scale * LINEAR_BETA_START, scale * LINEAR_BETA_END, timesteps, dtype=torch.float64)
    return betas.clamp(max=max_beta)


class NoiseSchedule(nn.Module):
    """Discrete noise schedule with ``timesteps`` steps ("cosine" or "linear").

    Buffers (float64, shape (timesteps,)): ``betas``, ``alphas_cumprod`` (alpha-bar).
    Attributes: ``timesteps`` (int), ``schedule`` (str), ``config`` (constructor kwargs).
    """

    def __init__(self, timesteps: int = 1000, schedule: str = "cosine"):
        super().__init__()
        if isinstance(timesteps, bool):
            raise TypeError(f"timesteps must be an int, got {timesteps!r}")
        try:
            timesteps = operator.index(timesteps)
        except TypeError:
            raise TypeError(f"timesteps must be an int, got {type(timesteps).__name__}") from None
        if timesteps < 1:
            raise ValueError(f"timesteps must be >= 1, got {timesteps}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        self.timesteps = timesteps
        self.schedule = schedule
        self.config = {"timesteps": timesteps, "schedule": schedule}
        betas = cosine_betas(timesteps) if schedule == "cosine" else linear_betas(timesteps)
        self.register_buffer("betas", betas, persistent=False)
        self.register_buffer("alphas_cumprod", torch.cumprod(1.0 - betas, dim=0), persistent=False)

    def _apply(self, fn, recurse=True):
        """Move the float64 tables with the module, but never change their dtype.

        ``fn`` is applied to a copy to learn the target device; the table itself is re-created
        from the float64 original on that device (nothing is cast in place).
        """
        originals = {name: self._buffers[name] for name in _PROTECTED_BUFFERS}
        super()._apply(fn, recurse)
        for name, original in originals.items():
            moved = self._buffers[name]
            if moved.dtype != torch.float64:
                self._buffers[name] = original.to(device=moved.device, dtype=torch.float64)
        return self

    def extra_repr(self) -> str:
        return f"timesteps={self.timesteps}, schedule={self.schedule!r}"

    # ------------------------------------------------------------------ look-ups
    def _as_index(self, t) -> torch.Tensor:
        """Timesteps (int, 0-d or n-d integer tensor) -> LongTensor on the tables' device, checked."""
        t = torch.as_tensor(t, device=self.alphas_cumprod.device)
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"t must hold integer timesteps, got dtype {t.dtype}")
        t = t.long()
        if t.numel() and (int(t.min()) < -1 or int(t.max()) >= self.timesteps):
            raise ValueError(
                f"t must lie in [-1, {self.timesteps - 1}] (-1 = no noise), "
                f"got values in [{int(t.min())}, {int(t.max())}]"
            )
        return t

    def alpha_bar(self, t) -> torch.Tensor:
        """alpha-bar at timesteps ``t`` (any shape of integers), float64, same shape; t = -1 gives 1."""
        t = self._as_index(t)
        padded = torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod])
        return padded[t + 1]

    def _coefficients(self, t, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(alpha_bar), sqrt(1 - alpha_bar)) float32, shaped to broadcast over ``like`` (B, ...)."""
        alpha_bar = self.alpha_bar(t)
        if alpha_bar.dim() == 1 and like.dim() > 1:
            if alpha_bar.shape[0] != like.shape[0]:
                raise ValueError(
                    f"t must have one timestep per batch item ({like.shape[0]}), got shape {tuple(alpha_bar.shape)}"
                )
            alpha_bar = alpha_bar.reshape(-1, *([1] * (like.dim() - 1)))
        elif alpha_bar.dim() > 1:
            raise ValueError(f"t must be a scalar or of shape (B,), got shape {tuple(alpha_bar.shape)}")
        signal = alpha_bar.sqrt().to(device=like.device, dtype=torch.float32)
        noise = (1.0 - alpha_bar).sqrt().to(device=like.device, dtype=torch.float32)
        return signal, noise

    # ------------------------------------------------------------------ forward process
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise, float32 (B, ...).

        ``t``: LongTensor (B,) (or one int for the whole batch). Computed in float32 even
        inside an autocast region.
        """
        if x0.shape != noise.shape:
            raise ValueError(f"x0 and noise must have the same shape, got {tuple(x0.shape)} and {tuple(noise.shape)}")
        with torch.autocast(device_type=x0.device.type, enabled=False):
            signal, sigma = self._coefficients(t, x0)
            return signal * x0.float() + sigma * noise.float()

    def predict_x0(self, x_t: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        """x0 implied by x_t and its noise: (x_t - sqrt(1 - ab) eps) / sqrt(ab), float32."""
        with torch.autocast(device_type=x_t.device.type, enabled=False):
            signal, sigma = self._coefficients(t, x_t)
            return (x_t.float() - sigma * eps.float()) / signal

    def predict_eps(self, x_t: torch.Tensor, x0: torch.Tensor, t) -> torch.Tensor:
        """Noise implied by x_t and x0: (x_t - sqrt(ab) x0) / sqrt(1 - ab), float32 (t >= 0)."""
        with torch.autocast(device_type=x_t.device.type, enabled=False):
            signal, sigma = self._coefficients(t, x_t)
            return (x_t.float() - signal * x0.float()) / sigma

    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Uniform random timesteps, LongTensor (batch,) in [0, timesteps - 1].

        Drawn on the generator's device (CPU without one) so a seeded generator gives the same
        draw everywhere, then moved to ``device`` (default: the tables' device).
        """
        if batch < 0:
            raise ValueError(f"batch must be >= 0, got {batch}")
        draw_device = generator.device if generator is not None else torch.device("cpu")
        t = torch.randint(0, self.timesteps, (batch,), generator=generator, device=draw_device)
        return t.to(device if device is not None else self.alphas_cumprod.device)
