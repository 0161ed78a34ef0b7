"""3-D gamma index (Low et al. 1998) with the search definition of ``pymedphys.gamma``, in torch.

For every reference voxel above the lower dose cutoff, gamma is the minimum over search points
``p`` of ``sqrt((|D_eval(p) - D_ref| / dose_tolerance)**2 + (|p| / distance_mm)**2)``, where the
evaluated dose is interpolated trilinearly at ``p`` and ``|p|`` is the distance from the voxel.
The dose tolerance is ``dose_percent`` % of the normalisation dose (global: the reference maximum
unless ``global_normalisation`` is given) or of the voxel's reference dose (``local=True``).

Search points are those of ``pymedphys.gamma`` 0.41 (``_gamma/implementation/shell.py``):

* shells of radius ``0, s, 2s, ...`` with ``s = distance_mm / interp_fraction``, up to
  ``max_gamma * distance_mm``; radii are accumulated in float64 as pymedphys does (10 x 0.3 gives
  2.9999999999999996) and the radius ``distance_mm`` itself is always searched too
  (``search_distances``);
* on a shell of radius ``r``: ``ceil(pi r / s) + 1`` rings of polar angle 0..pi about axis 2,
  each of ``ceil(2 pi r sin(polar) / s) + 1`` equally spaced azimuths (``shell_offsets_mm``);
* points outside the evaluated grid do not count;
* pymedphys searches shell by shell and stops a voxel when ``gamma <= r / distance_mm``, which
  cannot change the minimum; gamma above ``max_gamma`` is reported as ``max_gamma``; voxels not
  evaluated are NaN.

The gamma values equal pymedphys's up to float32 rounding of the interpolated dose (about 1e-5);
the final comparison is done in float64 and the map rounded up to float32, so ``gamma <= 1``
is the same pass test. pymedphys options: ``lower_percent_dose_cutoff`` is ``cutoff_percent``
(pymedphys's default is 20 %, ours 10 %: pass it explicitly when comparing), ``local_gamma`` is
``local``, ``skip_once_passed`` and ``random_subset`` exist here too (the subset is drawn with
``seed``, not numpy's global generator), ``ram_available`` is replaced by ``chunk_size``, and
``quiet`` (deprecated there) has no counterpart: nothing is printed. ``max_gamma=None``
(unbounded search) is not supported: pass a larger number.

Differences in the grid handling: pymedphys takes coordinate axes and returns all NaN when they
are descending; here the grid is given by ``spacing_mm`` alone, reference and evaluated doses
share it, and there is no such pitfall. A search point that is off a grid plane only by rounding
noise (``3 * cos(3 pi / 2) = -5.5e-16`` mm) counts as on it: pymedphys, with axes starting at 0,
drops such points on the low faces of the grid (different values at some face voxels only).

Speed: only voxels above the cutoff (and in ``mask``) are searched, shell by shell from the
centre out, and a voxel is searched on a shell only while a lower bound of that shell's gamma
is below its current best (capped at ``max_gamma``). Bounds come from the evaluated doses in a
box around the voxel that holds the shell: the gap between the reference dose and the box's dose
range, and a gradient bound ``|D(p) - D(voxel)| <= slope * |p|``. Most voxels are done after
the first shells. The doses at one shell's points are trilinear weights times gathered corner
doses: a (batched) matmul. While the shells lie within the 27 voxels around each voxel (those of
radius up to the voxel size: at 3 %/3 mm all but the outermost with 3 mm voxels), those 27 dose
differences are gathered once per voxel and reused by every such shell. When most of the voxels still searched
are hopeful on a shell, all of them are searched (a shell that cannot improve a voxel does not
change its minimum) rather than selected. Work runs on the device of the reference tensor (CUDA
tensors on the GPU, numpy arrays on the CPU, where numpy does the small gathers, comparisons and
index arithmetic that it does faster than torch) in chunks of at most ``chunk_size``
voxel-point pairs. On a CPU that other processes keep busy, ``torch.set_num_threads(1)`` can be
much faster than more threads.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from scipy import ndimage

ArrayLike = Union[np.ndarray, torch.Tensor]

# Dose put around the evaluated grid: any search point with a corner out there gets a dose
# difference so large that it never wins the minimum (pymedphys fills such points with inf;
# a finite value keeps 0-weight corners from producing NaN).
OUTSIDE_GRID_DOSE = 1.0e30
DEFAULT_CHUNK_SIZE = 2 ** 22
COORDINATE_SNAP = 1e-9  # voxel units
BOUND_SAFETY = 1e-5
BOUNDS_POINTS_PER_VOXEL = 4  # see _bounds_shells
MAX_SLOPE = 1e15  # gamma units per mm; caps slopes next to OUTSIDE_GRID_DOSE (keeps them finite)
# The 8 corners of a voxel cell, as 0/1 offsets along axes 0, 1, 2.
CELL_CORNERS = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=np.int64)
# The box of half-width 1 voxel: the 27 voxels around a voxel, as offsets in C order.
UNIT_CUBE = (1, 1, 1)
UNIT_CUBE_CORNERS = np.array([[i, j, k] for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)])


# --------------------------------------------------------------------------- search geometry


@dataclass(frozen=True)
class GammaShell:
    """One search shell: its radius (mm) and its points as offsets in mm, shape (P, 3), axes 0/1/2."""
    distance_mm: float
    offsets_mm: np.ndarray


def search_distances(distance_mm: float, interp_fraction: float, max_gamma: float) -> List[Tuple[float, float]]:
    """Shell radii and point spacings (mm), as ``pymedphys.gamma``'s loop produces them.

    Returns ``[(radius_mm, point_step_mm), ...]`` in increasing radius, from 0 up to
    ``max_gamma * distance_mm``. Radii are accumulated in float64 (so 10 x 0.3 gives
    2.9999999999999996, and then exactly 3.0 is searched as well, as in pymedphys).
    """
    step = distance_mm / interp_fraction
    max_distance = distance_mm * max_gamma
    forced = [float(distance_mm)]
    radius = 0.0
    shells = []
    while radius <= max_distance:
        shells.append((radius, step))
        step = max(radius / interp_fraction / max_gamma, distance_mm / interp_fraction)
        radius += step
        if forced and radius >= forced[0]:
            radius = forced.pop(0)
    return shells


def shell_offsets_mm(radius_mm: float, point_step_mm: float) -> np.ndarray:
    """Points on a sphere of radius ``radius_mm``, no gap wider than ``point_step_mm``: (P, 3) mm.

    Rings of constant polar angle about axis 2 (pymedphys ``calculate_coordinates_shell_3d``);
    radius 0 gives the single point (0, 0, 0).
    """
    n_rings = int(np.ceil(np.pi * radius_mm / point_step_mm)) + 1
    polar = np.linspace(0.0, np.pi, n_rings)
    ring_size = np.ceil(2 * np.pi * radius_mm * np.sin(polar) / point_step_mm).astype(int) + 1
    points = []
    for theta, n in zip(polar, ring_size):
        azimuth = np.linspace(0.0, 2 * np.pi, n + 1)[:-1]
        points.append(np.stack([
            radius_mm * np.sin(theta) * np.cos(azimuth),
            radius_mm * np.sin(theta) * np.sin(azimuth),
            radius_mm * np.cos(theta) * np.ones_like(azimuth),
        ], axis=1))
    return np.concatenate(points, axis=0)


def gamma_search_shells(distance_mm: float = 3.0, interp_fraction: float = 10,
                        max_gamma: float = 1.1) -> List[GammaShell]:
    """All search shells of one gamma evaluation (pymedphys's search points), innermost first."""
    return [GammaShell(radius, shell_offsets_mm(radius, step))
            for radius, step in search_distances(distance_mm, interp_fraction, max_gamma)]


# --------------------------------------------------------------------------- input checks


@dataclass(frozen=True)
class _Criteria:
    """Checked gamma criteria; percentages are of the normalisation dose (global) or the voxel's (local)."""
    dose_percent: float
    distance_mm: float
    cutoff_percent: float
    local: bool
    max_gamma: float
    interp_fraction: float
    spacing_mm: Tuple[float, float, float]


def _positive_number(name: str, value, allow_zero: bool = False) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        expected = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {expected}, got {value}")
    return value


def _spacing(spacing_mm) -> Tuple[float, float, float]:
    if isinstance(spacing_mm, torch.Tensor):
        spacing_mm = spacing_mm.detach().cpu().numpy()
    try:
        values = np.atleast_1d(np.asarray(spacing_mm, dtype=np.float64))
    except (TypeError, ValueError):
        raise ValueError(f"spacing_mm must be one positive number or three (mm), got {spacing_mm!r}") from None
    if values.size == 1:
        values = np.repeat(values, 3)
    if values.shape != (3,) or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"spacing_mm must be one positive number or three (mm along axes 0, 1, 2), got {spacing_mm!r}")
    return tuple(float(v) for v in values)


def _numpy_helps(tensor: torch.Tensor) -> bool:
    """True where numpy does a step faster than torch (CPU tensors); elsewhere (CUDA) the same
    step runs in torch ops on the tensor's device. Tests run that path on the CPU by patching this."""
    return tensor.device.type == "cpu"


def _as_tensor(name: str, value, device=None) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
    elif isinstance(value, np.ndarray):
        tensor = torch.from_numpy(np.ascontiguousarray(value))
    else:
        raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(value).__name__}")
    return tensor if device is None else tensor.to(device)


def _dose_tensor(name: str, value, device=None) -> Tuple[torch.Tensor, float]:
    """(float32 tensor on device, its maximum); rejects non-3-D, non-numeric or non-finite doses."""
    tensor = _as_tensor(name, value, device)
    if tensor.ndim != 3:
        raise ValueError(f"{name} must be a 3-D dose volume (X, Y, Z) in Gy, got shape {tuple(tensor.shape)}")
    if not (tensor.is_floating_point() or tensor.dtype in (torch.int16, torch.int32, torch.int64, torch.uint8)):
        raise TypeError(f"{name} must hold real numbers (dose in Gy), got dtype {tensor.dtype}")
    tensor = tensor.to(torch.float32)
    if _numpy_helps(tensor):  # numpy's min and max are faster there; NaN propagates into both
        low, high = float(tensor.numpy().min()), float(tensor.numpy().max())
    else:
        low, high = (float(v) for v in torch.aminmax(tensor))
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"{name} contains NaN or infinite doses")
    return tensor, high


def _mask_tensor(mask, shape, device) -> Optional[torch.Tensor]:
    if mask is None:
        return None
    tensor = _as_tensor("mask", mask, device)
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"mask must have the dose shape {tuple(shape)}, got {tuple(tensor.shape)}")
    if tensor.dtype != torch.bool:
        raise TypeError(f"mask must be boolean, got dtype {tensor.dtype}")
    return tensor


def _settings(spacing_mm, dose_percent, distance_mm, cutoff_percent, local, max_gamma, interp_fraction) -> _Criteria:
    return _Criteria(
        dose_percent=_positive_number("dose_percent", dose_percent),
        distance_mm=_positive_number("distance_mm", distance_mm),
        cutoff_percent=_positive_number("cutoff_percent", cutoff_percent, allow_zero=True),
        local=bool(local),
        max_gamma=_positive_number("max_gamma", max_gamma),
        interp_fraction=_positive_number("interp_fraction", interp_fraction),
        spacing_mm=_spacing(spacing_mm),
    )


# --------------------------------------------------------------------------- voxels to evaluate


def _flat_nonzero(selected: torch.Tensor) -> torch.Tensor:
    """(N,) int64 C-order flat indices of the True voxels (numpy's is several times faster on CPU)."""
    if _numpy_helps(selected):
        return torch.from_numpy(np.flatnonzero(selected.numpy()))
    return torch.nonzero(selected.reshape(-1)).squeeze(1)


def _voxels_to_evaluate(reference: torch.Tensor, settings: _Criteria, normalisation: float,
                        mask: Optional[torch.Tensor], random_subset: Optional[int], seed: int) -> torch.Tensor:
    """(N,) sorted flat indices: reference >= cutoff (of the normalisation), in mask, optional random subset."""
    cutoff = settings.cutoff_percent / 100.0 * normalisation
    # numpy's comparison is ~10x faster than torch's on the CPU; both compare in float32
    on_cpu = _numpy_helps(reference)
    values = reference.numpy() if on_cpu else reference
    selected = values >= (np.float32(cutoff) if on_cpu else cutoff)
    if settings.local:
        selected &= values > 0  # local gamma is undefined at zero reference dose (pymedphys: NaN)
    if mask is not None:
        selected &= mask.numpy() if on_cpu else mask
    voxels = _flat_nonzero(torch.as_tensor(selected))
    if random_subset is not None and random_subset < voxels.numel():
        generator = torch.Generator().manual_seed(int(seed))
        keep = torch.randperm(voxels.numel(), generator=generator)[:random_subset]
        voxels = torch.sort(voxels[keep.to(voxels.device)]).values
    return voxels


# --------------------------------------------------------------------------- grid preparation


@dataclass
class _Grid:
    """Evaluated dose cropped around the voxels to evaluate and padded with OUTSIDE_GRID_DOSE.

    flat: padded crop, flattened; strides: its C-order strides (3,) ints;
    voxel_index: (N,) flat index into ``flat`` of each evaluated voxel.
    """
    flat: torch.Tensor
    strides: np.ndarray
    voxel_index: torch.Tensor


def _prepare_grid(evaluated: torch.Tensor, voxels: torch.Tensor, margin: np.ndarray) -> _Grid:
    """Crop the evaluated dose to the evaluated voxels' bounding box plus ``margin`` (voxels per
    axis, enough for every search-point corner) and pad it by ``margin`` with OUTSIDE_GRID_DOSE."""
    shape = np.array(evaluated.shape)
    # index arithmetic on numpy arrays on the CPU (~3x faster than torch's and np.unravel_index)
    flat = voxels.numpy() if _numpy_helps(voxels) else voxels
    i = flat // int(shape[1] * shape[2])
    rest = flat - i * int(shape[1] * shape[2])
    j = rest // int(shape[2])
    coords = (i, j, rest - j * int(shape[2]))
    low = np.array([int(c.min()) for c in coords], dtype=np.int64)
    high = np.array([int(c.max()) for c in coords], dtype=np.int64)
    low = np.maximum(low - margin, 0)
    high = np.minimum(high + 1 + margin, shape)
    padded = torch.full(tuple(high - low + 2 * margin), OUTSIDE_GRID_DOSE, dtype=evaluated.dtype,
                        device=evaluated.device)
    m0, m1, m2 = (int(m) for m in margin)
    padded[m0:padded.shape[0] - m0, m1:padded.shape[1] - m1, m2:padded.shape[2] - m2] = \
        evaluated[low[0]:high[0], low[1]:high[1], low[2]:high[2]]
    strides = np.array([padded.shape[1] * padded.shape[2], padded.shape[2], 1], dtype=np.int64)
    origin = low - margin
    voxel_index = (coords[0] - int(origin[0])) * int(strides[0]) + (coords[1] - int(origin[1])) * int(strides[1]) \
        + (coords[2] - int(origin[2]))
    voxel_index = torch.from_numpy(voxel_index) if isinstance(voxel_index, np.ndarray) else voxel_index
    return _Grid(padded.reshape(-1), strides, voxel_index)


@dataclass
class _Bounds:
    """Lower-bound ingredients, per voxel, for the shells inside one box around it.

    gap_sq: (n,) float32 squared gap (gamma units) between the reference dose and the box's
        range of evaluated dose: |D_eval(p) - D_ref| / tol >= gap for every point p in the box.
    slope: (n,) float32 bound (gamma units per mm) of the interpolated evaluated dose's gradient
        in the box: |D_eval(p) - D_ref| / tol >= |D_eval(voxel) - D_ref| / tol - slope * |p|.
    Out-of-grid neighbours (OUTSIDE_GRID_DOSE) only loosen both bounds; points there never count.
    """
    gap_sq: torch.Tensor
    slope: torch.Tensor


def _cube_offsets(box: Tuple[int, int, int], strides: np.ndarray, device) -> torch.Tensor:
    """(K,) flat offsets of the voxels within +-box of a voxel, in C order of the (2b+1)^3 cube."""
    return torch.as_tensor(_cube_offsets_array(tuple(box), tuple(int(v) for v in strides)), device=device)


@lru_cache(maxsize=64)
def _cube_offsets_array(box: Tuple[int, int, int], strides: Tuple[int, int, int]) -> np.ndarray:
    axes = [np.arange(-b, b + 1) for b in box]
    cube = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    return cube @ np.array(strides, dtype=np.int64)


# From this many columns on, _take gathers row by row on the CPU (one 1-D index_select per
# row from a shifted view of flat: no (a, b) index to build and read; 0.7x the time of
# numpy's take at 14k columns), below it with one numpy take (per-row call overhead wins).
ROW_GATHER_MIN_COLUMNS = 4096


def _take(flat: torch.Tensor, first: torch.Tensor, second: torch.Tensor,
          out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``flat[first[:, None] + second[None, :]]``: (a,) and (b,) int64 -> (a, b) values
    (into ``out``, contiguous, if given). On the CPU, for few columns, numpy's take is about
    twice as fast as torch's, index building included; see ROW_GATHER_MIN_COLUMNS for many."""
    if not _numpy_helps(flat):
        return torch.take(flat, first[:, None] + second[None, :], out=out)
    if out is None:
        out = torch.empty((first.numel(), second.numel()), dtype=flat.dtype)
    if second.numel() >= ROW_GATHER_MIN_COLUMNS and first.numel():
        offsets = first.tolist()
        lowest = min(offsets)
        shifted = second + lowest  # >= 0, as every gathered index second + offset is
        for row, offset in enumerate(offsets):
            torch.index_select(flat[offset - lowest:], 0, shifted, out=out[row])
    else:
        np.take(flat.numpy(), np.add.outer(first.numpy(), second.numpy()), out=out.numpy())
    return out


def _cube_gradient_bound(cube: torch.Tensor, spacing_mm: Sequence[float]) -> torch.Tensor:
    """(A, B, C, n) dose cubes -> (n,) sqrt(sum over axes of (max |edge difference along the
    axis| / spacing)**2): a bound of the trilinear interpolant's gradient norm in the cube."""
    squared = None
    for axis, spacing in enumerate(spacing_mm):
        length = cube.shape[axis]
        edges = (cube.narrow(axis, 1, length - 1) - cube.narrow(axis, 0, length - 1)).abs_()
        steepest = edges.flatten(0, 2).amax(dim=0).div_(spacing).square_()
        squared = steepest if squared is None else squared.add_(steepest)
    return squared.sqrt_()


def _cube_bounds(cube: torch.Tensor, tolerance, spacing_mm: Sequence[float]) -> _Bounds:
    """Bounds from (A, B, C, n) cubes of D_eval - D_ref around n voxels (tolerance: theirs)."""
    flat = cube.flatten(0, 2)
    low, high = flat.amin(dim=0), flat.amax(dim=0)
    gap = torch.clamp(torch.maximum(low, high.neg_()), min=0.0).div_(tolerance)
    slope = _cube_gradient_bound(cube, spacing_mm).div_(tolerance)
    # loosen a little so float32 rounding can never make a bound exceed a real gamma
    return _Bounds(gap.square_().mul_(1.0 - BOUND_SAFETY), slope.mul_(1.0 + BOUND_SAFETY).clamp_(max=MAX_SLOPE))


def _cube_differences(grid: _Grid, voxel_index: torch.Tensor, reference: torch.Tensor,
                      box: Tuple[int, int, int]) -> torch.Tensor:
    """(2b+1, ..., n) D_eval - D_ref at the voxels within +-box of n evaluated voxels (float32)."""
    cube = _take(grid.flat, _cube_offsets(box, grid.strides, reference.device), voxel_index)
    return cube.sub_(reference[None, :]).view(*(2 * b + 1 for b in box), -1)


def _box_bounds(grid: _Grid, voxel_index: torch.Tensor, reference: torch.Tensor, tolerance,
                box: Tuple[int, int, int], spacing_mm: Sequence[float], chunk_size: int) -> _Bounds:
    """Bounds over the box +-box voxels (each half-width >= 1) around some evaluated voxels.

    voxel_index: (n,) their flat indices in the padded grid; reference, tolerance: theirs.
    """
    chunk = max(1, chunk_size // int(np.prod([2 * b + 1 for b in box])))
    parts = []
    for start in range(0, voxel_index.numel(), chunk):
        part = slice(start, start + chunk)
        tol = tolerance[part] if torch.is_tensor(tolerance) else tolerance
        parts.append(_cube_bounds(_cube_differences(grid, voxel_index[part], reference[part], box), tol, spacing_mm))
    return _Bounds(torch.cat([p.gap_sq for p in parts]), torch.cat([p.slope for p in parts]))


# --------------------------------------------------------------------------- shell evaluation


@dataclass(frozen=True)
class _ShellBlocks:
    """One shell as blocks of points whose trilinear corners fit in a 3 x 3 x 3 voxel box.

    corners: (U, 3) int64 voxel offsets of all corners the shell uses;
    block_rows: (B * 28,) rows of [corner values (U rows); reference dose (1 row)] per block:
        its 27 corners, then the reference row; None when that is simply rows 0..27 (one block);
    weights: (B, Q, 28) float32 trilinear weights of each block's points (padded to Q by
        repeating a point: a repeat does not change a minimum) and -1 for the reference row, so
        ``weights @ rows`` is D_eval(point) - D_ref;
    box: half-width in voxels, per axis, of the box holding every corner with non-zero weight.
    """
    distance_mm: float
    n_points: int
    corners: np.ndarray
    block_rows: Optional[np.ndarray]
    weights: np.ndarray
    box: Tuple[int, int, int]


def _trilinear_weights(fraction: np.ndarray) -> np.ndarray:
    """(P, 3) fractional positions in a cell -> (P, 8) weights of the CELL_CORNERS."""
    per_axis = np.where(CELL_CORNERS[None, :, :] == 1, fraction[:, None, :], 1.0 - fraction[:, None, :])
    return per_axis.prod(axis=2)


def _scalar_keys(keys: np.ndarray) -> np.ndarray:
    """(P, 3) small integer triples -> (P,) int64 with the same equalities (fast np.unique)."""
    shifted = keys - keys.min(axis=0)
    size = shifted.max(axis=0) + 1
    return (shifted[:, 0] * size[1] + shifted[:, 1]) * size[2] + shifted[:, 2]


def _block_keys(cells: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Split cells into 2 x 2 x 2-cell blocks, with the block grid phase giving the fewest blocks.

    Returns (keys (P, 3) block index per point, origins (P, 3) lowest corner of the point's block).
    """
    best = None
    for phase in CELL_CORNERS:
        keys = np.floor_divide(cells + phase, 2)
        count = len(np.unique(_scalar_keys(keys)))
        if best is None or count < best[0]:
            best = (count, keys, 2 * keys - phase)
    return best[1], best[2]


def _points_per_block(counts: np.ndarray) -> int:
    """Block size Q (points) balancing padding (blocks are padded to Q) against per-block row copies."""
    def cost(q):
        return (np.ceil(counts / q) * (28 + 2 * q)).sum()
    candidates = [q for q in (16, 32, 64, 128, 256, 512) if q < counts.max()] + [int(counts.max())]
    return min(candidates, key=cost)


def _shell_blocks(shell: GammaShell, spacing_mm: Tuple[float, float, float]) -> _ShellBlocks:
    offsets = shell.offsets_mm / np.asarray(spacing_mm)[None, :]  # voxel units, float64
    # Points off a grid plane by rounding noise only (sin(pi) != 0) lie on it: on a face of the
    # grid they are inside it (pymedphys with axes starting at 0 drops those on the low faces).
    offsets[np.abs(offsets) < COORDINATE_SNAP] = 0.0
    box = np.ceil(np.abs(offsets).max(axis=0)).astype(np.int64)
    if shell.distance_mm > 0:
        box = np.maximum(box, 1)
    # Cells within [-box, box - 1], so a point exactly at +box puts weight 1 on corner +box.
    cells = np.clip(np.floor(offsets).astype(np.int64), -box, np.maximum(box - 1, 0))
    weights8 = _trilinear_weights(offsets - cells)  # (P, 8)
    keys, origins = _block_keys(cells)
    _, owner = np.unique(_scalar_keys(keys), return_inverse=True)
    owner = owner.reshape(-1)
    per_block = _points_per_block(np.bincount(owner))
    groups = []
    for block in range(owner.max() + 1):
        members = np.flatnonzero(owner == block)
        groups.extend(np.array_split(members, -(-len(members) // per_block)))

    box27 = np.array([[i, j, k] for i in range(3) for j in range(3) for k in range(3)], dtype=np.int64)
    block_corners = np.zeros((len(groups), 27, 3), dtype=np.int64)
    weights = np.zeros((len(groups), per_block, 28), dtype=np.float64)
    for b, members in enumerate(groups):
        members = np.concatenate([members, np.repeat(members[:1], per_block - len(members))])
        origin = origins[members[0]]
        block_corners[b] = origin + box27
        # corner c of a point's cell sits at (cell - origin + c) in the block's 3 x 3 x 3 box
        local = cells[members] - origin  # (Q, 3) in {0, 1}
        slot = ((local[:, None, :] + CELL_CORNERS[None, :, :]) * np.array([9, 3, 1])).sum(axis=2)  # (Q, 8)
        np.put_along_axis(weights[b], slot, weights8[members], axis=1)
        weights[b, :, 27] = -1.0

    corners, rows = np.unique(block_corners.reshape(-1, 3), axis=0, return_inverse=True)
    rows = rows.reshape(len(groups), 27)
    block_rows = np.concatenate([rows, np.full((len(groups), 1), len(corners))], axis=1).reshape(-1)
    if len(groups) == 1 and np.array_equal(block_rows, np.arange(28)):
        block_rows = None
    return _ShellBlocks(shell.distance_mm, len(offsets), corners, block_rows, weights.astype(np.float32),
                        tuple(int(b) for b in box))


@lru_cache(maxsize=16)
def _search_plan(distance_mm: float, interp_fraction: float, max_gamma: float,
                 spacing_mm: Tuple[float, float, float]) -> Tuple[_ShellBlocks, ...]:
    """All shells as blocks, boxes made nested (each at least the previous one, per axis)."""
    plan = [_shell_blocks(shell, spacing_mm) for shell in gamma_search_shells(distance_mm, interp_fraction, max_gamma)]
    for s in range(1, len(plan)):
        nested = tuple(max(a, b) for a, b in zip(plan[s].box, plan[s - 1].box))
        plan[s] = replace(plan[s], box=nested)
    return tuple(plan)


@dataclass
class _ShellKernel:
    """A shell's blocks on one grid: corner_offsets (U,) flat offsets in the padded grid; tensors on device.

    unit_cube_weights: (Q, 27) trilinear weights over the 3 x 3 x 3 voxels around the voxel (C
    order) when every point's corners lie there (then ``unit_cube_weights @ cube_differences``
    is D_eval(point) - D_ref), else None.
    """
    distance_mm: float
    n_points: int
    corner_offsets: torch.Tensor
    block_rows: Optional[torch.Tensor]
    weights: torch.Tensor
    box: Tuple[int, int, int]
    unit_cube_weights: Optional[torch.Tensor]


def _shell_kernels(plan_key: tuple, strides: np.ndarray, device: torch.device) -> List[_ShellKernel]:
    """The search plan of ``plan_key`` (``_search_plan``'s arguments) on one padded grid (only
    the shells searched through unit cubes need no corner offsets into it)."""
    return [kernel if kernel.unit_cube_weights is not None
            else replace(kernel, corner_offsets=torch.as_tensor(blocks.corners @ strides, device=device))
            for kernel, blocks in zip(_kernels_on_device(plan_key, str(device)), _search_plan(*plan_key))]


@lru_cache(maxsize=16)
def _plan_margin(plan_key: tuple) -> np.ndarray:
    """(3,) voxels per axis a grid needs around the evaluated voxels for every search-point corner."""
    return np.max([np.abs(blocks.corners).max(axis=0) for blocks in _search_plan(*plan_key)], axis=0) + 1


@lru_cache(maxsize=16)
def _kernels_on_device(plan_key: tuple, device: str) -> Tuple[_ShellKernel, ...]:
    """The plan's weights as tensors on ``device`` (made once; corner_offsets left empty)."""
    kernels = []
    for blocks in _search_plan(*plan_key):
        in_unit_cube = blocks.block_rows is None and np.array_equal(blocks.corners, UNIT_CUBE_CORNERS)
        kernels.append(_ShellKernel(
            distance_mm=blocks.distance_mm,
            n_points=blocks.n_points,
            corner_offsets=torch.empty(0, dtype=torch.int64, device=device),
            block_rows=None if blocks.block_rows is None else torch.as_tensor(blocks.block_rows, device=device),
            weights=torch.as_tensor(blocks.weights, device=device),
            box=blocks.box,
            unit_cube_weights=(torch.as_tensor(np.ascontiguousarray(blocks.weights[0, :, :27]), device=device)
                               if in_unit_cube else None),
        ))
    return tuple(kernels)


def _min_dose_difference(flat: torch.Tensor, voxel_index: torch.Tensor, reference: torch.Tensor,
                         kernel: _ShellKernel, chunk_size: int) -> torch.Tensor:
    """(n,) minimum over the shell's points of |D_eval(voxel + point) - D_ref(voxel)| in Gy (float32)."""
    n_blocks, per_block, _ = kernel.weights.shape
    n_corners = kernel.corner_offsets.numel()
    chunk = max(1, chunk_size // (n_blocks * per_block + n_corners))
    result = torch.empty_like(reference)
    for start in range(0, voxel_index.numel(), chunk):
        index = voxel_index[start:start + chunk]
        rows = torch.empty((n_corners + 1, index.numel()), dtype=flat.dtype, device=flat.device)
        _take(flat, kernel.corner_offsets, index, out=rows[:n_corners])
        rows[n_corners] = reference[start:start + chunk]
        if kernel.block_rows is not None:
            rows = rows.index_select(0, kernel.block_rows)
        differences = torch.bmm(kernel.weights, rows.view(n_blocks, 28, -1))  # (B, Q, n)
        torch.amin(differences.abs_().view(n_blocks * per_block, -1), dim=0, out=result[start:start + chunk])
    return result


def _tolerance_of(tolerance, ids: torch.Tensor):
    """The dose tolerance (Gy) of the voxels ``ids``: per voxel (local gamma, a tensor) or one number."""
    return tolerance.index_select(0, ids) if torch.is_tensor(tolerance) else tolerance


def _select_last(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[..., index]``. index_select along the last dimension of a 2-D view: on the CPU
    several times faster than along the last dimension of a 4-D tensor, and ~0.6x numpy's take."""
    if values.ndim <= 2:
        return values.index_select(-1, index)
    return values.reshape(-1, values.shape[-1]).index_select(1, index).view(*values.shape[:-1], -1)


def _min_cube_difference(cube: torch.Tensor, weights: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """(n,) minimum over a shell's points of |D_eval(voxel + point) - D_ref| (Gy, float32) from
    (3, 3, 3, n) cubes of D_eval - D_ref around n voxels and the shell's (Q, 27) unit-cube weights."""
    columns = cube.view(27, -1)
    chunk = max(1, chunk_size // weights.shape[0])
    result = torch.empty(columns.shape[1], dtype=columns.dtype, device=columns.device)
    for start in range(0, columns.shape[1], chunk):
        differences = torch.mm(weights, columns[:, start:start + chunk])  # (Q, n)
        torch.amin(differences.abs_(), dim=0, out=result[start:start + chunk])
    return result


# --------------------------------------------------------------------------- the search


@dataclass
class _Active:
    """The evaluated voxels still searched, as arrays whose last dimension is the voxel.

    ids: (n,) positions in the evaluated-voxel list; best: float64 squared gamma so far;
    dose0: float64 dose term at the voxel itself (loosened by BOUND_SAFETY, for bounds);
    gap_sq, slope: float64 bounds of the current box, or None; slope_floor: float64 minimum over
    radii r >= 0 of (dose0 - slope r)+**2 + (r / distance_mm)**2 (with gap_sq, or None);
    cube: (3, 3, 3, n) float32 D_eval - D_ref at the 27 voxels around each voxel, gathered once
    for all the shells that lie within them (``_ShellKernel.unit_cube_weights``), or None.
    """
    ids: torch.Tensor
    best: torch.Tensor
    dose0: torch.Tensor
    gap_sq: Optional[torch.Tensor] = None
    slope: Optional[torch.Tensor] = None
    slope_floor: Optional[torch.Tensor] = None
    cube: Optional[torch.Tensor] = None

    def select(self, keep: torch.Tensor) -> "_Active":
        """The voxels at positions ``keep`` ((k,) int64 indices)."""
        def pick(value):
            return None if value is None else _select_last(value, keep)
        return _Active(*(pick(getattr(self, name)) for name in self.__dataclass_fields__))


def _bounds_shells(plan: Sequence[_ShellBlocks]) -> frozenset:
    """Shells at which the voxels still searched get their box's bounds: per box, the first shell
    with BOUNDS_POINTS_PER_VOXEL points per box voxel (or, where none has, the box's largest
    shell, if it has at least one per voxel). Bounds cost a few passes over the box per voxel;
    at the box's first shells most voxels are about to stop anyway (3 %/3 mm phantoms and real
    doses: 0.90-0.965 of the time of bounding at one point per box voxel, same results; a poor
    prediction, where bounds matter most, 1.04)."""
    shells = set()
    for box in dict.fromkeys(blocks.box for blocks in plan[1:]):
        in_box = [s for s in range(1, len(plan)) if plan[s].box == box]
        box_voxels = int(np.prod([2 * b + 1 for b in box]))
        largest = max(plan[s].n_points for s in in_box)
        if largest >= box_voxels:
            wanted = min(BOUNDS_POINTS_PER_VOXEL * box_voxels, largest)
            shells.add(next(s for s in in_box if plan[s].n_points >= wanted))
    return frozenset(shells)


@dataclass(frozen=True)
class _Schedule:
    """What the search does at each shell s, fixed by the plan.

    first_in_next_box: per shell s >= 1, the first shell from s on outside shell s-1's box, or
        None (entry 0 unused); bounds_at: the shells where bounds are computed (_bounds_shells).
    """
    first_in_next_box: Tuple[Optional[int], ...]
    bounds_at: frozenset


@lru_cache(maxsize=16)
def _shell_schedule(plan_key: tuple) -> _Schedule:
    plan = _search_plan(*plan_key)
    first_in_next_box = (None,) + tuple(next((t for t in range(s, len(plan)) if plan[t].box != plan[s - 1].box), None)
                                        for s in range(1, len(plan)))
    return _Schedule(first_in_next_box, _bounds_shells(plan))


def _search(grid: _Grid, reference: torch.Tensor, tolerance, settings: _Criteria, kernels: List[_ShellKernel],
            schedule: _Schedule, skip_once_passed: bool, chunk_size: int) -> torch.Tensor:
    """(N,) float64 squared gamma (before clipping) of the evaluated voxels.

    Shells are searched innermost first. A voxel is searched on a shell only while a lower bound
    of some shell from there on is below its current best (capped at max_gamma); a shell of
    radius r in a box gives at least  max(gap, dose0 - slope * r)**2 + (r / distance_mm)**2
    (``_Bounds``; dose0 is the dose term at the voxel itself), or (r / distance_mm)**2 before the
    box's bounds are known. They are computed, for the voxels still searched, at one shell of
    the box (``_bounds_shells``). Searching a voxel on a shell that cannot improve it is wasted
    work but never changes its minimum, so when most voxels are searched all are.
    """
    dta = settings.distance_mm
    radius = [k.distance_mm for k in kernels]
    distance_term = [(r / dta) ** 2 for r in radius]  # as pymedphys: (distance / DTA) ** 2
    distance_terms = torch.tensor(distance_term, dtype=torch.float64, device=reference.device)
    max_gamma_sq = settings.max_gamma ** 2
    first_in_next_box, bounds_at = schedule.first_in_next_box, schedule.bounds_at
    inverse_tolerance_sq = None if torch.is_tensor(tolerance) else 1.0 / tolerance / tolerance  # inf, not an error

    dose0 = torch.abs(grid.flat.index_select(0, grid.voxel_index) - reference).double() / tolerance  # radius 0
    result = dose0.square()
    # best is kept capped at max_gamma (the result is clipped there anyway), so it is the goal
    active = _Active(torch.arange(reference.numel(), device=reference.device),
                     torch.clamp(result, max=max_gamma_sq), dose0.mul_(1.0 - BOUND_SAFETY))

    def goal(state):
        """Squared gamma a later shell must beat: the current best (capped at max_gamma)."""
        if skip_once_passed:
            return torch.where(state.best < 1.0, 0.0, state.best)
        return state.best

    def shell_bound(state, s):
        """Squared-gamma lower bound on shell s (the box's bounds must be the state's)."""
        slope_term = torch.clamp(state.dose0 - state.slope * radius[s], min=0.0).square_()
        return torch.maximum(state.gap_sq, slope_term).add_(distance_term[s])

    def set_bounds(state, found: _Bounds):
        state.gap_sq, state.slope = found.gap_sq.double(), found.slope.double()
        # the convex (dose0 - slope r)+**2 + r**2/dta**2 is smallest at r = dose0 slope / (slope**2 + dta**-2)
        r = state.dose0 * state.slope / (state.slope.square() + dta ** -2)
        state.slope_floor = torch.clamp(state.dose0 - state.slope * r, min=0.0).square_().add_(r.div_(dta).square_())

    def still_improvable(state, next_shell):
        """Mask of voxels that a shell from next_shell on could still improve, or None if none can."""
        if next_shell == len(kernels):
            return None
        target = goal(state)
        if state.gap_sq is None:  # the distance term grows with the radius
            return distance_term[next_shell] < target
        keep = None
        if kernels[next_shell].box == kernels[next_shell - 1].box:
            # a lower bound on all shells from next_shell on in this box (boxes only grow)
            keep = torch.maximum(state.gap_sq + distance_term[next_shell], state.slope_floor) < target
        next_box = first_in_next_box[next_shell]
        if next_box is not None and distance_term[next_box] < max_gamma_sq:  # else it improves none
            beyond = distance_term[next_box] < target
            keep = beyond if keep is None else keep.logical_or_(beyond)
        return keep if keep is not None else torch.zeros_like(target, dtype=torch.bool)

    def retire(state, keep):
        """Store the results of the voxels that leave; return the others. Compacting costs a
        copy of every array, so it waits until a tenth of the voxels can leave."""
        if keep is None:  # no shell left
            result.index_copy_(0, state.ids, state.best)
            return None
        nonlocal staying_fraction
        staying = _flat_nonzero(keep)
        staying_fraction = staying.numel() / max(keep.numel(), 1)
        if staying_fraction > 0.9:
            return state
        result.index_copy_(0, state.ids, state.best)  # the staying ones are written again later
        return state.select(staying)

    staying_fraction = 1.0  # of the voxels at the last retire()
    # retire() stores every voxel's result by the last shell (still_improvable is then None)
    active = retire(active, still_improvable(active, 1))
    for s in range(1, len(kernels)):
        if active is None or active.ids.numel() == 0:
            break
        kernel = kernels[s]
        if kernel.box != kernels[s - 1].box:  # a new box: its bounds are not known yet
            active.gap_sq = active.slope = active.slope_floor = None
        if kernel.unit_cube_weights is None:
            active.cube = None
        elif active.cube is None:
            active.cube = _cube_differences(grid, grid.voxel_index.index_select(0, active.ids),
                                            reference.index_select(0, active.ids), UNIT_CUBE)
        if active.gap_sq is None and s in bounds_at:
            tol = _tolerance_of(tolerance, active.ids)
            if kernel.box == UNIT_CUBE and active.cube is not None:
                found = _cube_bounds(active.cube, tol, settings.spacing_mm)
            else:
                found = _box_bounds(grid, grid.voxel_index.index_select(0, active.ids),
                                    reference.index_select(0, active.ids), tol, kernel.box,
                                    settings.spacing_mm, chunk_size)
            set_bounds(active, found)
        hopeful = None  # all
        if active.gap_sq is not None and staying_fraction > 0.75:
            hopeful = _flat_nonzero(shell_bound(active, s) < goal(active))
            if hopeful.numel() > 0.75 * active.ids.numel():
                hopeful = None
        if hopeful is None or hopeful.numel():
            ids = active.ids if hopeful is None else active.ids.index_select(0, hopeful)
            if active.cube is not None:
                cube = active.cube if hopeful is None else _select_last(active.cube, hopeful)
                dose_diff = _min_cube_difference(cube, kernel.unit_cube_weights, chunk_size)
            else:
                dose_diff = _min_dose_difference(grid.flat, grid.voxel_index.index_select(0, ids),
                                                 reference.index_select(0, ids), kernel, chunk_size)
            if torch.is_tensor(tolerance):
                shell_gamma_sq = (dose_diff.double() / _tolerance_of(tolerance, ids)).square_().add_(distance_term[s])
            else:  # one op fewer per shell: (d / tol)**2 as d * d * (1 / tol / tol), within a few ulp
                dose_diff = dose_diff.double()
                shell_gamma_sq = torch.addcmul(distance_terms[s], dose_diff, dose_diff, value=inverse_tolerance_sq)
            if hopeful is None:
                torch.minimum(active.best, shell_gamma_sq, out=active.best)
            else:
                active.best.index_copy_(0, hopeful, torch.minimum(active.best.index_select(0, hopeful), shell_gamma_sq))
        active = retire(active, still_improvable(active, s + 1))
    return result


def _round_up_to_float32(values: torch.Tensor) -> torch.Tensor:
    """Non-negative float64 -> float32 rounding up, so ``gamma32 <= 1`` exactly when ``gamma64 <= 1``.

    For a non-negative float32 the next one up is the next bit pattern (4x faster than
    nextafter and where on the CPU)."""
    single = values.float()
    return (single.view(torch.int32) + (single.double() < values)).view(torch.float32)


# --------------------------------------------------------------------------- public API


@contextmanager
def _full_float32_matmul():
    """Full-precision float32 matmul (no TF32 / bf16 shortcuts a caller may have enabled)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _evaluated_gamma(reference: ArrayLike, evaluated: ArrayLike, spacing_mm, dose_percent, distance_mm,
                     cutoff_percent, local, max_gamma, interp_fraction, mask, global_normalisation,
                     skip_once_passed, random_subset, seed, chunk_size):
    """Checked inputs -> (shape, device, voxels (N,) flat indices, gamma (N,) float32 rounded up)."""
    settings = _settings(spacing_mm, dose_percent, distance_mm, cutoff_percent, local, max_gamma, interp_fraction)
    chunk_size = int(_positive_number("chunk_size", chunk_size))
    subset_is_count = isinstance(random_subset, (int, np.integer)) and not isinstance(random_subset, bool)
    if random_subset is not None and not (subset_is_count and random_subset >= 0):
        raise ValueError(f"random_subset must be a non-negative int or None, got {random_subset!r}")
    device = reference.device if isinstance(reference, torch.Tensor) else torch.device("cpu")
    ref, ref_max = _dose_tensor("reference", reference, device)
    ev, _ = _dose_tensor("evaluated", evaluated, device)
    if ref.shape != ev.shape:
        raise ValueError(f"evaluated must have the reference's shape {tuple(ref.shape)}, got {tuple(ev.shape)}")
    region = _mask_tensor(mask, ref.shape, device)
    if global_normalisation is not None:
        normalisation = _positive_number("global_normalisation", global_normalisation)
    elif ref_max > 0 or settings.local:
        normalisation = ref_max
    else:
        raise ValueError("reference dose has no positive value to normalise to; pass global_normalisation")

    voxels = _voxels_to_evaluate(ref, settings, normalisation, region, random_subset, seed)
    if voxels.numel() == 0:
        return ref.shape, device, voxels, torch.empty(0, dtype=torch.float32, device=device)
    plan_key = (settings.distance_mm, settings.interp_fraction, settings.max_gamma, settings.spacing_mm)
    grid = _prepare_grid(ev, voxels, _plan_margin(plan_key))
    kernels = _shell_kernels(plan_key, grid.strides, device)
    ref_values = ref.reshape(-1).index_select(0, voxels)
    fraction = settings.dose_percent / 100.0
    tolerance = fraction * ref_values if settings.local else fraction * normalisation
    with _full_float32_matmul():
        gamma_sq = _search(grid, ref_values, tolerance, settings, kernels, _shell_schedule(plan_key),
                           bool(skip_once_passed), chunk_size)
    return ref.shape, device, voxels, _round_up_to_float32(torch.sqrt(gamma_sq).clamp_(max=settings.max_gamma))


def gamma_index(reference: ArrayLike, evaluated: ArrayLike, spacing_mm, dose_percent: float = 3.0,
                distance_mm: float = 3.0, cutoff_percent: float = 10.0, local: bool = False, max_gamma: float = 1.1,
                interp_fraction: float = 10, mask: Optional[ArrayLike] = None,
                global_normalisation: Optional[float] = None, skip_once_passed: bool = False,
                random_subset: Optional[int] = None, seed: int = 0,
                chunk_size: int = DEFAULT_CHUNK_SIZE) -> ArrayLike:
    """3-D gamma index map of ``evaluated`` against ``reference`` (pymedphys.gamma's definition).

    reference, evaluated: (X, Y, Z) dose in Gy on the same grid; numpy arrays or torch tensors
        (work runs on the reference tensor's device, CPU for numpy).
    spacing_mm: voxel size in mm, one number or three (axes 0, 1, 2; anisotropic allowed).
    dose_percent, distance_mm: the criteria, e.g. 3 % / 3 mm. The dose tolerance is
        dose_percent % of the normalisation dose (global) or of the reference voxel's dose (local).
    cutoff_percent: reference voxels below this percent of the normalisation dose are not
        evaluated (pymedphys ``lower_percent_dose_cutoff``, whose default is 20, not 10).
    local: local instead of global gamma (reference voxels at 0 Gy are then not evaluated).
    max_gamma: search radius is max_gamma x distance_mm; larger gammas are reported as max_gamma.
    interp_fraction: search points are at most distance_mm / interp_fraction apart.
    mask: optional bool (X, Y, Z) region; only voxels inside it are evaluated (e.g. targets
        grown by 5 mm with ``dilate_mask``). The normalisation stays the whole reference's maximum.
    global_normalisation: dose (Gy) the percentages refer to; default the reference maximum.
    skip_once_passed: stop searching a voxel once its gamma is below 1 (faster; pass/fail is
        unchanged but passing gammas are then upper bounds), as in pymedphys.
    random_subset: evaluate only this many voxels, chosen at random (reproducibly, with ``seed``)
        among those above the cutoff and in the mask.
    chunk_size: at most this many voxel x search-point doses (or voxel x box-voxel doses) are
        handled at once; peak memory is about 30 bytes x chunk_size (~130 MB by default), plus
        about 60 bytes per evaluated voxel and a padded copy of the evaluated dose's dose region.

    Returns gamma (X, Y, Z) float32 of the input's kind (numpy array, or tensor on the reference's
    device), NaN where not evaluated. Values are the float64 results rounded up to float32, so
    ``gamma <= 1`` is exactly the float64 pass test.
    """
    shape, device, voxels, values = _evaluated_gamma(
        reference, evaluated, spacing_mm, dose_percent, distance_mm, cutoff_percent, local, max_gamma,
        interp_fraction, mask, global_normalisation, skip_once_passed, random_subset, seed, chunk_size)
    if isinstance(reference, torch.Tensor):
        gamma = torch.full(shape, float("nan"), dtype=torch.float32, device=device)
        gamma.view(-1)[voxels] = values
        return gamma
    gamma = np.full(shape, np.nan, dtype=np.float32)
    gamma.reshape(-1)[voxels.numpy()] = values.numpy()
    return gamma


def pass_rate_from_gamma(gamma: ArrayLike, mask: Optional[ArrayLike] = None) -> float:
    """Percent of evaluated (non-NaN) voxels with gamma <= 1, optionally only inside ``mask``; NaN if none."""
    values = _as_tensor("gamma", gamma)
    evaluated = ~torch.isnan(values)
    if mask is not None:
        evaluated &= _mask_tensor(mask, values.shape, values.device)
    count = int(evaluated.sum())
    if count == 0:
        return float("nan")
    return 100.0 * int((values[evaluated] <= 1.0).sum()) / count


def gamma_pass_rate(reference: ArrayLike, evaluated: ArrayLike, spacing_mm, dose_percent: float = 3.0,
                    distance_mm: float = 3.0, cutoff_percent: float = 10.0, local: bool = False,
                    max_gamma: float = 1.1, interp_fraction: float = 10, mask: Optional[ArrayLike] = None,
                    global_normalisation: Optional[float] = None, skip_once_passed: bool = False,
                    random_subset: Optional[int] = None, seed: int = 0, chunk_size: int = DEFAULT_CHUNK_SIZE) -> float:
    """Percent (0-100) of evaluated voxels (above the cutoff, inside ``mask``) with gamma <= 1.

    Same arguments as ``gamma_index`` (without building the gamma map); NaN when no voxel is evaluated.
    """
    _, _, voxels, values = _evaluated_gamma(
        reference, evaluated, spacing_mm, dose_percent, distance_mm, cutoff_percent, local, max_gamma,
        interp_fraction, mask, global_normalisation, skip_once_passed, random_subset, seed, chunk_size)
    if voxels.numel() == 0:
        return float("nan")
    return 100.0 * int((values <= 1.0).sum()) / voxels.numel()


def dilate_mask(mask: ArrayLike, spacing_mm, margin_mm: float) -> ArrayLike:
    """Voxels within ``margin_mm`` (Euclidean, anisotropic spacing) of a bool (X, Y, Z) mask.

    E.g. ``dilate_mask(ptv, spacing, 5.0)`` for a gamma region of targets plus 5 mm.
    Returns the same kind (numpy array or tensor on the same device) as ``mask``.
    """
    tensor = _as_tensor("mask", mask)
    if tensor.dtype != torch.bool or tensor.ndim != 3:
        raise ValueError(f"mask must be a bool 3-D volume, got dtype {tensor.dtype} and shape {tuple(tensor.shape)}")
    spacing = _spacing(spacing_mm)
    margin = _positive_number("margin_mm", margin_mm, allow_zero=True)
    array = tensor.cpu().numpy()
    if not array.any():
        grown = np.zeros_like(array)
    else:
        grown = ndimage.distance_transform_edt(~array, sampling=spacing) <= margin
    if isinstance(mask, torch.Tensor):
        return torch.from_numpy(grown).to(mask.device)
    return grown
