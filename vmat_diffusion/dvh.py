"""Dose-volume histograms and DVH metrics of one structure.

Every function takes ``dose`` (X, Y, Z) in Gy and a structure ``mask`` of the same shape,
numpy arrays or torch tensors (tensors are read with ``.detach().cpu().numpy()``). A mask is
boolean, integer (non-zero = inside), a floating 0/1 mask (every value exactly 0 or 1, at
least one 0; inside = 1), or a scaled signed distance as stored in ``Case.masks_sdf`` (any
other floating array): then the inside is ``sdf < 0`` (``as_bool_mask``). ``spacing_mm`` is
the voxel size (X, Y, Z) in mm. A mask with no voxel inside raises ``ValueError`` ("empty
mask"); scores over many structures (``vmat_diffusion.metrics``) skip such structures.

Definitions follow the evaluation code of the OpenKBP challenge (``ababier/open-kbp``,
``provided_code/dose_evaluation_class.py``), so numbers are comparable with published results:

* ``Dx`` (e.g. D95) is the dose that at least x % of the structure receives:
  ``np.percentile(doses, 100 - x)`` with numpy's default linear interpolation over the
  structure's voxel doses (D99 = 1st percentile, D95 = 5th, D1 = 99th).
* ``D0.1cc`` is the dose that the hottest 0.1 cc receives: with
  ``n = max(1, round(100 mm^3 / voxel volume))`` voxels (``np.round``, halves to even, as
  OpenKBP), ``np.percentile(doses, 100 - n / N * 100)`` for a structure of N voxels. OpenKBP
  fails when N < n; here the percentile is then clipped to 0 (the structure's minimum dose).
* ``Dmean`` is the mean and ``Dmax`` the maximum voxel dose; ``Vx`` is the volume receiving
  at least x Gy (``dose >= x``), in % of the structure and in cc.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, Tuple

import numpy as np

from .conventions import holds_only_zeros_and_ones, is_stored_mask

MM3_PER_CC = 1000.0

# Name -> percentile of the voxel doses (Dx = the (100 - x)th percentile).
PERCENT_METRICS: Dict[str, float] = {"D99": 1.0, "D98": 2.0, "D95": 5.0, "D2": 98.0, "D1": 99.0}


def as_numpy(x, name: str = "array") -> np.ndarray:
    """numpy array or torch tensor (any device, with or without grad) -> numpy array."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        return x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    try:
        array = np.asarray(x)
    except (TypeError, ValueError):
        array = None
    if array is None or array.dtype.hasobject:
        hint = " (its .dose_gy is the dose array)" if hasattr(x, "dose_gy") else ""
        raise TypeError(f"{name}: expected a numpy array or torch tensor, got {type(x).__name__}{hint}")
    return array


def as_bool_mask(mask, name: str = "mask") -> np.ndarray:
    """Structure mask (any shape) -> boolean array of the inside, same shape.

    bool: as is. Integers: non-zero. Floats: a 0/1 mask (every value exactly 0 or 1, at least
    one 0) is inside where 1; any other float array is a scaled SDF, inside where < 0. ValueError
    naming ``name`` for a resampled 0/1 mask (many exact zeros among other values:
    ``conventions.is_stored_mask``; threshold it first) and for nothing but 1.0, which is
    ambiguous (a 0/1 mask of every voxel, or an SDF far outside its structure, e.g. a patch).
    """
    m = as_numpy(mask, name)
    if m.dtype == bool:
        return m
    if m.dtype.kind == "f":
        if is_stored_mask(m):
            if holds_only_zeros_and_ones(m):
                return m != 0
            raise ValueError(f"{name}: many exact zeros among other values, a resampled 0/1 mask rather than "
                             "an SDF; threshold it (e.g. mask >= 0.5) or pass a boolean mask")
        inside = m < 0
        if not inside.any() and m.size and holds_only_zeros_and_ones(m):  # only 1s (with a 0: a stored mask)
            raise ValueError(f"{name}: every value is 1.0, which is ambiguous (a 0/1 mask covering every "
                             "voxel, or a scaled SDF entirely outside its structure); pass a boolean mask "
                             "(mask != 0 for a 0/1 mask, sdf < 0 for an SDF)")
        return inside
    if m.dtype.kind in "iu":
        return m != 0
    raise TypeError(f"{name}: expected a boolean mask or a floating SDF, got dtype {m.dtype}")


def voxel_volume_mm3(spacing_mm) -> float:
    """Volume of one voxel in mm^3 from its size (X, Y, Z) in mm."""
    try:
        spacing = [float(s) for s in spacing_mm]
    except TypeError:
        raise ValueError(f"spacing_mm: expected 3 voxel sizes in mm, got {spacing_mm!r}") from None
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing_mm: expected 3 finite positive voxel sizes in mm, got {spacing_mm!r}")
    return float(np.prod(spacing))


def structure_doses(dose, mask) -> np.ndarray:
    """The voxel doses inside a structure: 1-D float64 array in Gy (C order of the volume).

    Raises ValueError when the shapes differ, the mask is empty, or a dose inside is NaN/Inf.
    """
    dose = as_numpy(dose, "dose")
    inside = as_bool_mask(mask)
    if dose.shape != inside.shape:
        raise ValueError(f"mask: shape {inside.shape} differs from dose shape {dose.shape}")
    if not inside.any():
        hint = (" (a floating mask that is not 0/1 is read as an SDF: inside = values < 0)"
                if as_numpy(mask).dtype.kind == "f" else "")
        raise ValueError(f"mask: empty mask, no voxel inside the structure{hint}")
    doses = dose[inside].astype(np.float64)
    if not np.isfinite(doses).all():
        raise ValueError("dose: NaN or Inf values inside the structure")
    return doses


def _percentiles(doses: np.ndarray, q) -> np.ndarray:
    return np.percentile(doses, q)  # numpy's default "linear" method, as OpenKBP


def _hottest_volume_percentile(n_voxels: int, volume_mm3: float, voxel_mm3: float) -> float:
    """Percentile of the voxel doses above which ``volume_mm3`` lies (OpenKBP's D0.1cc rule)."""
    voxels_in_volume = max(1.0, float(np.round(volume_mm3 / voxel_mm3)))
    return max(0.0, 100.0 - voxels_in_volume / n_voxels * 100.0)


def dose_at_percent(dose, mask, percent: float) -> float:
    """D_x%: the dose (Gy) that at least ``percent`` % of the structure receives."""
    percent = float(percent)
    if not 0.0 <= percent <= 100.0:
        raise ValueError(f"percent: expected a volume percentage in [0, 100], got {percent}")
    return float(_percentiles(structure_doses(dose, mask), 100.0 - percent))


def dose_at_cc(dose, mask, spacing_mm, cc: float) -> float:
    """D_x cc: the dose (Gy) that the hottest ``cc`` of the structure receives (OpenKBP's rule)."""
    if not float(cc) > 0:
        raise ValueError(f"cc: expected a positive volume in cc, got {cc}")
    doses = structure_doses(dose, mask)
    q = _hottest_volume_percentile(doses.size, float(cc) * MM3_PER_CC, voxel_volume_mm3(spacing_mm))
    return float(_percentiles(doses, q))


def _volume_receiving(doses: np.ndarray, dose_gy: float, voxel_cc: float) -> Tuple[float, float]:
    count = int(np.count_nonzero(doses >= dose_gy))
    return 100.0 * count / doses.size, count * voxel_cc


def volume_receiving(dose, mask, spacing_mm, dose_gy: float) -> Tuple[float, float]:
    """V_x: volume of the structure receiving at least ``dose_gy`` -> (percent of structure, cc)."""
    voxel_cc = voxel_volume_mm3(spacing_mm) / MM3_PER_CC
    return _volume_receiving(structure_doses(dose, mask), float(dose_gy), voxel_cc)


def v_key(dose_gy: float, unit: str) -> str:
    """Key of a V metric in ``dvh_metrics``: ``v_key(50, "percent") == "V50Gy_percent"``."""
    return f"V{float(dose_gy):g}Gy_{unit}"


def dvh_metrics(dose, mask, spacing_mm, v_doses_gy: Iterable[float] = ()) -> Dict[str, float]:
    """The usual DVH metrics of one structure, as floats.

    Keys: ``D99``, ``D98``, ``D95``, ``D2``, ``D1``, ``D0.1cc``, ``Dmean``, ``Dmax`` (Gy),
    ``volume_cc`` (the structure's volume), and for each x in ``v_doses_gy``
    ``V{x}Gy_percent`` and ``V{x}Gy_cc`` (x written with ``:g``, e.g. ``V50Gy_percent``,
    ``V50.4Gy_cc``). Definitions: see the module docstring.
    """
    doses = structure_doses(dose, mask)
    voxel_mm3 = voxel_volume_mm3(spacing_mm)
    voxel_cc = voxel_mm3 / MM3_PER_CC
    names = list(PERCENT_METRICS)
    values = _percentiles(doses, [PERCENT_METRICS[n] for n in names])
    metrics = {name: float(v) for name, v in zip(names, values)}
    q = _hottest_volume_percentile(doses.size, 0.1 * MM3_PER_CC, voxel_mm3)
    metrics["D0.1cc"] = float(_percentiles(doses, q))
    metrics["Dmean"] = float(doses.mean())
    metrics["Dmax"] = float(doses.max())
    metrics["volume_cc"] = doses.size * voxel_cc
    for x in v_doses_gy:
        percent, cc = _volume_receiving(doses, float(x), voxel_cc)
        metrics[v_key(x, "percent")] = percent
        metrics[v_key(x, "cc")] = cc
    return metrics


@dataclass(eq=False)  # array fields: element-wise == would be ambiguous
class DVH:
    """Cumulative DVH of one structure.

    dose_gy: (B,) dose axis in Gy, ``k * bin_width_gy`` for k = 0, 1, ...
    volume_percent: (B,) percent of the structure receiving at least ``dose_gy[k]``.
    volume_cc: (B,) the same volume in cc.
    total_cc: volume of the structure in cc.

    Unpacks as ``dose_gy, volume_percent = dvh(...)``.
    """
    dose_gy: np.ndarray
    volume_percent: np.ndarray
    volume_cc: np.ndarray
    total_cc: float

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter((self.dose_gy, self.volume_percent))


def dvh(dose, mask, spacing_mm, bin_width_gy: float = 0.1, max_dose_gy: float | None = None) -> DVH:
    """Cumulative DVH of one structure.

    The dose axis starts at 0 Gy and runs in steps of ``bin_width_gy`` up to the first step
    above ``max_dose_gy`` (default: the structure's maximum dose, so the curve ends at 0 %).
    Pass the same ``max_dose_gy`` to put several DVHs on one axis. Each point is exactly
    ``volume_receiving(dose, mask, spacing_mm, dose_gy[k])``. The curve starts at 100 %
    unless some voxel dose is negative (possible for a regression model's output).
    """
    bin_width_gy = float(bin_width_gy)
    if not (math.isfinite(bin_width_gy) and bin_width_gy > 0):
        raise ValueError(f"bin_width_gy: expected a positive bin width in Gy, got {bin_width_gy}")
    doses = structure_doses(dose, mask)
    voxel_cc = voxel_volume_mm3(spacing_mm) / MM3_PER_CC
    top = float(doses.max()) if max_dose_gy is None else float(max_dose_gy)
    if not math.isfinite(top):
        raise ValueError(f"max_dose_gy: expected a finite dose in Gy, got {max_dose_gy}")
    # The tolerance keeps e.g. 80 / 0.1 = 799.999... from dropping the bin at 80 Gy.
    n_bins = max(2, int(np.floor(top / bin_width_gy + 1e-9)) + 2)
    dose_axis = np.arange(n_bins, dtype=np.float64) * bin_width_gy
    below = np.searchsorted(np.sort(doses), dose_axis, side="left")  # voxels with dose < bin
    counts = doses.size - below
    return DVH(dose_gy=dose_axis, volume_percent=100.0 * counts / doses.size,
               volume_cc=counts * voxel_cc, total_cc=doses.size * voxel_cc)
