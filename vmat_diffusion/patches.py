"""Random training patches from whole cases, half of them centred where the dose is.

A patch of size p covers ``[center - p // 2, center - p // 2 + p)`` along each axis. Patches may
extend past the volume; the outside is padded (CT with ``CT_AIR``, SDFs with ``SDF_OUTSIDE``, or
``SDF_ABSENT`` for a structure absent from the case, dose with 0), so the borders of a volume are
sampled too. Only the in-bounds part of each source
array is read, so cases whose arrays are ``np.memmap`` are never loaded whole.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .conventions import CT_AIR, SDF_ABSENT, SDF_OUTSIDE

DOSE_FILL = 0.0
EXTRA_FILL = 0.0   # outside the case: outside any mask
PATCH_KEYS = ("ct", "masks_sdf", "dose", "center", "dose_biased")
READ_THREADS = 2   # PatchSampler default: a memory-mapped 128^3 x 10-channel patch took 31 ms on 1 thread, 16.5 ms on 2

_POOLS: Dict[Tuple[int, int], ThreadPoolExecutor] = {}


def _copy_pool(threads: int) -> ThreadPoolExecutor:
    """A thread pool of this process (DataLoader workers get their own after a fork)."""
    key = (os.getpid(), threads)
    if key not in _POOLS:
        _POOLS[key] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="vmat-patch-read")
    return _POOLS[key]


def _as_size3(size, name: str = "patch_size") -> Tuple[int, int, int]:
    """An int or 3 ints -> a tuple of 3 positive ints."""
    values = (size, size, size) if isinstance(size, (int, np.integer)) and not isinstance(size, bool) else size
    try:
        values = tuple(values)
    except TypeError:
        raise TypeError(f"{name} must be an int or 3 ints, got {size!r}") from None
    if len(values) != 3 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0
                                   for v in values):
        raise ValueError(f"{name} must be a positive int or 3 positive ints, got {size!r}")
    return tuple(int(v) for v in values)


def _as_rng(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or (isinstance(rng, (int, np.integer)) and not isinstance(rng, bool)):
        return np.random.default_rng(rng)
    raise TypeError(f"rng must be a numpy Generator, an int seed or None, got {type(rng).__name__}")


def extract_patch(array: np.ndarray, center: Sequence[int], size, fill, threads: int = 1) -> np.ndarray:
    """Patch of ``array`` ((X, Y, Z) or (C, X, Y, Z)) around ``center`` (3 voxel indices).

    size: int or 3 ints (p_x, p_y, p_z); the patch covers ``[center - p // 2, center - p // 2 + p)``
    per axis. fill: value of the voxels outside the array (a number, or one number per channel
    for (C, X, Y, Z) arrays). Returns a new array of the source dtype, shape (p_x, p_y, p_z) or
    (C, p_x, p_y, p_z); only the overlapping slab of ``array`` is read. threads > 1 copies
    slices along the first axis concurrently (numpy releases the GIL while copying): the copy out
    of a memory map is bound by memory bandwidth, which one core does not saturate.
    """
    size = _as_size3(size, "size")
    if array.ndim not in (3, 4):
        raise ValueError(f"array must have shape (X, Y, Z) or (C, X, Y, Z), got shape {array.shape}")
    try:
        center = [int(c) for c in center]
    except (TypeError, ValueError):
        raise TypeError(f"center must be 3 integers (voxel indices), got {center!r}") from None
    if len(center) != 3:
        raise ValueError(f"center must be 3 integers (voxel indices), got {center!r}")
    spatial = array.shape[-3:]
    out = np.empty(array.shape[:-3] + size, dtype=array.dtype)
    fill = np.asarray(fill, dtype=array.dtype)
    if fill.ndim == 1 and array.ndim == 4 and fill.shape[0] == array.shape[0]:
        fill = fill[:, None, None, None]
    elif fill.ndim != 0:
        channels = array.shape[0] if array.ndim == 4 else 1
        raise ValueError(f"fill must be a number or one number per channel ({channels}), got shape {fill.shape}")
    src, dst = [], []
    for c, p, n in zip(center, size, spatial):
        start = c - p // 2
        lo, hi = max(start, 0), min(start + p, n)
        if hi <= lo:   # no overlap with the volume: all padding
            out[...] = fill
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - start, hi - start))
    if any(d.stop - d.start < p for d, p in zip(dst, size)):
        out[...] = fill   # only patches that cross the border need padding (saves a full pass)
    target, source = out[(Ellipsis, *dst)], array[(Ellipsis, *src)]
    if threads <= 1 or target.shape[0] < 2:
        np.copyto(target, source)
        return out
    bounds = np.linspace(0, target.shape[0], min(2 * threads, target.shape[0]) + 1).astype(int)
    jobs = [_copy_pool(threads).submit(np.copyto, target[a:b], source[a:b])
            for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    for job in jobs:
        job.result()
    return out


def dose_biased_centers(dose_gy: np.ndarray, rx_dose_gy: float, threshold: float) -> np.ndarray:
    """Voxel indices (N, 3) where ``dose_gy > threshold * rx_dose_gy``.

    dose_gy: (X, Y, Z) in Gy; threshold: fraction of the prescription (e.g. 0.1).
    Coordinates are stored in the smallest integer type that holds them (int16 for volumes
    under 32768 voxels per axis) to keep the per-case cache small.
    """
    if np.ndim(dose_gy) != 3:
        raise ValueError(f"dose_gy must have shape (X, Y, Z), got shape {np.shape(dose_gy)}")
    centers = np.argwhere(np.asarray(dose_gy) > threshold * float(rx_dose_gy))
    dtype = np.int16 if max(np.shape(dose_gy)) <= np.iinfo(np.int16).max else np.int32
    return centers.astype(dtype)


def sdf_padding(masks_sdf: np.ndarray) -> np.ndarray:
    """Padding value per channel of (S, X, Y, Z) SDFs: ``SDF_OUTSIDE``, or ``SDF_ABSENT`` for a
    structure that is absent (its SDF is ``SDF_ABSENT`` everywhere, so one voxel tells)."""
    return np.where(np.asarray(masks_sdf[:, 0, 0, 0]) == SDF_ABSENT, SDF_ABSENT, SDF_OUTSIDE).astype(np.float32)


def _case_rx_dose(case) -> float:
    rx = getattr(case, "rx_dose_gy", None)
    return float(rx if rx is not None else case.metadata["rx_dose_gy"])


def _case_id(case) -> str:
    case_id = getattr(case, "case_id", None)
    return str(case_id if case_id is not None else case.metadata["case_id"])


class PatchSampler:
    """Draws training patches from a case (``Case`` or any object with the same attributes).

    patch_size: int or 3 ints (voxels). patches_per_volume: patches per ``sample`` call.
    dose_biased_fraction: probability (independent per patch) that a patch is centred on a
    uniformly chosen voxel with dose > ``dose_threshold`` x Rx; the other patches are centred on
    a uniformly chosen voxel of the whole volume. rng: numpy Generator, int seed or None.
    max_cached_cases: the dose-biased centre lists of this many cases are kept (least recently
    used dropped). read_threads: threads copying each patch out of the case (``extract_patch``).
    extras: names of ``case.extras`` volumes (X, Y, Z), e.g. ``possible_dose_mask``, cut out of
    the case too, each as a (1, p, p, p) float32 tensor under its own name (0 outside the case).
    A case object with a callable ``precomputed_centers(threshold)`` (the
    memory-mapped store) supplies its own list and is not cached.

    ``sample(case)`` returns a list of dicts: ``ct`` (1, p, p, p), ``masks_sdf`` (S, p, p, p),
    ``dose`` (1, p, p, p) in Gy (float32 tensors), one entry per name in ``extras``, ``center``
    (3 ints, voxel indices in the case) and ``dose_biased`` (bool: True when the centre came from
    the high-dose list; a patch whose coin chose the dose rule falls back to a uniform centre, and
    reports False, when no voxel reaches the threshold).
    """

    def __init__(self, patch_size=128, patches_per_volume: int = 4, dose_biased_fraction: float = 0.5,
                 dose_threshold: float = 0.1, rng=None, max_cached_cases: int = 512,
                 read_threads: int = READ_THREADS, extras: Sequence[str] = ()):
        self.patch_size = _as_size3(patch_size)
        if not isinstance(patches_per_volume, (int, np.integer)) or isinstance(patches_per_volume, bool) \
                or patches_per_volume < 1:
            raise ValueError(f"patches_per_volume must be a positive integer, got {patches_per_volume!r}")
        if not 0.0 <= float(dose_biased_fraction) <= 1.0:
            raise ValueError(f"dose_biased_fraction must be in [0, 1], got {dose_biased_fraction!r}")
        if not float(dose_threshold) >= 0.0:
            raise ValueError(f"dose_threshold must be a non-negative fraction of Rx, got {dose_threshold!r}")
        if not isinstance(max_cached_cases, (int, np.integer)) or max_cached_cases < 0:
            raise ValueError(f"max_cached_cases must be a non-negative integer, got {max_cached_cases!r}")
        if not isinstance(read_threads, (int, np.integer)) or isinstance(read_threads, bool) or read_threads < 1:
            raise ValueError(f"read_threads must be a positive integer, got {read_threads!r}")
        self.read_threads = int(read_threads)
        if isinstance(extras, str) or not all(isinstance(name, str) for name in extras):
            raise TypeError(f"extras must be a sequence of case-extra names, got {extras!r}")
        clashing = [name for name in extras if name in PATCH_KEYS]
        if clashing:
            raise ValueError(f"extras must not be named like the patch entries {PATCH_KEYS}, got {clashing}")
        self.extras = tuple(extras)
        self.patches_per_volume = int(patches_per_volume)
        self.dose_biased_fraction = float(dose_biased_fraction)
        self.dose_threshold = float(dose_threshold)
        self.max_cached_cases = int(max_cached_cases)
        self.rng = _as_rng(rng)
        self._centers_cache: "OrderedDict[str, np.ndarray]" = OrderedDict()

    def high_dose_centers(self, case) -> np.ndarray:
        """(N, 3) voxel indices with dose > threshold x Rx (from the case, the cache, or computed)."""
        provider = getattr(case, "precomputed_centers", None)
        if callable(provider):
            centers = provider(self.dose_threshold)
            if centers is not None:
                return np.asarray(centers)
        key = _case_id(case)
        if key in self._centers_cache:
            self._centers_cache.move_to_end(key)
            return self._centers_cache[key]
        centers = dose_biased_centers(case.dose, _case_rx_dose(case), self.dose_threshold)
        if self.max_cached_cases > 0:
            self._centers_cache[key] = centers
            while len(self._centers_cache) > self.max_cached_cases:
                self._centers_cache.popitem(last=False)
        return centers

    def _draw_center(self, shape, centers: Optional[np.ndarray], biased: bool) -> Tuple[Tuple[int, int, int], bool]:
        """(center, whether it came from the high-dose list); uniform when the list is empty."""
        if biased and centers is not None and len(centers) > 0:
            return tuple(int(c) for c in centers[self.rng.integers(len(centers))]), True
        return tuple(int(self.rng.integers(n)) for n in shape), False

    def sample(self, case) -> List[Dict[str, Union[torch.Tensor, Tuple[int, int, int], bool]]]:
        """``patches_per_volume`` new random patches of ``case`` (see the class docstring)."""
        if case.dose is None:
            raise ValueError(f"case {_case_id(case)} has no dose; training patches need the reference dose")
        for name in self.extras:
            volume = case.extras.get(name)
            if volume is None or tuple(np.shape(volume)) != tuple(case.ct.shape):
                found = "missing" if volume is None else f"of shape {tuple(np.shape(volume))}"
                raise ValueError(f"case {_case_id(case)}: extra '{name}' must be a volume of the CT's shape "
                                 f"{tuple(case.ct.shape)}, found {found}")
        shape = tuple(case.ct.shape)
        biased = self.rng.random(self.patches_per_volume) < self.dose_biased_fraction
        centers = self.high_dose_centers(case) if biased.any() else None
        patches = []
        for is_biased in biased:
            center, used_dose = self._draw_center(shape, centers, bool(is_biased))
            patches.append(self._extract(case, center, used_dose))
        return patches

    def _extract(self, case, center, biased: bool) -> dict:
        def tensor(array, fill):
            patch = extract_patch(array, center, self.patch_size, fill, self.read_threads)
            patch = patch.astype(np.float32, copy=False)
            return torch.from_numpy(patch[None] if patch.ndim == 3 else patch)
        patch = {
            "ct": tensor(case.ct, CT_AIR),
            "masks_sdf": tensor(case.masks_sdf, sdf_padding(case.masks_sdf)),
            "dose": tensor(case.dose, DOSE_FILL),
            "center": center,
            "dose_biased": biased,
        }
        for name in self.extras:
            patch[name] = tensor(case.extras[name], EXTRA_FILL)
        return patch
