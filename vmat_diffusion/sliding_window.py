"""Whole-volume inference with a patch-sized network: overlapping windows, Gaussian blending.

Networks are trained on patches (e.g. 128^3) but patients are bigger, so a prediction is
assembled from overlapping windows. ``sliding_window_inference`` is the one windowing
implementation of the package: any "window in -> window out" function (a regression U-Net,
one DDIM noise prediction, a whole DDIM run) goes through it.

Window grid (per axis, see ``window_starts``): the first window starts at 0, the last ends
exactly at the border, the starts in between are evenly spaced and the overlap is at least the
requested one, so every voxel is covered. Each window's output is weighted by a centred
Gaussian (``gaussian_importance_map``; voxels near a window's edge, where the network saw the
least context, count least) and the weighted sum is divided by the summed weights.

The Gaussian is separable (a product of one 1-D profile per axis, each clamped at the floor)
and the windows form a Cartesian grid, so the summed weights are a product of three 1-D sums.
Each window's weights are therefore normalised before accumulation (per axis, in float64) and
the blended output is accumulated directly: no weight-sum volume, no division pass, and the
only full-volume buffer is the float32 output.

Volumes smaller than a window along an axis are padded per window with **replicate** padding
(the volume is centred in the window; the padded part of the output is cropped away).
Replicate, not constant 0, because a constant would be a real value for some channels (0 is
"air" for CT but "on the contour" for a scaled SDF), while replicating the edge voxels adds no
new structure; for a voxel-wise predictor the padding cannot change any result.

``predict_full_volume`` runs the diffusion model over a whole volume, in two modes:

* ``"synchronous"`` (default): one full-volume x_T; at every DDIM step the noise predictions
  of all windows are blended into one full-volume estimate and one DDIM step is taken on the
  whole volume, so neighbouring windows denoise the same x_t and agree.
* ``"per_window"``: every window is denoised on its own from its own noise (a full DDIM run)
  and only the final x0 windows are blended; windows may settle on different solutions, which
  shows as seams in the overlaps.

Both modes make the same number of model calls (windows x steps).
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .ddim import DDIMSampler

Size3 = Union[int, Sequence[int]]
PREDICT_MODES = ("synchronous", "per_window")


def window_starts(size: int, patch: int, overlap: int) -> List[int]:
    """Start indices of the windows along one axis (voxels).

    ``ceil((size - patch) / (patch - overlap)) + 1`` windows with starts spaced evenly from 0 to
    ``size - patch`` (like ``linspace``, rounded to the nearest integer), so the last window ends
    exactly at the border and neighbouring windows overlap by at least ``overlap`` voxels.
    An axis shorter than (or as long as) the patch gets one window, ``[0]``.
    """
    for name, value in (("size", size), ("patch", patch)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(overlap, numbers.Integral) or isinstance(overlap, bool) or not 0 <= overlap < patch:
        raise ValueError(f"overlap must be an int in [0, patch={patch}), got {overlap!r}")
    size, patch, overlap = int(size), int(patch), int(overlap)
    if size <= patch:
        return [0]
    span = size - patch
    n_windows = math.ceil(span / (patch - overlap)) + 1
    return [int(math.floor(i * span / (n_windows - 1) + 0.5)) for i in range(n_windows)]


def gaussian_importance_map(patch_size: Size3, sigma_scale: float = 0.125, floor: float = 1e-3,
                            device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
    """Blending weights of one window: float32 tensor of shape ``patch_size`` (px, py, pz).

    The product of one centred Gaussian profile per axis (sigma = ``sigma_scale`` x patch length
    along that axis), each normalised to a maximum of 1 and clamped from below at ``floor``, so
    the map peaks at 1 and is at least ``floor ** 3`` at the corners: a voxel covered only by
    windows' edges is never divided by ~0, whatever ``sigma_scale``.
    """
    profiles = _gaussian_profiles(_as_triple(patch_size, "patch_size"), sigma_scale, floor, device)
    px, py, pz = (profile.to(torch.float32) for profile in profiles)
    return px[:, None, None] * py[None, :, None] * pz[None, None, :]


def _gaussian_profiles(patch: Tuple[int, int, int], sigma_scale: float, floor: float,
                       device: Optional[Union[str, torch.device]]) -> List[torch.Tensor]:
    """The three float64 1-D factors of ``gaussian_importance_map``: peak 1, clamped at ``floor``."""
    if not sigma_scale > 0:
        raise ValueError(f"sigma_scale must be > 0, got {sigma_scale!r}")
    if not 0 < floor <= 1:
        raise ValueError(f"floor must be in (0, 1], got {floor!r}")
    profiles = []
    for length in patch:
        position = torch.arange(length, dtype=torch.float64, device=device) - (length - 1) / 2.0
        profile = torch.exp(-0.5 * (position / (sigma_scale * length)) ** 2)
        profiles.append((profile / profile.max()).clamp_(min=floor))
    return profiles


@torch.no_grad()
def sliding_window_inference(volume: torch.Tensor, predictor: Callable[..., torch.Tensor],
                             patch_size: Size3 = 128, overlap: Size3 = 32, batch_size: int = 1,
                             sigma_scale: float = 0.125, progress: bool = False,
                             accumulate_device: Optional[Union[str, torch.device]] = None,
                             volume_args: Sequence[torch.Tensor] = (),
                             floor: float = 1e-3) -> torch.Tensor:
    """Apply a window-sized ``predictor`` over a whole volume and blend the windows.

    Args:
        volume: (B, C, X, Y, Z) tensor, B >= 1. At most one batch of windows is copied out of it.
        predictor: maps a batch of windows (N, C, px, py, pz) (plus, per ``volume_args``, the
            rows of each window's volume) to (N, C_out, px, py, pz). It may run under autocast
            and return bf16/fp16: outputs are cast to float32 before accumulation. It must not
            write into its input: a single unpadded window is a view of ``volume`` (no copy), and
            an in-place write to it (``w.mul_``, ``ReLU(inplace=True)``, ...) raises ValueError
            (writes through ``w.data`` or ``w.numpy()`` cannot be seen; an inference-mode volume,
            which cannot tell at all, gets copies instead).
        patch_size: window size in voxels, int or (px, py, pz).
        overlap: minimum overlap of neighbouring windows in voxels, int or 3-tuple, < patch.
        batch_size: windows per predictor call; windows of different volumes share calls.
        sigma_scale: Gaussian sigma of the blending weights as a fraction of the patch length.
        progress: show a tqdm bar over predictor calls.
        accumulate_device: where the float32 accumulator lives (default: the volume's device;
            "cpu" saves GPU memory for large volumes).
        volume_args: tensors with first dimension B (e.g. constraints (B, K)); for each batch
            of windows the predictor is called as ``predictor(windows, *(a[idx] for a in
            volume_args))`` where ``idx`` (N,) are the windows' volume indices.
        floor: smallest value of each axis's Gaussian profile relative to its peak (the 3-D
            weights are at least floor ** 3 of the centre's).

    Returns:
        (B, C_out, X, Y, Z) float32 on the volume's device.
    """
    _check_volume(volume, "volume")
    patch = _as_triple(patch_size, "patch_size")
    overlaps = _as_triple(overlap, "overlap", minimum=0)
    for axis in range(3):
        if overlaps[axis] >= patch[axis]:
            raise ValueError(f"overlap must be smaller than patch_size on every axis, "
                             f"got overlap={overlaps} for patch_size={patch}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    n_volumes = volume.shape[0]
    for i, arg in enumerate(volume_args):
        if not torch.is_tensor(arg) or arg.ndim < 1 or arg.shape[0] != n_volumes:
            raise ValueError(f"volume_args[{i}] must be a tensor with first dimension "
                             f"B={n_volumes}, got {_describe(arg)}")

    spatial = tuple(volume.shape[2:])
    acc_device = torch.device(accumulate_device) if accumulate_device is not None else volume.device
    grid = _WindowGrid(spatial, patch, overlaps, sigma_scale, floor, acc_device)
    tasks = [(b, window) for window in grid.windows for b in range(n_volumes)]

    output_sum = None
    batches = [tasks[i:i + batch_size] for i in range(0, len(tasks), batch_size)]
    for batch in tqdm(batches, desc="windows", disable=not progress):
        version = None  # of the volume, when the predictor gets a view of it
        if len(batch) == 1:
            b, window = batch[0]
            inputs = window.extract(volume[b])[None]
            if not window.padded:  # a view of the volume: a copy cost 12 % of the bare passes (BENCHMARKS.md)
                if inputs.is_inference():  # no version counter to catch in-place writes: copy
                    inputs = inputs.clone()
                else:
                    version = inputs._version
        else:
            inputs = torch.stack([window.extract(volume[b]) for b, window in batch])
        rows = []
        if volume_args:
            index = torch.tensor([b for b, _ in batch], dtype=torch.long)
            rows = [arg[index.to(arg.device)] for arg in volume_args]
        outputs = predictor(inputs, *rows)
        if version is not None and inputs._version != version:
            raise ValueError("predictor: it modified its input window in place; with batch_size 1 that window is "
                             "a view of the volume, which is now changed too. Do not write into the input "
                             "(e.g. no in-place first op), or pass lambda w: predictor(w.clone())")
        _check_prediction(outputs, len(batch), patch)
        if output_sum is None:
            output_sum = torch.zeros((n_volumes, outputs.shape[1]) + spatial,
                                     dtype=torch.float32, device=acc_device)
        outputs = outputs.to(device=acc_device, dtype=torch.float32)
        for (b, window), output in zip(batch, outputs):
            output_sum[(b, slice(None)) + window.target].addcmul_(output[(slice(None),) + window.crop],
                                                                  grid.weights(window))
        del inputs, outputs, output  # not held while the next batch is predicted
    return output_sum.to(volume.device)


@torch.no_grad()
def predict_full_volume(model: Callable[..., torch.Tensor], condition: torch.Tensor,
                        constraints: torch.Tensor, schedule, patch_size: Size3 = 128,
                        overlap: Size3 = 32, ddim_steps: int = 50, mode: str = "synchronous",
                        eta: float = 0.0, batch_size: int = 1,
                        generator: Optional[torch.Generator] = None, progress: bool = False,
                        sigma_scale: float = 0.125,
                        accumulate_device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
    """Sample a whole-volume dose with a patch-trained diffusion model (DDIM).

    Args:
        model: noise predictor called as ``model(torch.cat([x_t, condition], 1), t, constraints)``
            with windows (N, 1 + C_cond, px, py, pz), t (N,) long, constraints (N, K); put it in
            eval mode (and under autocast if wanted) before calling.
        condition: (B, C_cond, X, Y, Z) conditioning channels (CT, SDFs) on the model's device.
        constraints: (B, K) conditioning vectors.
        schedule: the ``NoiseSchedule`` the model was trained with.
        patch_size, overlap, batch_size, sigma_scale, accumulate_device: as in
            ``sliding_window_inference``.
        ddim_steps, eta: DDIM steps and stochasticity in [0, 1] (0 = deterministic DDIM; checked
            by ``DDIMSampler``).
        mode: ``"synchronous"`` (one DDIM step on the whole volume per step, window noise
            predictions blended; neighbours agree) or ``"per_window"`` (independent DDIM runs
            per window, final x0 windows blended). See the module docstring.
        generator: torch.Generator for x_T (and eta > 0 noise) for reproducible samples. The
            same generator state gives the same sample whatever ``batch_size``, except in
            ``per_window`` mode with eta > 0, where each step's noise is drawn for a batch of
            windows at once (and windows are taken in ``_WindowGrid``'s order).
        progress: tqdm bar over DDIM steps (synchronous) or window batches (per_window).

    Axes shorter than the patch: the condition is replicate-padded (centred, as in
    ``sliding_window_inference``), x_t gets noise of its own there, and the result is cropped.

    Returns:
        x0 estimate (B, 1, X, Y, Z) float32 in model units [-1, 1] on the condition's device;
        convert with ``conventions.unit_to_dose``.
    """
    _check_volume(condition, "condition")
    n_volumes = condition.shape[0]
    if not torch.is_tensor(constraints) or constraints.ndim != 2 or constraints.shape[0] != n_volumes:
        raise ValueError(f"constraints must be a (B={n_volumes}, K) tensor, got {_describe(constraints)}")
    if mode not in PREDICT_MODES:
        raise ValueError(f"mode must be one of {PREDICT_MODES}, got {mode!r}")
    sampler = DDIMSampler(schedule, steps=ddim_steps, eta=eta)
    window_options = dict(patch_size=patch_size, overlap=overlap, batch_size=batch_size,
                          sigma_scale=sigma_scale, accumulate_device=accumulate_device)
    if mode == "per_window":
        return _predict_per_window(model, condition, constraints, sampler, generator, progress,
                                   window_options)
    return _predict_synchronous(model, condition, constraints, sampler, generator, progress,
                                window_options)


def _predict_per_window(model, condition, constraints, sampler, generator, progress, window_options):
    """Independent DDIM run per window (own x_T), final x0 windows blended."""
    def sample_windows(condition_windows, constraint_rows):
        return sampler.sample(model, condition_windows, constraint_rows, generator=generator)

    x0 = sliding_window_inference(condition, sample_windows, progress=progress,
                                  volume_args=(constraints,), **window_options)
    if sampler.clip_x0 is not None:  # a blend of clipped windows, up to float32 rounding of the weights
        x0.clamp_(*sampler.clip_x0)
    return x0


def _predict_synchronous(model, condition, constraints, sampler, generator, progress, window_options):
    """One full-volume DDIM trajectory; each step's eps is the Gaussian blend of the windows'."""
    patch = _as_triple(window_options["patch_size"], "patch_size")
    spatial = tuple(condition.shape[2:])
    padding = [_centred_padding(size, p) for size, p in zip(spatial, patch)]
    # Pad the whole problem (once) to at least one window, so that a short axis gets fresh
    # noise of its own instead of replicated noise; the condition is padded by replication.
    condition = _pad(condition.to(torch.float32), padding)
    x_t = _randn((condition.shape[0], 1) + tuple(condition.shape[2:]), generator, condition.device)
    # One buffer holds [x_t, condition]: windows are sliced from it, and each step only
    # rewrites the x_t channel instead of concatenating the whole condition again.
    model_input = torch.cat([x_t, condition], dim=1)
    del x_t, condition
    for t, t_prev in tqdm(sampler.pairs(), total=len(sampler), desc="DDIM steps", disable=not progress):
        def predict_eps(windows, constraint_rows, t=t):
            t_batch = torch.full((windows.shape[0],), t, dtype=torch.long, device=windows.device)
            return model(windows, t_batch, constraint_rows)

        eps = sliding_window_inference(model_input, predict_eps, volume_args=(constraints,),
                                       **window_options)
        model_input[:, :1] = sampler.step(eps, t, t_prev, model_input[:, :1], generator=generator)
    return _crop(model_input[:, :1], padding).to(torch.float32).contiguous()


class _Window:
    """One window: where it reads the volume, how it is padded, where its output goes."""

    def __init__(self, index: Tuple[int, int, int], placements):
        self.index = index  # position along each axis of the grid
        self.weights_key = index  # windows with the same key have the same weights (set by _WindowGrid)
        self.target = tuple(target for target, _, _ in placements)  # voxels it reads and writes
        self.crop = tuple(crop for _, crop, _ in placements)  # its output's part inside the volume
        self.padding = [pads for _, _, pads in placements]
        self.padded = any(lo or hi for lo, hi in self.padding)

    def extract(self, volume: torch.Tensor) -> torch.Tensor:
        """(C, X, Y, Z) volume -> (C, px, py, pz) window: a replicate-padded copy when ``padded``,
        else a view of ``volume``."""
        window = volume[(slice(None),) + self.target]
        if self.padded:
            return _pad(window[None], self.padding)[0]
        return window


class _WindowGrid:
    """The windows over a volume and their normalised blending weights.

    Along each axis, window i's 1-D Gaussian profile is divided (float64) by the sum of the
    profiles of all windows at that voxel, so a window's 3-D weights (the product of its three
    normalised profiles) sum to 1 over the windows covering any voxel.
    """

    def __init__(self, spatial, patch, overlaps, sigma_scale: float, floor: float, device: torch.device):
        placements = [_axis_placements(*axis) for axis in zip(spatial, patch, overlaps)]
        profiles = _gaussian_profiles(patch, sigma_scale, floor, device)
        self.normalised = []
        for size, axis_placements, profile in zip(spatial, placements, profiles):
            total = torch.zeros(size, dtype=torch.float64, device=device)
            for target, crop, _ in axis_placements:
                total[target] += profile[crop]
            self.normalised.append([profile[crop] / total[target] for target, crop, _ in axis_placements])
        # Windows with equal profiles on every axis (e.g. all interior windows of an evenly spaced
        # grid) have equal weights: they come one after another, and the weights are made once.
        profile_ids = [_equal_profile_ids(axis) for axis in self.normalised]
        windows = [_Window((i, j, k), (px, py, pz))
                   for i, px in enumerate(placements[0])
                   for j, py in enumerate(placements[1])
                   for k, pz in enumerate(placements[2])]
        for window in windows:
            window.weights_key = tuple(ids[position] for ids, position in zip(profile_ids, window.index))
        self.windows = sorted(windows, key=lambda window: window.weights_key)
        self._buffer = torch.empty([len(n[0]) for n in self.normalised], dtype=torch.float32, device=device)
        self._x_profiles = [profile.to(torch.float32) for profile in self.normalised[0]]
        self._yz_key, self._yz = None, None
        self._filled = None

    def weights(self, window: _Window) -> torch.Tensor:
        """The window's float32 weights over its target voxels (a buffer reused by the next call)."""
        if window.weights_key != self._filled:
            i, j, k = window.index
            if window.weights_key[1:] != self._yz_key:  # the y-z product in float64, rounded once
                self._yz_key = window.weights_key[1:]
                self._yz = (self.normalised[1][j][:, None] * self.normalised[2][k][None, :]).to(torch.float32)
            torch.mul(self._x_profiles[i][:, None, None], self._yz, out=self._buffer)
            self._filled = window.weights_key
        return self._buffer


def _equal_profile_ids(profiles: Sequence[torch.Tensor]) -> List[int]:
    """Per window along one axis, the index of the first window whose normalised profile equals its own."""
    ids = []
    for position, profile in enumerate(profiles):
        ids.append(next(first for first in range(position + 1)
                        if profiles[first].shape == profile.shape and torch.equal(profiles[first], profile)))
    return ids


def _axis_placements(size: int, patch: int, overlap: int) -> List[Tuple[slice, slice, Tuple[int, int]]]:
    """Per window along one axis: (its voxels in the volume, the matching part of the window,
    the (before, after) padding that makes it a whole window)."""
    before = _centred_padding(size, patch)[0]
    placements = []
    for start in window_starts(size, patch, overlap):
        lo, hi = max(0, start - before), min(size, start - before + patch)
        pad_lo = lo - (start - before)
        placements.append((slice(lo, hi), slice(pad_lo, pad_lo + hi - lo), (pad_lo, patch - pad_lo - (hi - lo))))
    return placements


def _centred_padding(size: int, patch: int) -> Tuple[int, int]:
    """(before, after) voxels that centre an axis shorter than the patch in it."""
    missing = max(0, patch - size)
    return missing // 2, missing - missing // 2


def _pad(volume: torch.Tensor, padding) -> torch.Tensor:
    """Replicate-pad a (B, C, X, Y, Z) tensor by ((x0, x1), (y0, y1), (z0, z1)) voxels."""
    if not any(lo or hi for lo, hi in padding):
        return volume
    flat = [amount for lo_hi in reversed(padding) for amount in lo_hi]  # F.pad wants last axis first
    return F.pad(volume, flat, mode="replicate")


def _crop(volume: torch.Tensor, padding) -> torch.Tensor:
    index = tuple(slice(lo, volume.shape[2 + axis] - hi) for axis, (lo, hi) in enumerate(padding))
    return volume[(slice(None), slice(None)) + index]


def _randn(shape, generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    """Standard normal float32 noise on ``device``, drawn on the generator's device."""
    draw_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=draw_device, dtype=torch.float32).to(device)


def _as_triple(value: Size3, name: str, minimum: int = 1) -> Tuple[int, int, int]:
    values = (value,) * 3 if isinstance(value, numbers.Integral) else tuple(value)
    if len(values) != 3 or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= minimum
                                   for v in values):
        raise ValueError(f"{name} must be an int >= {minimum} or a 3-tuple of them, got {value!r}")
    return tuple(int(v) for v in values)


def _check_volume(volume, name: str) -> None:
    if not torch.is_tensor(volume):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, C, X, Y, Z), got {type(volume).__name__}")
    if volume.ndim != 5:
        raise ValueError(f"{name} must have shape (B, C, X, Y, Z), got shape {tuple(volume.shape)}")
    if volume.shape[0] < 1:
        raise ValueError(f"{name} must hold at least one volume (B >= 1 in (B, C, X, Y, Z)), "
                         f"got shape {tuple(volume.shape)}")


def _check_prediction(outputs, n_windows: int, patch) -> None:
    if (not torch.is_tensor(outputs) or outputs.ndim != 5 or outputs.shape[0] != n_windows
            or tuple(outputs.shape[2:]) != tuple(patch)):
        raise ValueError(f"predictor must return (N={n_windows}, C_out, {patch[0]}, {patch[1]}, "
                         f"{patch[2]}), got {_describe(outputs)}")


def _describe(value) -> str:
    return f"shape {tuple(value.shape)}" if torch.is_tensor(value) else type(value).__name__
