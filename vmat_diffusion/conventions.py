"""The one place for the package's data conventions: array axes and value scales.

Axis convention (every array of a case, every patch, every prediction)
-----------------------------------------------------------------------
Volumes are indexed ``[x, y, z]`` (channel-first tensors ``[c, x, y, z]``)::

    X (axis 0 of a volume): patient RIGHT  -> patient LEFT      (index grows toward the left)
    Y (axis 1 of a volume): ANTERIOR       -> POSTERIOR
    Z (axis 2 of a volume): SUPERIOR       -> INFERIOR          (head -> feet)

So a left-right flip is a flip of X, and nothing else. ``spacing_mm`` is given in the
same (X, Y, Z) order.

Value conventions
-----------------
* CT: Hounsfield units clipped to [CT_HU_MIN, CT_HU_MAX] and mapped linearly to [0, 1]
  (``normalize_ct``); air is 0 (``CT_AIR``).
* Structures: signed distance in mm, negative inside, clipped to +-SDF_CLIP_MM and divided
  by it, so values lie in [-1, 1] (``mask_to_sdf``). ``SDF_OUTSIDE`` (+1) is "far outside".
  A structure that was not contoured is filled with ``SDF_ABSENT`` (+2), a value no real
  distance can take, so a network can tell "absent" from "far away".
* Dose: Gy in case files. The baseline regresses dose / Rx; the diffusion model works on
  dose scaled to [-1, 1] with ``dose_to_unit`` (0 Gy -> -1, DOSE_UNIT_MAX_RX x Rx -> +1).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

AXIS_NAMES = ("X", "Y", "Z")
AXIS_DIRECTIONS = ("right->left", "anterior->posterior", "superior->inferior")
LR_AXIS = 0  # volume axis of patient right -> left; for channel-first tensors it is dim 1

CT_HU_MIN = -1000.0
CT_HU_MAX = 3000.0
CT_AIR = 0.0  # normalised value of air (and of padding outside the scan)

SDF_CLIP_MM = 50.0
SDF_OUTSIDE = 1.0
SDF_ABSENT = 2.0

DOSE_UNIT_MAX_RX = 1.2  # 1.2 x Rx maps to +1; hot spots up to 120 % of Rx stay inside [-1, 1]


def normalize_ct(hu: np.ndarray) -> np.ndarray:
    """Hounsfield units (any shape) -> float32 in [0, 1], air = 0."""
    hu = np.asarray(hu, dtype=np.float32)
    return ((np.clip(hu, CT_HU_MIN, CT_HU_MAX) - CT_HU_MIN) / (CT_HU_MAX - CT_HU_MIN)).astype(np.float32)


def mask_to_sdf(mask: np.ndarray, spacing_mm, clip_mm: float = SDF_CLIP_MM) -> np.ndarray:
    """Binary mask (X, Y, Z) -> scaled signed distance (X, Y, Z) float32 in [-1, 1].

    Distances are Euclidean in mm (anisotropic ``spacing_mm``), negative inside, measured to
    the nearest voxel of the other side; an empty mask gives ``SDF_ABSENT`` everywhere.
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return np.full(mask.shape, SDF_ABSENT, dtype=np.float32)
    sampling = tuple(float(s) for s in spacing_mm)
    outside = ndimage.distance_transform_edt(~mask, sampling=sampling)
    if mask.all():
        inside = np.full(mask.shape, clip_mm, dtype=np.float64)
    else:
        inside = ndimage.distance_transform_edt(mask, sampling=sampling)
    sdf = np.where(mask, -inside, outside)
    return (np.clip(sdf, -clip_mm, clip_mm) / clip_mm).astype(np.float32)


def holds_only_zeros_and_ones(values: np.ndarray) -> bool:
    """True when every value is exactly 0 or 1. With at least one 0 that is a 0/1 mask stored as
    numbers, never a scaled SDF (``mask_to_sdf`` gives voxels on either side non-zero distances);
    1 everywhere is ambiguous (SDF_OUTSIDE everywhere is a valid SDF)."""
    values = np.asarray(values)
    return bool(((values == 0) | (values == 1)).all())


# A float array with at least this fraction of exact zeros is a mask's background, not a distance:
# an SDF is 0 only where averaging cancels inside and outside (at most 0.07 % of the voxels of any
# channel of five real OpenKBP cases, at full and at half resolution).
MASK_ZERO_FRACTION = 0.25


def is_stored_mask(values: np.ndarray) -> bool:
    """True when float ``values`` are a mask stored as numbers, not a scaled SDF: only 0s and 1s
    with at least one 0, or at least MASK_ZERO_FRACTION exact zeros (a mask resampled linearly,
    by averaging, or with cubic splines, whose overshoot leaves small negative values). A mask
    covering more than 3/4 of the array once resampled is not told apart from an SDF."""
    values = np.asarray(values)
    if values.size == 0:
        return False
    zeros = np.count_nonzero(values == 0)
    return zeros >= MASK_ZERO_FRACTION * values.size or (zeros > 0 and holds_only_zeros_and_ones(values))


def sdf_to_mask(sdf) -> np.ndarray:
    """Scaled SDF (any shape, numpy or torch) -> boolean mask of the inside (sdf < 0)."""
    return sdf < 0


def dose_to_unit(dose_gy, rx_dose_gy: float):
    """Dose in Gy -> diffusion-model units in [-1, 1] (numpy or torch, same shape)."""
    return dose_gy / (0.5 * DOSE_UNIT_MAX_RX * rx_dose_gy) - 1.0


def unit_to_dose(x, rx_dose_gy: float):
    """Inverse of ``dose_to_unit``: diffusion-model units -> dose in Gy."""
    return (x + 1.0) * (0.5 * DOSE_UNIT_MAX_RX * rx_dose_gy)
