"""Training-only augmentation of patches: left-right flip and small translations.

Patches are dicts as made by ``PatchSampler.sample``: ``ct`` (1, X, Y, Z), ``masks_sdf`` (S, X, Y, Z),
``dose`` (1, X, Y, Z) tensors, plus any other entries: other (C, X, Y, Z) tensors of the same
spatial shape (e.g. a ``possible_dose_mask`` extra) are flipped and shifted like the dose, the
rest is copied through unchanged.

* Left-right flip: reverses X (``conventions.LR_AXIS``, tensor dim 1 of a (C, X, Y, Z) patch)
  and swaps the channels of every left/right structure pair (``Femur_L``/``Femur_R``,
  ``LeftParotid``/``RightParotid``, ...), so a right femur still sits in the right-femur channel.
  Anterior-posterior and superior-inferior flips and rotations are not done: they would make
  anatomy (and beam arrangements) that no patient has.
* Translation: one integer shift vector per patch, the same for CT, SDFs and dose; content moves
  by ``+shift`` voxels and the uncovered border repeats the nearest edge slice.

``center`` stays the sampling centre in the case. The result records what was done:
``flipped`` (bool, toggled by each flip) and ``shift`` (3 ints, voxels, the translation applied
by this call; zeros when none), so a caller can map the patch back to the case.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .conventions import LR_AXIS
from .structures import lr_channel_permutation

VOLUME_KEYS = ("ct", "masks_sdf", "dose")


def _check_patch(patch: Dict, structures: Sequence[str]) -> None:
    if not isinstance(patch, dict):
        raise TypeError(f"patch must be a dict with tensors {VOLUME_KEYS}, got {type(patch).__name__}")
    spatial = None
    for key in VOLUME_KEYS:
        tensor = patch.get(key)
        if not isinstance(tensor, torch.Tensor) or tensor.ndim != 4:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"patch['{key}'] must be a (C, X, Y, Z) tensor, got {shape}")
        if spatial is not None and tuple(tensor.shape[1:]) != spatial:
            raise ValueError(f"patch['{key}'] spatial shape {tuple(tensor.shape[1:])} differs from {spatial}")
        spatial = tuple(tensor.shape[1:])
    if len(structures) != patch["masks_sdf"].shape[0]:
        raise ValueError(f"structures names {len(structures)} channels but patch['masks_sdf'] has "
                         f"{patch['masks_sdf'].shape[0]}")


def _other_volume_keys(patch: Dict) -> Tuple[str, ...]:
    """Keys of the (C, X, Y, Z) tensors besides VOLUME_KEYS with the patch's spatial shape."""
    spatial = tuple(patch["dose"].shape[1:])
    return tuple(key for key, value in patch.items() if key not in VOLUME_KEYS and isinstance(value, torch.Tensor)
                 and value.ndim == 4 and tuple(value.shape[1:]) == spatial)


def flip_lr(patch: Dict, structures: Sequence[str]) -> Dict:
    """Mirror a patch left-right (X) and swap left/right structure channels; returns a new dict.

    structures: channel names of ``masks_sdf`` (S names). Toggles ``flipped``.
    """
    _check_patch(patch, structures)
    dim = LR_AXIS + 1   # channel-first (C, X, Y, Z)
    permutation = torch.as_tensor(lr_channel_permutation(structures), dtype=torch.long)
    out = dict(patch)
    out["ct"] = torch.flip(patch["ct"], dims=(dim,))
    out["dose"] = torch.flip(patch["dose"], dims=(dim,))
    out["masks_sdf"] = torch.flip(patch["masks_sdf"], dims=(dim,)).index_select(0, permutation)
    for key in _other_volume_keys(patch):
        out[key] = torch.flip(patch[key], dims=(dim,))
    out["flipped"] = not bool(patch.get("flipped", False))
    return out


def translate(patch: Dict, shift: Sequence[int]) -> Dict:
    """Shift CT, SDFs and dose by ``shift`` (3 ints, voxels along X, Y, Z) with edge replication.

    ``out[..., i, j, k] = in[..., clamp(i - sx), clamp(j - sy), clamp(k - sz)]``. Returns a new dict
    with ``shift`` set to the given vector.
    """
    shift = [int(s) for s in shift]
    if len(shift) != 3:
        raise ValueError(f"shift must be 3 integers (voxels along X, Y, Z), got {shift!r}")
    out = dict(patch)
    for key in VOLUME_KEYS + _other_volume_keys(patch):
        out[key] = _shift_replicate(patch[key], shift)
    out["shift"] = tuple(shift)
    return out


def _shift_replicate(tensor: torch.Tensor, shift: Sequence[int]) -> torch.Tensor:
    """(C, X, Y, Z) tensor moved by ``shift``: crop the part that stays, replicate-pad the rest."""
    if not any(shift):
        return tensor
    spatial = tensor.shape[1:]
    # A shift of n or more voxels gives the same result as n - 1 (every voxel is the edge value).
    shift = [max(-(n - 1), min(s, n - 1)) for s, n in zip(shift, spatial)]
    keep = tuple(slice(max(-s, 0), n - max(s, 0)) for s, n in zip(shift, spatial))
    padding = []
    for s in reversed(shift):   # F.pad lists the last dimension first: (before, after) per dim
        padding += [max(s, 0), max(-s, 0)]
    return F.pad(tensor[(slice(None), *keep)], padding, mode="replicate")


def augment(patch: Dict, structures: Sequence[str], rng, flip_p: float = 0.5, translate_p: float = 0.5,
            max_shift: int = 16) -> Dict:
    """Random left-right flip (probability ``flip_p``) then random translation (probability
    ``translate_p``, each axis uniform in [-max_shift, max_shift] voxels). Returns a new dict with
    ``flipped`` and ``shift`` entries; unchanged tensors may be shared with the input.

    rng: numpy Generator, or an int seed / None for a fresh one.
    """
    for name, p in (("flip_p", flip_p), ("translate_p", translate_p)):
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
    if not isinstance(max_shift, (int, np.integer)) or isinstance(max_shift, bool) or max_shift < 0:
        raise ValueError(f"max_shift must be a non-negative integer (voxels), got {max_shift!r}")
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    _check_patch(patch, structures)
    out = dict(patch)
    out.setdefault("flipped", False)
    out["shift"] = (0, 0, 0)
    if rng.random() < flip_p:
        out = flip_lr(out, structures)
    if rng.random() < translate_p:
        out = translate(out, rng.integers(-max_shift, max_shift + 1, size=3))
    return out
