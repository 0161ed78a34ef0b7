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
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

# PyTorch runs a float32 CPU convolution on oneDNN only when (batch x channels x X x Y) exceeds
# this (or the batch is > 1, ...); below it, it takes a slow im2col path that reaches 10-20% of
# oneDNN's FLOP/s. The deep levels of a U-Net on one patch fall below it (see ``conv3d``).
_ONEDNN_MIN_SIZE = 20480


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


def conv3d(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for x (B, C, X, Y, Z), computed the fastest way we know on CPU.

    * 1x1x1 kernel with stride 1, no padding and groups 1, channels-last x: one matmul over the
      channel axis.
    * a "same" convolution (stride 1, dilation 1, groups 1, zero padding p on every side and
      kernel_size[0] = 2p + 1) of a float32 CPU input with batch 1 and channels x X x Y <=
      ``_ONEDNN_MIN_SIZE`` (where PyTorch would pick its slow path): the volume is cut in two
      halves along X, each with p rows of halo (zeros at the volume border), and the halves go
      through the convolution as a batch of 2, which PyTorch hands to oneDNN.
    * anything else (other convolutions, GPU, bf16 autocast, batches > 1, large levels): ``conv(x)``.

    The results equal ``conv(x)`` up to float rounding; gradients flow as usual.
    """
    if (conv.kernel_size == (1, 1, 1) and conv.stride == (1, 1, 1) and conv.padding == (0, 0, 0)
            and conv.groups == 1 and x.is_contiguous(memory_format=torch.channels_last_3d)):
        # A 1x1x1 convolution of channels-last data is a matmul over the channel axis:
        # (B, X, Y, Z, C_in) @ (C_in, C_out). One GEMM; PyTorch's CPU conv would often take its
        # slow path here (it does for 1x1 kernels whenever it runs single-threaded).
        weight = conv.weight.reshape(conv.out_channels, conv.in_channels)
        return F.linear(x.permute(0, 2, 3, 4, 1), weight, conv.bias).permute(0, 4, 1, 2, 3)
    if not _use_halves(conv, x):
        return conv(x)
    return _HalvesConv3d.apply(x, conv.weight, conv.bias, conv.padding[0])


def _use_halves(conv: nn.Conv3d, x: torch.Tensor) -> bool:
    """True where ``conv3d`` may run ``conv`` on the two X-halves of x (see its docstring)."""
    padding = conv.padding  # a tuple of ints, or the string 'same' / 'valid'
    same = (isinstance(padding, tuple) and len(set(padding)) == 1 and conv.kernel_size[0] == 2 * padding[0] + 1
            and conv.stride == (1, 1, 1) and conv.dilation == (1, 1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros")
    if not same:
        return False
    batch, channels, size_x, size_y = x.shape[:4]
    return (x.device.type == "cpu" and x.dtype == torch.float32 and batch == 1
            and channels * size_x * size_y <= _ONEDNN_MIN_SIZE and size_x % 2 == 0
            and size_x // 2 >= padding[0] and not torch.is_autocast_enabled("cpu")
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


class _HalvesConv3d(torch.autograd.Function):
    """conv3d of a (1, C, X, Y, Z) input computed on its two X-halves as a batch of 2."""

    @staticmethod
    def forward(ctx, x, weight, bias, pad):
        halves = _split_halves(x, pad)
        y = F.conv3d(halves, weight, bias, padding=(0, pad, pad))
        ctx.save_for_backward(halves, weight)
        ctx.pad, ctx.has_bias = pad, bias is not None
        return _join_halves(y)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        halves, weight = ctx.saved_tensors
        pad = ctx.pad
        grad_halves = _split_halves(grad, 0)
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        grad_x, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad_halves, halves, weight, [weight.shape[0]] if ctx.has_bias else None, [1, 1, 1],
            [0, pad, pad], [1, 1, 1], False, [0, 0, 0], 1, mask)
        if grad_x is not None:
            grad_x = _merge_halves_grad(grad_x, pad)
        return grad_x, grad_weight, grad_bias, None


def _split_halves(x: torch.Tensor, pad: int) -> torch.Tensor:
    """(1, C, 2h, Y, Z) -> (2, C, h + 2*pad, Y, Z): rows [-pad, h + pad) and [h - pad, 2h + pad)."""
    channels, size_x, size_y, size_z = x.shape[1:]
    half = size_x // 2
    if pad == 0:  # a view when x is channels-last (B outermost, then X)
        return x[0].reshape(channels, 2, half, size_y, size_z).transpose(0, 1)
    halves = torch.empty((2, channels, half + 2 * pad, size_y, size_z), dtype=x.dtype, device=x.device,
                         memory_format=torch.channels_last_3d)
    halves[0, :, pad:] = x[0, :, :half + pad]
    halves[1, :, :half + pad] = x[0, :, half - pad:]
    halves[0, :, :pad] = 0
    halves[1, :, half + pad:] = 0
    return halves


def _join_halves(y: torch.Tensor) -> torch.Tensor:
    """(2, C, h, Y, Z) -> (1, C, 2h, Y, Z) (a view when y is channels-last)."""
    channels, half, size_y, size_z = y.shape[1:]
    joined = y.transpose(0, 1).reshape(channels, 2 * half, size_y, size_z)
    # The batch axis gets the stride of a whole volume, as in a tensor made channels-last:
    # ``joined[None]`` would give it stride C, and ops that infer the memory format from the
    # strides (GroupNorm) would then return channels-first tensors, and every later layer would
    # run in the slower layout (measured: the whole decoder did).
    return joined.as_strided((1,) + tuple(joined.shape), (joined.numel(),) + joined.stride())


def _merge_halves_grad(grad_halves: torch.Tensor, pad: int) -> torch.Tensor:
    """Gradient w.r.t. the (1, C, 2h, Y, Z) input from that w.r.t. its halves (halos added back)."""
    if pad == 0:
        return _join_halves(grad_halves)
    channels, size_y, size_z = grad_halves.shape[1], grad_halves.shape[3], grad_halves.shape[4]
    half = grad_halves.shape[2] - 2 * pad
    grad = torch.empty((1, channels, 2 * half, size_y, size_z), dtype=grad_halves.dtype,
                       device=grad_halves.device, memory_format=torch.channels_last_3d)
    grad[0, :, :half] = grad_halves[0, :, pad:pad + half]
    grad[0, :, half:] = grad_halves[1, :, pad:pad + half]
    grad[0, :, half:half + pad] += grad_halves[0, :, half + pad:]
    grad[0, :, half - pad:half] += grad_halves[1, :, :pad]
    return grad


def upsample2x(x: torch.Tensor) -> torch.Tensor:
    """Trilinear x2 upsampling of (B, C, X, Y, Z) (``align_corners=False``): (B, C, 2X, 2Y, 2Z).

    The forward pass is ``F.interpolate``. On the CPU the backward pass is ours: PyTorch's
    trilinear backward took 8 % of a base-16 training step (about 7x its forward pass), and
    its adjoint is separable, three cheap passes of strided adds (``_Upsample2xSeparable``).
    Ours also where deterministic algorithms are on (``torch.use_deterministic_algorithms``,
    the training ``--deterministic`` flag): PyTorch's CUDA trilinear backward adds with
    atomics, so its sums, and a resumed run's weights, change from run to run.
    """
    if x.device.type == "cpu" or torch.are_deterministic_algorithms_enabled():
        return _Upsample2xSeparable.apply(x)
    return F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)


class _Upsample2xSeparable(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        dtype = grad.dtype
        if dtype in (torch.bfloat16, torch.float16):  # sum in float32, as PyTorch's kernel does
            grad = grad.float()
        for axis in (2, 3, 4):
            grad = _linear_upsample_adjoint(grad, axis)
        return grad.to(dtype)


def _linear_upsample_adjoint(grad: torch.Tensor, axis: int) -> torch.Tensor:
    """Adjoint of linear x2 upsampling along ``axis`` (size 2n -> n).

    Upsampling makes output 2i = 0.75 x[i] + 0.25 x[i-1] and 2i+1 = 0.75 x[i] + 0.25 x[i+1],
    with x[-1] = x[0] and x[n] = x[n-1] (``align_corners=False`` clamps at the border), so
    dx[j] = 0.75 (even[j] + odd[j]) + 0.25 (even[j+1] + odd[j-1]), and the border terms that
    point outside go to x[0] and x[n-1].
    """
    pairs = grad.unflatten(axis, (-1, 2))
    even, odd = pairs.select(axis + 1, 0), pairs.select(axis + 1, 1)
    n = even.shape[axis]
    result = torch.add(even, odd).mul_(0.75)
    result.narrow(axis, 0, n - 1).add_(even.narrow(axis, 1, n - 1), alpha=0.25)
    result.narrow(axis, 1, n - 1).add_(odd.narrow(axis, 0, n - 1), alpha=0.25)
    result.narrow(axis, 0, 1).add_(even.narrow(axis, 0, 1), alpha=0.25)
    result.narrow(axis, n - 1, 1).add_(odd.narrow(axis, n - 1, 1), alpha=0.25)
    return result


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
        scale, shift = self.film(cond).chunk(2, dim=1)
        h = F.silu(group_norm_film(conv3d(self.conv1, x), self.norm1, scale, shift))
        h = F.silu(self.norm2(conv3d(self.conv2, h)))
        skip = x if isinstance(self.skip, nn.Identity) else conv3d(self.skip, x)
        # In place: SiLU's backward needs its input, not its output, so h may be overwritten.
        return h.add_(skip)


def group_norm_film(h: torch.Tensor, norm: nn.GroupNorm, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``norm(h) * (1 + scale) + shift`` for h (B, C, ...) and per-sample scale, shift (B, C).

    The GroupNorm's own affine (gamma, beta) and FiLM are one per-sample affine map,
    gamma * (1 + scale) and beta * (1 + scale) + shift, so they are applied together:
    inside the GroupNorm kernel for a batch of 1, as one ``addcmul`` otherwise. This saves one
    or two passes over h (forward and backward) compared with normalise, multiply, add.
    """
    gain = norm.weight * (1 + scale)
    bias = norm.bias * (1 + scale) + shift
    if h.shape[0] == 1:
        return F.group_norm(h, norm.num_groups, gain[0], bias[0], norm.eps)
    h = F.group_norm(h, norm.num_groups, None, None, norm.eps)
    return torch.addcmul(bias[:, :, None, None, None], h, gain[:, :, None, None, None])


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
        if x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu"):
            # float32 oneDNN 3-D convolutions are fastest on channels-last (B, X, Y, Z, C) memory
            # and every op below keeps that layout (measured: 10-30% faster training steps).
            # Not under bf16 autocast, where the channels-first layout measured ~8% faster.
            x = x.contiguous(memory_format=torch.channels_last_3d)
        skips = []
        h = x
        for i, block in enumerate(self.encoder):
            if i > 0:
                h = F.max_pool3d(h, 2)
            h = self._block(block, h, cond)
            skips.append(h)
        h = self._block(self.bottleneck, h, cond)
        for block, skip in zip(self.decoder, reversed(skips[:-1])):
            h = upsample2x(h)
            h = self._block(block, torch.cat([h, skip.to(h.dtype)], dim=1), cond)
        return conv3d(self.output, h).contiguous()


def _constraint_input(constraints: torch.Tensor | None, batch: int, constraint_dim: int, like: torch.Tensor,
                      dtype: torch.dtype):
    """Constraints (B, K) as ``dtype`` (that of the constraint MLP's weights), or zeros when None;
    ValueError on a wrong shape."""
    if constraints is None:
        return torch.zeros(batch, constraint_dim, device=like.device, dtype=dtype)
    if constraints.dim() != 2 or constraints.shape != (batch, constraint_dim):
        raise ValueError(
            f"constraints must be (B={batch}, constraint_dim={constraint_dim}) or None, got {tuple(constraints.shape)}"
        )
    return constraints.to(dtype)


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
        time_embedding = self.time_mlp(sinusoidal_embedding(t, self.time_dim).to(self.time_mlp[0].weight.dtype))
        constraint_embedding = self.constraint_mlp(
            _constraint_input(constraints, batch, self.constraint_dim, x, self.constraint_mlp[0].weight.dtype))
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
        cond = self.constraint_mlp(
            _constraint_input(constraints, x.shape[0], self.constraint_dim, x, self.constraint_mlp[0].weight.dtype))
        return self.backbone(x, cond)
