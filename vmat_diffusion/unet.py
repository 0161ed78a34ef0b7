"""3-D U-Nets for dose prediction: one backbone, two thin wrappers.

* ``BaselineUNet3D`` (primary model): direct dose regression from CT + structure SDFs,
  conditioned on the constraint vector.
* ``SimpleUNet3D``: noise predictor for diffusion (input: noisy dose x_t + the same condition
  channels), conditioned on the timestep and the constraint vector.

Backbone (``UNet3DBackbone``), tensors channels-first (B, C, X, Y, Z)::

    encoder level i (i = 0 .. levels-1): ConvBlock with base * 2**i channels,
                                         MaxPool3d(2) between levels
    bottleneck:                          ConvBlock at the deepest level (base * 2**(levels-1))
    decoder level i (levels-2 .. 0):     trilinear 2x upsampling, concat the encoder skip,
                                         ConvBlock -> base * 2**i channels
    output:                              1x1x1 conv, zero-initialised (an untrained model outputs 0)

ConvBlock: conv3x3x3 -> GroupNorm -> FiLM -> SiLU -> conv3x3x3 -> GroupNorm -> SiLU, plus a
residual (1x1x1 conv where the channel count changes). FiLM applies ``h * (1 + scale) + shift``
with (scale, shift) = Linear(SiLU(cond)) per block, where ``cond`` is the embedding of the
conditioning inputs (constraints -> MLP(128); for ``SimpleUNet3D`` concatenated with
sinusoidal(t) -> MLP(128)).

Spatial sizes must be divisible by ``2 ** (levels - 1)`` (there are ``levels - 1`` poolings).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def _check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Timesteps (B,) -> (B, dim) float32 [sin | cos] features at geometric frequencies."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def embedding_mlp(in_dim: int, out_dim: int) -> nn.Sequential:
    """Linear -> SiLU -> Linear, the MLP for timestep and constraint embeddings."""
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))


class ConvBlock(nn.Module):
    """Residual double 3x3x3 conv with GroupNorm, SiLU and FiLM: (B, in, ...) -> (B, out, ...)."""

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int, groups: int):
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.norm1 = nn.GroupNorm(groups, out_channels)
        self.film = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * out_channels))
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv3d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.norm1(self.conv1(x))
        scale, shift = self.film(cond)[:, :, None, None, None].chunk(2, dim=1)
        h = F.silu(h * (1 + scale) + shift)
        h = F.silu(self.norm2(self.conv2(h)))
        return h + self.skip(x)


class UNet3DBackbone(nn.Module):
    """The shared U-Net: forward(x (B, in, X, Y, Z), cond (B, cond_dim)) -> (B, out, X, Y, Z)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        base_channels: int,
        levels: int,
        cond_dim: int,
        groups: int,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        _check_positive_int("in_channels", in_channels)
        _check_positive_int("out_channels", out_channels)
        _check_positive_int("base_channels", base_channels)
        _check_positive_int("levels", levels)
        _check_positive_int("groups", groups)
        if base_channels % groups:
            raise ValueError(f"base_channels ({base_channels}) must be divisible by groups ({groups})")
        self.in_channels = in_channels
        self.levels = levels
        self.use_checkpoint = use_checkpoint
        widths = [base_channels * 2**i for i in range(levels)]
        self.encoder = nn.ModuleList()
        previous = in_channels
        for width in widths:
            self.encoder.append(ConvBlock(previous, width, cond_dim, groups))
            previous = width
        self.bottleneck = ConvBlock(widths[-1], widths[-1], cond_dim, groups)
        self.decoder = nn.ModuleList(
            ConvBlock(widths[i + 1] + widths[i], widths[i], cond_dim, groups) for i in reversed(range(levels - 1))
        )
        self.output = nn.Conv3d(widths[0], out_channels, 1)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    @property
    def size_multiple(self) -> int:
        """Every spatial size must be a multiple of this (2 ** (levels - 1))."""
        return 2 ** (self.levels - 1)

    def check_input(self, x: torch.Tensor) -> None:
        """ValueError unless x is (B, in_channels, X, Y, Z) with sizes divisible by size_multiple."""
        if x.dim() != 5:
            raise ValueError(f"x must be (B, C, X, Y, Z), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"x must have {self.in_channels} channels (dim 1), got {x.shape[1]}")
        spatial = tuple(x.shape[2:])
        if any(size % self.size_multiple for size in spatial):
            raise ValueError(
                f"spatial size {spatial} must be divisible by 2**(levels-1) = {self.size_multiple} "
                f"(levels={self.levels}); crop or pad the input"
            )

    def _block(self, block: ConvBlock, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, cond, use_reentrant=False)
        return block(x, cond)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        skips = []
        h = x
        for i, block in enumerate(self.encoder):
            if i > 0:
                h = F.max_pool3d(h, 2)
            h = self._block(block, h, cond)
            skips.append(h)
        h = self._block(self.bottleneck, h, cond)
        for block, skip in zip(self.decoder, reversed(skips[:-1])):
            h = F.interpolate(h, scale_factor=2, mode="trilinear", align_corners=False)
            h = self._block(block, torch.cat([h, skip.to(h.dtype)], dim=1), cond)
        return self.output(h)


def _constraint_input(constraints: torch.Tensor | None, batch: int, constraint_dim: int, like: torch.Tensor):
    """Constraints (B, K) float32, or zeros when None; ValueError on a wrong shape."""
    if constraints is None:
        return torch.zeros(batch, constraint_dim, device=like.device, dtype=torch.float32)
    if constraints.dim() != 2 or constraints.shape != (batch, constraint_dim):
        raise ValueError(
            f"constraints must be (B={batch}, constraint_dim={constraint_dim}) or None, got {tuple(constraints.shape)}"
        )
    return constraints.float()


class SimpleUNet3D(nn.Module):
    """Noise-predicting 3-D U-Net for diffusion, conditioned on timestep and constraints.

    forward(x (B, in_channels, X, Y, Z), t (B,) integer timesteps (or one int),
    constraints (B, constraint_dim) or None) -> predicted noise (B, out_channels, X, Y, Z).
    Default input channels: noisy dose x_t + CT + 8 structure SDFs = 10.

    Parameter counts (defaults: in_channels=10, out_channels=1, levels=4, constraint_dim=13,
    time_dim=128, embed_dim=128): base_channels=32 -> 10,040,417; base_channels=48 -> 22,145,105.
    """

    def __init__(
        self,
        in_channels: int = 10,
        out_channels: int = 1,
        base_channels: int = 48,
        levels: int = 4,
        constraint_dim: int = 13,
        time_dim: int = 128,
        groups: int = 8,
        embed_dim: int = 128,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        _check_positive_int("constraint_dim", constraint_dim)
        _check_positive_int("embed_dim", embed_dim)
        if _check_positive_int("time_dim", time_dim, minimum=2) % 2:
            raise ValueError(f"time_dim must be even (sin and cos halves), got {time_dim}")
        self.config = dict(
            in_channels=in_channels,
            out_channels=out_channels,
            base_channels=base_channels,
            levels=levels,
            constraint_dim=constraint_dim,
            time_dim=time_dim,
            groups=groups,
            embed_dim=embed_dim,
            use_checkpoint=use_checkpoint,
        )
        self.constraint_dim = constraint_dim
        self.time_dim = time_dim
        self.time_mlp = embedding_mlp(time_dim, embed_dim)
        self.constraint_mlp = embedding_mlp(constraint_dim, embed_dim)
        self.backbone = UNet3DBackbone(
            in_channels, out_channels, base_channels, levels, 2 * embed_dim, groups, use_checkpoint
        )

    @property
    def size_multiple(self) -> int:
        return self.backbone.size_multiple

    def _timestep_input(self, t, batch: int, like: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=like.device)
        if t.dim() == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"t must be one timestep per batch item, shape ({batch},), got {tuple(t.shape)}")
        return t

    def forward(self, x: torch.Tensor, t, constraints: torch.Tensor | None = None) -> torch.Tensor:
        self.backbone.check_input(x)
        batch = x.shape[0]
        t = self._timestep_input(t, batch, x)
        time_embedding = self.time_mlp(sinusoidal_embedding(t, self.time_dim))
        constraint_embedding = self.constraint_mlp(_constraint_input(constraints, batch, self.constraint_dim, x))
        return self.backbone(x, torch.cat([time_embedding, constraint_embedding], dim=1))


class BaselineUNet3D(nn.Module):
    """Direct dose-regression 3-D U-Net (the primary model), conditioned on constraints only.

    forward(x (B, in_channels, X, Y, Z), constraints (B, constraint_dim) or None)
    -> (B, out_channels, X, Y, Z). Default input channels: CT + 8 structure SDFs = 9.
    The output layer is zero-initialised: training starts from a constant-0 prediction.

    Parameter counts (defaults: in_channels=9, out_channels=1, levels=4, constraint_dim=13,
    embed_dim=128): base_channels=32 -> 9,760,737; base_channels=48 -> 21,742,097.
    """

    def __init__(
        self,
        in_channels: int = 9,
        out_channels: int = 1,
        base_channels: int = 48,
        levels: int = 4,
        constraint_dim: int = 13,
        groups: int = 8,
        embed_dim: int = 128,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        _check_positive_int("constraint_dim", constraint_dim)
        _check_positive_int("embed_dim", embed_dim)
        self.config = dict(
            in_channels=in_channels,
            out_channels=out_channels,
            base_channels=base_channels,
            levels=levels,
            constraint_dim=constraint_dim,
            groups=groups,
            embed_dim=embed_dim,
            use_checkpoint=use_checkpoint,
        )
        self.constraint_dim = constraint_dim
        self.constraint_mlp = embedding_mlp(constraint_dim, embed_dim)
        self.backbone = UNet3DBackbone(
            in_channels, out_channels, base_channels, levels, embed_dim, groups, use_checkpoint
        )

    @property
    def size_multiple(self) -> int:
        return self.backbone.size_multiple

    def forward(self, x: torch.Tensor, constraints: torch.Tensor | None = None) -> torch.Tensor:
        self.backbone.check_input(x)
        cond = self.constraint_mlp(_constraint_input(constraints, x.shape[0], self.constraint_dim, x))
        return self.backbone(x, cond)
