"""Synthetic prostate cases: the built-in demo data.

``make_phantom`` draws a plausible pelvis (axes as in ``vmat_diffusion.conventions``: X right->left,
Y anterior->posterior, Z superior->inferior) with the eight structures of ``PROSTATE_STRUCTURES``
at random positions and sizes, a CT in Hounsfield units, and a dose from a simple arc model that
depends only on the anatomy, so a network can learn it.

Anatomy is drawn in mm about the centre of the volume and sized for a field of view of at least
``REFERENCE_FOV_MM`` (384 x 384 x 256 mm, the default 96 x 96 x 64 voxels of 4 mm); a smaller field
shrinks the anatomy uniformly so it still fits. Margins and the dose model stay in physical mm.

Dose model (``arc_dose``, ``plan_dose``): one 360-degree coplanar arc per prescription level,
``ArcModel.n_angles`` parallel beams around Z through the isocentre (the PTV70 centroid). Each beam's
aperture is, per Z row (an MLC leaf pair), the interval covering the target's projection plus a
margin; the fluence is blurred by a Gaussian penumbra, attenuated as ``exp(-mu * depth)`` below a
build-up region (depth measured to the elliptical body outline), and a broad Gaussian adds scatter.
The arc conformed to PTV56 and the boost arc conformed to PTV70 are weighted (non-negative least
squares) so PTV56-only gets 56 Gy and PTV70 70 Gy on average; the sum is then scaled so the PTV70
mean is exactly 70 Gy. Dose outside the body is 0. Means, not coverage: without modulation the
superior end of PTV56, away from the boost, gets about half (figures in README, Built-in phantoms).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
from scipy import ndimage, optimize, sparse
from tqdm.auto import tqdm

from .case import Case, save_case
from .constraints import PROSTATE, constraint_vector
from .conventions import SDF_CLIP_MM, SDF_OUTSIDE, mask_to_sdf, normalize_ct
from .fileio import non_folder_on_path
from .structures import PROSTATE_STRUCTURES

PHANTOM_VERSION = 1
RX_DOSE_GY = 70.0
ELECTIVE_DOSE_GY = 56.0
PTV70_MARGIN_MM = 7.0    # prostate -> PTV70
PTV56_MARGIN_MM = 10.0   # prostate + seminal vesicles -> PTV56
REFERENCE_FOV_MM = (384.0, 384.0, 256.0)
MIN_SHAPE = 16

# Hounsfield units of the tissues (before noise).
HU_AIR = -1000.0
HU_FAT = -90.0
HU_MUSCLE = 45.0
HU_BOWEL = 20.0
HU_URINE = 8.0
HU_PROSTATE = 40.0
HU_GAS = -850.0
HU_MARROW = 250.0
HU_CORTEX = 1100.0
HU_PELVIC_BONE = 550.0
HU_NOISE_SD = 15.0


@dataclass(frozen=True)
class ArcModel:
    """Parameters of the simple arc dose model (lengths in mm)."""
    n_angles: int = 36                  # beams per 360-degree arc
    mu_per_mm: float = 0.0045           # effective attenuation of a 6 MV beam in water
    buildup_mm: float = 8.0             # e-folding depth of the build-up region
    surface_fraction: float = 0.45      # relative dose at the skin
    penumbra_sigma_mm: float = 3.5
    aperture_margin_mm: float = 5.0     # leaves open this far beyond the target projection
    scatter_sigma_mm: float = 20.0
    scatter_fraction: float = 0.1
    fluence_bin_mm: float = 2.0


@dataclass(frozen=True)
class BodyEllipse:
    """Elliptical-cylinder body outline (constant along Z); mm from the volume centre, (X, Y)."""
    centre_mm: Tuple[float, float]
    semi_axes_mm: Tuple[float, float]


@dataclass(frozen=True)
class _Grid:
    """Voxel-centre coordinates in mm from the volume centre, shaped to broadcast over (X, Y, Z)."""
    shape: Tuple[int, int, int]
    spacing_mm: Tuple[float, float, float]

    def axis(self, i: int) -> np.ndarray:
        n, s = self.shape[i], self.spacing_mm[i]
        return ((np.arange(n) - (n - 1) / 2.0) * s).astype(np.float32)

    def box(self, lo_mm, hi_mm) -> Tuple[slice, slice, slice]:
        """Index slices of the voxels whose centres may lie in [lo_mm, hi_mm] (clipped to the volume)."""
        slices = []
        for i in range(3):
            n, s = self.shape[i], self.spacing_mm[i]
            first = max(int(math.floor(lo_mm[i] / s + (n - 1) / 2.0)), 0)
            last = min(int(math.ceil(hi_mm[i] / s + (n - 1) / 2.0)), n - 1)
            slices.append(slice(first, max(last + 1, first)))
        return tuple(slices)

    def nearest_voxel(self, point_mm) -> Tuple[int, int, int] | None:
        """Index of the voxel whose centre is nearest ``point_mm``; None when it lies outside the volume."""
        idx = [int(round(point_mm[i] / self.spacing_mm[i] + (self.shape[i] - 1) / 2.0)) for i in range(3)]
        return tuple(idx) if all(0 <= i < n for i, n in zip(idx, self.shape)) else None

    def coords(self, box) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        x, y, z = (self.axis(i)[box[i]] for i in range(3))
        return x[:, None, None], y[None, :, None], z[None, None, :]


# ----------------------------------------------------------------------------- input checks

def _check_shape(shape) -> Tuple[int, int, int]:
    try:
        values = tuple(shape)
    except TypeError:
        raise TypeError(f"shape must be 3 integers (X, Y, Z), got {shape!r}") from None
    if len(values) != 3 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                                   for v in values):
        raise ValueError(f"shape must be 3 integers (X, Y, Z), got {shape!r}")
    if min(values) < MIN_SHAPE:
        raise ValueError(f"shape must be at least {MIN_SHAPE} voxels per axis, got {tuple(values)}")
    return tuple(int(v) for v in values)


def _check_spacing(spacing_mm, name: str = "spacing_mm") -> Tuple[float, float, float]:
    """3 finite positive voxel sizes (mm), or ValueError naming ``name`` (the argument or flag)."""
    try:
        values = tuple(float(s) for s in spacing_mm)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be 3 finite positive numbers (mm), got {spacing_mm!r}") from None
    if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"{name} must be 3 finite positive numbers (mm), got {spacing_mm!r}")
    return values


def _check_seed(seed) -> int:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


# ----------------------------------------------------------------------------- shapes

def _ellipsoid(grid: _Grid, centre, radii) -> np.ndarray:
    centre, radii = np.asarray(centre, float), np.asarray(radii, float)
    mask = np.zeros(grid.shape, dtype=bool)
    box = grid.box(centre - radii, centre + radii)
    x, y, z = grid.coords(box)
    mask[box] = (((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2
                 + ((z - centre[2]) / radii[2]) ** 2) <= 1.0
    return _at_least_one_voxel(grid, mask, centre)


def _at_least_one_voxel(grid: _Grid, mask: np.ndarray, point_mm) -> np.ndarray:
    """A shape smaller than a voxel still marks the voxel nearest its centre (small volumes)."""
    if not mask.any():
        nearest = grid.nearest_voxel(point_mm)
        if nearest is not None:
            mask[nearest] = True
    return mask


def _capsule(grid: _Grid, start, end, radius: float) -> np.ndarray:
    """Voxels within ``radius`` mm of the segment start-end (a rounded tube)."""
    start, end = np.asarray(start, float), np.asarray(end, float)
    mask = np.zeros(grid.shape, dtype=bool)
    box = grid.box(np.minimum(start, end) - radius, np.maximum(start, end) + radius)
    x, y, z = grid.coords(box)
    v = end - start
    rel = (x - start[0], y - start[1], z - start[2])
    t = np.clip((rel[0] * v[0] + rel[1] * v[1] + rel[2] * v[2]) / max(float(v @ v), 1e-9), 0.0, 1.0)
    dist2 = (rel[0] - t * v[0]) ** 2 + (rel[1] - t * v[1]) ** 2 + (rel[2] - t * v[2]) ** 2
    mask[box] = dist2 <= radius ** 2
    return _at_least_one_voxel(grid, mask, start)


def _tube(grid: _Grid, points, radii) -> np.ndarray:
    """Union of capsules along a polyline; segment i has radius radii[i]."""
    mask = np.zeros(grid.shape, dtype=bool)
    for a, b, r in zip(points[:-1], points[1:], radii):
        mask |= _capsule(grid, a, b, r)
    return mask


def _body_mask(grid: _Grid, body: BodyEllipse, inset_mm: float = 0.0) -> np.ndarray:
    x, y = grid.axis(0)[:, None], grid.axis(1)[None, :]
    ax, ay = body.semi_axes_mm[0] - inset_mm, body.semi_axes_mm[1] - inset_mm
    inside = ((x - body.centre_mm[0]) / ax) ** 2 + ((y - body.centre_mm[1]) / ay) ** 2 <= 1.0
    return np.broadcast_to(inside[:, :, None], grid.shape).copy()


def _crop_box(mask: np.ndarray, pad_voxels: Sequence[int]) -> Tuple[slice, ...]:
    """Bounding box of a non-empty mask grown by ``pad_voxels`` per axis (clipped to the volume)."""
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append(slice(max(hits[0] - pad_voxels[axis], 0), min(hits[-1] + 1 + pad_voxels[axis], mask.shape[axis])))
    return tuple(box)


def _dilate_mm(mask: np.ndarray, margin_mm: float, spacing_mm) -> np.ndarray:
    """Voxels within ``margin_mm`` (Euclidean, anisotropic spacing) of a voxel of ``mask``."""
    out = np.zeros_like(mask)
    if not mask.any():
        return out
    box = _crop_box(mask, [int(math.ceil(margin_mm / s)) + 1 for s in spacing_mm])
    out[box] = ndimage.distance_transform_edt(~mask[box], sampling=spacing_mm) <= margin_mm
    return out


def structure_sdf(mask: np.ndarray, spacing_mm) -> np.ndarray:
    """``conventions.mask_to_sdf`` computed on the mask's bounding box grown by the clip distance.

    Equal to ``mask_to_sdf(mask, spacing_mm)`` (every distance that is not clipped is found inside
    the box) but much faster for small structures in a large volume.
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask_to_sdf(mask, spacing_mm)
    box = _crop_box(mask, [int(math.ceil(SDF_CLIP_MM / s)) + 1 for s in spacing_mm])
    sdf = np.full(mask.shape, SDF_OUTSIDE, dtype=np.float32)
    sdf[box] = mask_to_sdf(mask[box], spacing_mm)
    return sdf


# ----------------------------------------------------------------------------- anatomy

def _draw_anatomy(grid: _Grid, rng: np.random.Generator):
    """Random pelvis: (body ellipse, structure masks by name, tissue masks for the CT only)."""
    fov = np.asarray(grid.shape) * np.asarray(grid.spacing_mm)
    k = min(1.0, float(np.min(fov / np.asarray(REFERENCE_FOV_MM))))   # shrink anatomy to fit

    def jitter(mean, sd):
        return k * (mean + sd * rng.standard_normal())

    body = BodyEllipse(centre_mm=(jitter(0, 3), jitter(0, 3)),
                       semi_axes_mm=(k * rng.uniform(150, 180), k * rng.uniform(100, 120)))
    cx, cy = body.centre_mm
    ax, ay = body.semi_axes_mm

    prostate_c = np.array([cx + jitter(0, 4), cy + jitter(10, 5), jitter(25, 8)])
    prostate_r = np.array([jitter(21, 3), jitter(17, 2), jitter(18, 3)])
    prostate = _ellipsoid(grid, prostate_c, prostate_r)

    sv_y = prostate_c[1] + 0.5 * prostate_r[1]
    sv_z = prostate_c[2] - prostate_r[2] - k * rng.uniform(2, 8)
    sv_r = np.array([jitter(13, 2), jitter(6, 1), jitter(9, 2)])
    sv_dx = prostate_r[0] * rng.uniform(0.6, 0.8)
    vesicles = (_ellipsoid(grid, (prostate_c[0] - sv_dx, sv_y, sv_z), sv_r)
                | _ellipsoid(grid, (prostate_c[0] + sv_dx, sv_y, sv_z), sv_r))

    # Rectum: a tube behind the prostate, from the anal canal (inferior) curving posteriorly upward.
    rect_r = np.array([jitter(11, 1.5), jitter(15, 2.5), jitter(17, 3)])
    rect_y0 = prostate_c[1] + prostate_r[1] + rect_r[1] + k * rng.uniform(0, 4)
    rect_x = prostate_c[0] + k * rng.uniform(-5, 5, size=4)
    rect_zs = prostate_c[2] + k * np.array([45.0, 5.0, -35.0, -75.0])
    rect_ys = rect_y0 + k * np.array([-6.0, 0.0, rng.uniform(4, 12), rng.uniform(14, 26)])
    rectum_axis = np.stack([rect_x, rect_ys, rect_zs], axis=1)
    rectum = _tube(grid, rectum_axis, rect_r)
    gas = np.zeros(grid.shape, dtype=bool)
    if rng.random() < 0.5:   # a gas pocket in the ampulla
        gas = _ellipsoid(grid, rectum_axis[1] + k * rng.uniform(-3, 3, 3), 0.55 * np.full(3, rect_r[1])) & rectum

    bladder_r = np.array([jitter(40, 6), jitter(30, 5), jitter(32, 5)])
    bladder_c = np.array([prostate_c[0] + jitter(0, 4), prostate_c[1] - k * rng.uniform(12, 24),
                          prostate_c[2] - prostate_r[2] - 0.6 * bladder_r[2]])
    bladder = _ellipsoid(grid, bladder_c, bladder_r)

    femurs, marrow = {}, np.zeros(grid.shape, dtype=bool)
    head_r = jitter(24, 2)
    head_dx = ax * rng.uniform(0.5, 0.56)
    head_y = prostate_c[1] + jitter(-5, 4)
    head_z = prostate_c[2] + jitter(-8, 5)
    bottom = fov[2] / 2.0 + 10.0
    for name, side in (("Femur_L", +1.0), ("Femur_R", -1.0)):   # patient left = larger X
        head = np.array([cx + side * head_dx, head_y, head_z])
        trochanter = head + k * np.array([side * 35.0, 5.0, 28.0])
        shaft_end = np.array([trochanter[0] - side * k * 8.0, trochanter[1], bottom])
        femurs[name] = (_ellipsoid(grid, head, np.full(3, head_r))
                        | _tube(grid, [head, trochanter, shaft_end], [0.6 * head_r, 0.65 * head_r]))
        marrow |= (_ellipsoid(grid, head, np.full(3, head_r - 4 * k))
                   | _tube(grid, [head, trochanter, shaft_end], [0.6 * head_r - 4 * k, 0.65 * head_r - 4 * k]))

    # Bowel: loops of small tube above the bladder, in the anterior half, kept clear of the bladder.
    bowel = np.zeros(grid.shape, dtype=bool)
    z_top = -fov[2] / 2.0 + 15.0 * k
    z_low = max(bladder_c[2] - bladder_r[2] + 5.0 * k, z_top + 10.0 * k)
    for _ in range(int(rng.integers(7, 12))):
        start = np.array([cx + k * rng.uniform(-70, 70), cy + k * rng.uniform(-65, 5), rng.uniform(z_top, z_low)])
        direction = rng.standard_normal(3)
        end = start + k * rng.uniform(25, 55) * direction / np.linalg.norm(direction)
        bowel |= _capsule(grid, start, end, k * rng.uniform(10, 15))
    bowel &= ~_ellipsoid(grid, bladder_c, bladder_r + 6.0 * k)

    inner = _body_mask(grid, body, inset_mm=k * rng.uniform(15, 28))   # inside the subcutaneous fat
    body_mask = _body_mask(grid, body)
    bowel &= inner
    pelvic_bone = (_ellipsoid(grid, (prostate_c[0], prostate_c[1] - prostate_r[1] - 40 * k, prostate_c[2] + 5 * k),
                              k * np.array([28.0, 9.0, 20.0]))
                   | _ellipsoid(grid, (cx, min(rectum_axis[3, 1] + rect_r[2] + 16 * k, cy + ay - 40 * k),
                                       prostate_c[2] - 95 * k), k * np.array([42.0, 14.0, 38.0])))

    structures = {
        "Prostate": prostate, "Rectum": rectum, "Bladder": bladder,
        "Femur_L": femurs["Femur_L"], "Femur_R": femurs["Femur_R"], "Bowel": bowel,
    }
    structures = {name: m & body_mask for name, m in structures.items()}
    tissues = {"body": body_mask, "inner": inner, "vesicles": vesicles & body_mask, "gas": gas,
               "marrow": marrow & body_mask, "pelvic_bone": pelvic_bone & inner}
    return body, structures, tissues


def _targets(structures: Dict[str, np.ndarray], vesicles: np.ndarray, body: np.ndarray, spacing_mm):
    """PTV70 = prostate + 7 mm; PTV56 = (prostate + seminal vesicles) + 10 mm, always containing PTV70."""
    ptv70 = _dilate_mm(structures["Prostate"], PTV70_MARGIN_MM, spacing_mm) & body
    ptv56 = (_dilate_mm(structures["Prostate"] | vesicles, PTV56_MARGIN_MM, spacing_mm) & body) | ptv70
    return ptv70, ptv56


def _ct_hu(grid: _Grid, structures, tissues, rng: np.random.Generator) -> np.ndarray:
    """CT in HU: painted tissue by tissue (later ones win), plus Gaussian noise inside the body."""
    hu = np.full(grid.shape, HU_AIR, dtype=np.float32)
    paint = [
        (tissues["body"], HU_FAT), (tissues["inner"], HU_MUSCLE), (structures["Bowel"], HU_BOWEL),
        (structures["Bladder"], HU_URINE), (structures["Prostate"], HU_PROSTATE),
        (tissues["vesicles"], HU_PROSTATE), (structures["Rectum"], HU_MUSCLE), (tissues["gas"], HU_GAS),
        (tissues["pelvic_bone"], HU_PELVIC_BONE), (structures["Femur_L"] | structures["Femur_R"], HU_CORTEX),
        (tissues["marrow"], HU_MARROW),
    ]
    for mask, value in paint:
        hu[mask] = value
    noise = rng.standard_normal(grid.shape, dtype=np.float32) * np.float32(HU_NOISE_SD)
    hu += np.where(tissues["body"], noise, np.float32(0.2) * noise)
    return hu


# ----------------------------------------------------------------------------- dose

def _depth_in_body(px, py, towards_source, body: BodyEllipse) -> np.ndarray:
    """Distance (mm) from points (px, py) back to the body surface along ``towards_source``.

    px, py: (N,) mm; towards_source: (A, 2) unit vectors. Returns (A, N); NaN for points outside.
    Solves |q + t s|_ellipse = 1 for the positive root t.
    """
    (cx, cy), (ax, ay) = body.centre_mm, body.semi_axes_mm
    qx, qy = (px - cx)[None, :] / ax, (py - cy)[None, :] / ay
    sx, sy = towards_source[:, :1] / ax, towards_source[:, 1:] / ay
    a = sx ** 2 + sy ** 2
    b = 2.0 * (qx * sx + qy * sy)
    c = qx ** 2 + qy ** 2 - 1.0
    with np.errstate(invalid="ignore"):
        depth = (-b + np.sqrt(b ** 2 - 4.0 * a * c)) / (2.0 * a)
    return np.where(c <= 0.0, depth, np.nan)


def _depth_dose(depth: np.ndarray, model: ArcModel) -> np.ndarray:
    """Relative dose at a depth (mm): build-up then exponential attenuation; 0 where depth is NaN."""
    d = np.nan_to_num(depth, nan=0.0)
    curve = (1.0 - (1.0 - model.surface_fraction) * np.exp(-d / model.buildup_mm)) * np.exp(-model.mu_per_mm * d)
    return np.where(np.isnan(depth), 0.0, curve)


def _beam_directions(n_angles: int):
    """Gantry angles (rad), the unit vector from each voxel toward the source, and the BEV lateral axis.

    Gantry 0 has the source anterior (toward -Y) and the beam travelling to +Y.
    """
    angles = np.arange(n_angles) * (2.0 * np.pi / n_angles)
    towards_source = np.stack([np.sin(angles), -np.cos(angles)], axis=1)
    lateral = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return angles, towards_source, lateral


def _fluence(target: np.ndarray, grid: _Grid, isocentre, lateral, u_grid, model: ArcModel) -> np.ndarray:
    """Fluence (A, U, Z) of beams conformed to ``target``: per beam and Z row, the open interval
    covers the projection of the target on the lateral axis u plus the margin, then penumbra blur."""
    n_angles, nz = lateral.shape[0], grid.shape[2]
    ix, iy, iz = np.nonzero(target)
    order = np.argsort(iz, kind="stable")
    x = grid.axis(0)[ix[order]] - isocentre[0]
    y = grid.axis(1)[iy[order]] - isocentre[1]
    u = lateral[:, :1] * x[None, :] + lateral[:, 1:] * y[None, :]           # (A, N)
    rows, starts = np.unique(iz[order], return_index=True)
    lo = np.full((n_angles, nz), np.inf)
    hi = np.full((n_angles, nz), -np.inf)
    lo[:, rows] = np.minimum.reduceat(u, starts, axis=1)
    hi[:, rows] = np.maximum.reduceat(u, starts, axis=1)
    z_rows = int(round(model.aperture_margin_mm / grid.spacing_mm[2]))
    if z_rows > 0:   # open the neighbouring leaf rows too (margin along Z)
        lo = ndimage.minimum_filter1d(lo, 2 * z_rows + 1, axis=1, mode="constant", cval=np.inf)
        hi = ndimage.maximum_filter1d(hi, 2 * z_rows + 1, axis=1, mode="constant", cval=-np.inf)
    half_voxel = 0.5 * (np.abs(lateral[:, 0]) * grid.spacing_mm[0] + np.abs(lateral[:, 1]) * grid.spacing_mm[1])
    pad = (half_voxel + model.aperture_margin_mm)[:, None, None]
    opening = (u_grid[None, :, None] >= lo[:, None, :] - pad) & (u_grid[None, :, None] <= hi[:, None, :] + pad)
    fluence = ndimage.gaussian_filter1d(opening.astype(np.float32), model.penumbra_sigma_mm / model.fluence_bin_mm,
                                        axis=1)
    return ndimage.gaussian_filter1d(fluence, model.penumbra_sigma_mm / grid.spacing_mm[2], axis=2)


def _projection_matrix(grid: _Grid, body: BodyEllipse, isocentre, towards_source, lateral, u0: float,
                       n_u: int, model: ArcModel) -> sparse.csr_matrix:
    """Sparse (X*Y, A*U) matrix: row (x, y) holds, for every beam, the depth-dose weight split
    linearly between the two fluence bins around the voxel column's lateral coordinate u."""
    px = np.repeat(grid.axis(0).astype(np.float64), grid.shape[1])
    py = np.tile(grid.axis(1).astype(np.float64), grid.shape[0])
    n_angles, n_pix = lateral.shape[0], px.size
    weight = _depth_dose(_depth_in_body(px, py, towards_source, body), model)           # (A, P)
    u = lateral[:, :1] * (px - isocentre[0])[None, :] + lateral[:, 1:] * (py - isocentre[1])[None, :]
    position = (u - u0) / model.fluence_bin_mm
    lower = np.clip(np.floor(position), 0, n_u - 2).astype(np.int64)
    frac = np.clip(position - lower, 0.0, 1.0)
    beam_offset = (np.arange(n_angles) * n_u)[:, None]
    rows = np.broadcast_to(np.arange(n_pix)[None, :], (n_angles, n_pix))
    data = np.concatenate([(weight * (1.0 - frac)).ravel(), (weight * frac).ravel()])
    cols = np.concatenate([(beam_offset + lower).ravel(), (beam_offset + lower + 1).ravel()])
    return sparse.csr_matrix((data, (np.concatenate([rows.ravel(), rows.ravel()]), cols)),
                             shape=(n_pix, n_angles * n_u))


def arc_dose(targets: Sequence[np.ndarray], body: BodyEllipse, spacing_mm, model: ArcModel = ArcModel(),
             isocentre_mm=None) -> np.ndarray:
    """Relative dose (T, X, Y, Z) float32 of one full arc per target mask, each arc conformed to its target.

    targets: T boolean (X, Y, Z) masks (non-empty). body: the elliptical outline (mm from the
    volume centre). isocentre_mm: (x, y) mm from the volume centre; default the first target's
    centroid. Each output includes scatter and is 0 outside the body; scale is arbitrary
    (use ``plan_dose`` for Gy).
    """
    targets = [np.asarray(t, dtype=bool) for t in targets]
    if not targets or any(t.ndim != 3 or t.shape != targets[0].shape for t in targets):
        raise ValueError("targets must be one or more boolean (X, Y, Z) masks of one shape")
    if any(not t.any() for t in targets):
        raise ValueError("every target mask must contain at least one voxel")
    grid = _Grid(targets[0].shape, _check_spacing(spacing_mm))
    if isocentre_mm is None:
        idx = np.argwhere(targets[0]).mean(axis=0)
        isocentre_mm = [(idx[i] - (grid.shape[i] - 1) / 2.0) * grid.spacing_mm[i] for i in range(2)]
    _, towards_source, lateral = _beam_directions(model.n_angles)
    fov_xy = np.asarray(grid.shape[:2]) * np.asarray(grid.spacing_mm[:2])
    reach = 0.5 * float(np.hypot(*fov_xy)) + float(np.hypot(*isocentre_mm)) + model.fluence_bin_mm
    n_u = int(math.ceil(2 * reach / model.fluence_bin_mm)) + 1
    u_grid = -reach + model.fluence_bin_mm * np.arange(n_u)
    projection = _projection_matrix(grid, body, isocentre_mm, towards_source, lateral, -reach, n_u, model)
    fluences = [_fluence(t, grid, isocentre_mm, lateral, u_grid, model).reshape(-1, grid.shape[2]) for t in targets]
    primary = projection @ np.concatenate(fluences, axis=1)                            # (X*Y, T*Z)
    primary = primary.reshape(grid.shape[0], grid.shape[1], len(targets), grid.shape[2]).transpose(2, 0, 1, 3)
    sigma = [model.scatter_sigma_mm / s for s in grid.spacing_mm]
    body_mask = _body_mask(grid, body)
    doses = np.empty((len(targets),) + grid.shape, dtype=np.float32)
    for i, dose in enumerate(primary.astype(np.float32)):
        doses[i] = (dose + model.scatter_fraction * ndimage.gaussian_filter(dose, sigma)) * body_mask
    return doses


def plan_dose(ptv70: np.ndarray, ptv56: np.ndarray, body: BodyEllipse, spacing_mm,
              model: ArcModel = ArcModel(), rx_dose_gy: float = RX_DOSE_GY) -> np.ndarray:
    """Two-level plan (X, Y, Z) float32 in Gy: elective arc on PTV56 plus boost arc on PTV70.

    Arc weights (non-negative least squares) aim at ``rx_dose_gy`` mean in PTV70 and
    56/70 of it in PTV56 outside PTV70; the sum is then scaled so the PTV70 mean is ``rx_dose_gy``.
    """
    ptv70, ptv56 = np.asarray(ptv70, dtype=bool), np.asarray(ptv56, dtype=bool)
    if not ptv70.any() or not ptv56.any():
        raise ValueError("ptv70 and ptv56 must each contain at least one voxel")
    elective, boost = arc_dose([ptv56, ptv70], body, spacing_mm, model, isocentre_mm=_centroid_mm(ptv70, spacing_mm))
    elective_only = ptv56 & ~ptv70
    regions, goals = [ptv70], [rx_dose_gy]
    if elective_only.any():
        regions.append(elective_only)
        goals.append(rx_dose_gy * ELECTIVE_DOSE_GY / RX_DOSE_GY)
    means = np.array([[float(d[r].mean()) for d in (elective, boost)] for r in regions])
    weights, _ = optimize.nnls(means, np.asarray(goals))
    if not np.any(weights > 0):   # degenerate (cannot happen with non-empty targets); fall back to the boost
        weights = np.array([0.0, 1.0])
    dose = weights[0] * elective + weights[1] * boost
    return (dose * (rx_dose_gy / float(dose[ptv70].mean()))).astype(np.float32)


def _centroid_mm(mask: np.ndarray, spacing_mm) -> List[float]:
    """(x, y) mm from the volume centre of the centroid of a non-empty mask."""
    idx = np.argwhere(mask).mean(axis=0)
    return [(idx[i] - (mask.shape[i] - 1) / 2.0) * float(spacing_mm[i]) for i in range(2)]


# ----------------------------------------------------------------------------- public API

def make_phantom(case_id, shape=(96, 96, 64), spacing_mm=(4.0, 4.0, 4.0), seed: int = 0) -> Case:
    """A synthetic prostate case (``Case``), fully determined by ``seed``.

    shape: 3 ints >= 16 (X, Y, Z voxels); spacing_mm: 3 positive numbers (X, Y, Z).
    Structures: ``PROSTATE_STRUCTURES`` (all present). Dose in Gy, PTV70 mean exactly 70 Gy.
    Extras: ``possible_dose_mask`` (uint8 (X, Y, Z), 1 inside the body).
    """
    shape, spacing = _check_shape(shape), _check_spacing(spacing_mm)
    seed = _check_seed(seed)
    rng = np.random.default_rng(seed)
    grid = _Grid(shape, spacing)
    body, structures, tissues = _draw_anatomy(grid, rng)
    structures["PTV70"], structures["PTV56"] = _targets(structures, tissues["vesicles"], tissues["body"], spacing)
    ct = normalize_ct(_ct_hu(grid, structures, tissues, rng))
    dose = plan_dose(structures["PTV70"], structures["PTV56"], body, spacing)
    names = list(PROSTATE_STRUCTURES)
    masks_sdf = np.stack([structure_sdf(structures[name], spacing) for name in names])
    present = [name for name in names if structures[name].any()]
    metadata = {
        "case_id": str(case_id), "structures": names, "spacing_mm": list(spacing), "rx_dose_gy": RX_DOSE_GY,
        "site": "prostate", "source": "phantom", "seed": seed, "phantom_version": PHANTOM_VERSION,
    }
    case = Case(ct=ct, dose=dose, masks_sdf=masks_sdf,
                constraints=constraint_vector(PROSTATE, present, RX_DOSE_GY), metadata=metadata,
                extras={"possible_dose_mask": tissues["body"].astype(np.uint8)})
    return case.validate(source=f"phantom {case_id}")


def write_phantoms(folder, n: int, shape=(96, 96, 64), spacing_mm=(4.0, 4.0, 4.0), seed: int = 0,
                   prefix: str = "phantom", progress: bool = False) -> List[Path]:
    """Write ``n`` phantoms as ``{prefix}_000.npz``, ... into ``folder`` (atomic writes).

    Phantom i has case_id ``{prefix}_{i:03d}`` and seed ``seed + i``. Returns the paths in order.
    """
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive integer (number of phantoms), got {n!r}")
    if not isinstance(prefix, str) or not prefix or any(c in prefix for c in "/\\"):
        raise ValueError(f"prefix must be a non-empty file-name prefix without slashes, got {prefix!r}")
    shape, spacing, seed = _check_shape(shape), _check_spacing(spacing_mm), _check_seed(seed)
    folder = Path(folder)
    blocking = non_folder_on_path(folder)
    if blocking is not None:
        raise ValueError(f"{blocking}: exists and is not a folder (the phantoms' .npz files go into {folder})")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in tqdm(range(int(n)), desc="phantoms", disable=not progress):
        case_id = f"{prefix}_{i:03d}"
        case = make_phantom(case_id, shape=shape, spacing_mm=spacing, seed=seed + i)
        paths.append(save_case(folder / f"{case_id}.npz", case))
    return paths
