"""OpenKBP (AAPM 2020 head-and-neck challenge) patients: reading and conversion to cases.

An OpenKBP patient is a folder ``pt_<N>/`` of sparse CSV files (``ct.csv``, ``dose.csv``,
``possible_dose_mask.csv``, one file per contoured structure) and ``voxel_dimensions.csv``.
Every volume is 128 x 128 x 128. In the files' own axis order:

* axis 0 runs anterior -> posterior,
* axis 1 runs patient right -> left,
* axis 2 runs superior -> inferior.

``read_openkbp_patient`` returns the arrays exactly in that order (no reorientation);
``openkbp_to_case`` transposes them to the package convention (X = right->left = OpenKBP
axis 1, Y = ant->post = axis 0, Z = sup->inf = axis 2) and builds a ``Case``;
``import_openkbp`` converts a whole folder tree of patients to case files.

Sparse CSV format: a header line ``,data``, then one line ``<flat_index>,<value>`` per
non-zero voxel (C-order flat index into the 128^3 volume). Mask files leave the value empty
(``745924,``); every voxel not listed is 0.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from tqdm.auto import tqdm

from .case import Case, CaseFormatError, save_case
from .constraints import HEAD_NECK, constraint_vector
from .conventions import SDF_CLIP_MM, SDF_OUTSIDE, mask_to_sdf, normalize_ct
from .structures import HEAD_NECK_STRUCTURES

OPENKBP_SHAPE: Tuple[int, int, int] = (128, 128, 128)
OPENKBP_RX_DOSE_GY = 70.0
# Stored CT values are HU + 1024; the organisers recommend clipping them to [0, 4095].
CT_STORED_OFFSET = 1024.0
CT_STORED_MAX = 4095.0
# OpenKBP axis order (ant->post, right->left, sup->inf) -> package order (X, Y, Z).
OPENKBP_TO_XYZ_AXES: Tuple[int, int, int] = (1, 0, 2)
SPARSE_HEADER = ",data"


class OpenKBPFormatError(ValueError):
    """An OpenKBP file breaks the format; the message names the file and, where known, the line."""

    def __init__(self, path, line: Optional[int], problem: str):
        self.path, self.line, self.problem = str(path), line, problem
        where = self.path + (f", line {line}" if line is not None else "")
        super().__init__(f"{where}: {problem}")


@dataclass
class OpenKBPPatient:
    """One OpenKBP patient, arrays in the ORIGINAL OpenKBP axis order (ant->post, right->left, sup->inf).

    ct: (128, 128, 128) float32 stored CT values (HU + 1024; 0 outside the listed voxels).
    dose: (128, 128, 128) float32 dose in Gy, or None when the folder has no ``dose.csv``.
    possible_dose_mask: (128, 128, 128) bool, the voxels where dose may be non-zero.
    structures: name -> (128, 128, 128) bool mask, for the structures with a CSV file.
    voxel_dimensions_mm: voxel size in mm along OpenKBP axes 0, 1, 2.
    folder: the patient folder it was read from.
    """
    patient_id: str
    ct: np.ndarray
    dose: Optional[np.ndarray]
    possible_dose_mask: np.ndarray
    structures: Dict[str, np.ndarray]
    voxel_dimensions_mm: Tuple[float, float, float]
    folder: Optional[Path] = None


# --------------------------------------------------------------------------- sparse CSV


def _check_shape(shape) -> Tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be a tuple of positive ints, got {shape!r}") from None
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"shape must be a tuple of positive ints, got {shape!r}")
    return shape


def _first_data_line(path: Path) -> Tuple[Optional[str], int]:
    """Check the header; return the first non-blank data line (or None) and its line number."""
    with open(path, "r", encoding="utf-8", errors="replace", newline=None) as f:
        header = f.readline().strip()
        if header != SPARSE_HEADER:
            raise OpenKBPFormatError(path, 1, f"bad header {header[:40]!r}, expected {SPARSE_HEADER!r}")
        for number, line in enumerate(f, start=2):
            if line.strip():
                return line.strip(), number
    return None, 0


def _locate_error(path: Path, n_voxels: int, is_mask: bool) -> OpenKBPFormatError:
    """Slow line-by-line scan that finds the first bad line (used only when the fast parse failed)."""
    previous = -1
    with open(path, "r", encoding="utf-8", errors="replace", newline=None) as f:
        f.readline()
        for number, raw in enumerate(f, start=2):
            line = raw.strip()
            if not line:
                continue
            fields = line.split(",")
            if len(fields) != 2:
                return OpenKBPFormatError(path, number, f"expected '<index>,<value>', got {line[:60]!r}")
            index_text, value_text = fields[0].strip(), fields[1].strip()
            try:
                index = int(index_text)
            except ValueError:
                return OpenKBPFormatError(path, number, f"index {index_text[:40]!r} is not an integer")
            if not 0 <= index < n_voxels:
                return OpenKBPFormatError(path, number, f"index {index} out of range [0, {n_voxels})")
            if is_mask and value_text:
                return OpenKBPFormatError(path, number, f"value {value_text[:40]!r} in a mask file "
                                          "(the first data line has an empty value)")
            if not is_mask:
                if not value_text:
                    return OpenKBPFormatError(path, number, "empty value in a value file "
                                              "(the first data line has a value)")
                try:
                    value = float(value_text)
                except ValueError:
                    return OpenKBPFormatError(path, number, f"value {value_text[:40]!r} is not a number")
                if not math.isfinite(value):
                    return OpenKBPFormatError(path, number, f"value {value_text!r} is not finite")
            if index <= previous:
                return OpenKBPFormatError(path, number, f"index {index} after index {previous}: indices must be "
                                          "strictly increasing (each voxel listed once, in C order)")
            previous = index
    return OpenKBPFormatError(path, None, "could not be parsed as a sparse CSV")


_EMPTY_VALUE = re.compile(rb",[ \t\r]*(?:\n|\Z)")  # a comma, then only whitespace up to the line's end


def _all_values_empty(path: Path, n_lines: int) -> bool:
    """True when each of the ``n_lines`` data lines of a mask file is ``<index>,`` (one comma, at the
    end, trailing whitespace allowed)."""
    body = path.read_bytes().split(b"\n", 1)[-1]
    return body.count(b",") == n_lines and len(_EMPTY_VALUE.findall(body)) == n_lines


def read_sparse_csv(path, shape: Sequence[int] = OPENKBP_SHAPE) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Read one OpenKBP sparse CSV.

    Returns ``(indices, values)``: indices int64 (N,) C-order flat indices into ``shape``;
    values float32 (N,), or None for a mask file (value column empty). A file with only the
    header gives empty indices and values None.
    Raises OpenKBPFormatError naming the file and line for a bad header, a non-integer,
    out-of-range or not strictly increasing index, or a non-numeric value.
    """
    path = Path(path)
    n_voxels = int(np.prod(_check_shape(shape)))
    if not path.is_file():
        raise OpenKBPFormatError(path, None, "file not found")
    first, _ = _first_data_line(path)
    if first is None:
        return np.zeros(0, dtype=np.int64), None
    is_mask = first.endswith(",")
    try:
        if is_mask:
            indices = np.loadtxt(path, delimiter=",", skiprows=1, usecols=0, dtype=np.int64, ndmin=1)
            values = None
        else:
            table = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=1,
                               dtype=[("index", np.int64), ("value", np.float64)])
            indices, values = table["index"], table["value"]
    except ValueError:
        raise _locate_error(path, n_voxels, is_mask) from None
    bad_range = indices.size and (indices.min() < 0 or indices.max() >= n_voxels)
    bad_order = indices.size > 1 and not (np.diff(indices) > 0).all()
    bad_values = not np.isfinite(values).all() if values is not None else not _all_values_empty(path, indices.size)
    if bad_range or bad_order or bad_values:
        raise _locate_error(path, n_voxels, is_mask)
    return indices, (values.astype(np.float32) if values is not None else None)


def write_sparse_csv(path, volume: np.ndarray, mask: bool = False, value_format: str = "%.3f") -> None:
    """Write ``volume`` as an OpenKBP sparse CSV (non-zero voxels in C order).

    mask: write a mask file (empty value column) listing the True / non-zero voxels.
    """
    flat = np.asarray(volume).ravel()
    indices = np.flatnonzero(flat)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(SPARSE_HEADER + "\n")
        if mask:
            f.writelines(f"{i},\n" for i in indices.tolist())
        else:
            values = flat[indices].tolist()
            f.writelines(f"{i},{value_format % v}\n" for i, v in zip(indices.tolist(), values))


def _dense_volume(path: Path, shape, dtype, required_voxels: bool = False) -> np.ndarray:
    indices, values = read_sparse_csv(path, shape)
    if required_voxels and not indices.size:
        raise OpenKBPFormatError(path, None, "lists no voxel (only the header); expected the non-zero voxels")
    volume = np.zeros(int(np.prod(shape)), dtype=dtype)
    if dtype == np.bool_:
        volume[indices] = True
    else:
        if values is None and indices.size:
            raise OpenKBPFormatError(path, 2, "value column is empty (a mask file), expected values")
        if values is not None:
            volume[indices] = values
    return volume.reshape(shape)


def read_voxel_dimensions(path) -> Tuple[float, float, float]:
    """``voxel_dimensions.csv``: three floats (mm), one per line, in OpenKBP axis order."""
    path = Path(path)
    if not path.is_file():
        raise OpenKBPFormatError(path, None, "file not found")
    values: List[float] = []
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        for number, raw in enumerate(f, start=1):
            text = raw.strip()
            if not text:
                continue
            try:
                value = float(text)
            except ValueError:
                raise OpenKBPFormatError(path, number, f"{text[:40]!r} is not a number") from None
            if not (math.isfinite(value) and value > 0):
                raise OpenKBPFormatError(path, number, f"voxel size {text!r} must be a positive number (mm)")
            values.append(value)
    if len(values) != 3:
        raise OpenKBPFormatError(path, None, f"expected 3 voxel sizes (mm), found {len(values)}")
    return tuple(values)  # type: ignore[return-value]


def read_openkbp_patient(folder, shape: Sequence[int] = OPENKBP_SHAPE) -> OpenKBPPatient:
    """Read one patient folder (``pt_<N>/``) with arrays in the original OpenKBP axis order.

    Required files: ``ct.csv``, ``possible_dose_mask.csv``, ``voxel_dimensions.csv``;
    ``dose.csv`` is optional (``dose`` is None without it), but a ``dose.csv`` or
    ``possible_dose_mask.csv`` that lists no voxel is an error; structure files from
    ``HEAD_NECK_STRUCTURES`` are read when present. Raises OpenKBPFormatError naming the
    file (and line) of the first problem.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise OpenKBPFormatError(folder, None, "patient folder not found")
    shape = _check_shape(shape)
    ct = _dense_volume(folder / "ct.csv", shape, np.float32)
    dose_path = folder / "dose.csv"
    dose = _dense_volume(dose_path, shape, np.float32, required_voxels=True) if dose_path.is_file() else None
    possible = _dense_volume(folder / "possible_dose_mask.csv", shape, np.bool_, required_voxels=True)
    structures = {name: _dense_volume(folder / f"{name}.csv", shape, np.bool_)
                  for name in HEAD_NECK_STRUCTURES if (folder / f"{name}.csv").is_file()}
    spacing = read_voxel_dimensions(folder / "voxel_dimensions.csv")
    return OpenKBPPatient(patient_id=folder.name, ct=ct, dose=dose, possible_dose_mask=possible,
                          structures=structures, voxel_dimensions_mm=spacing, folder=folder)


# --------------------------------------------------------------------------- conversion


def to_xyz(volume: np.ndarray) -> np.ndarray:
    """OpenKBP axis order (ant->post, right->left, sup->inf) -> package (X, Y, Z), contiguous."""
    return np.ascontiguousarray(np.transpose(volume, OPENKBP_TO_XYZ_AXES))


def stored_ct_to_hu(stored: np.ndarray) -> np.ndarray:
    """OpenKBP stored CT values -> HU (clipped to the recommended [0, 4095] first), float32."""
    return (np.clip(stored, 0.0, CT_STORED_MAX) - CT_STORED_OFFSET).astype(np.float32)


def structure_sdf(mask: np.ndarray, spacing_mm: Sequence[float], clip_mm: float = SDF_CLIP_MM) -> np.ndarray:
    """``conventions.mask_to_sdf`` computed on a crop around the mask; same values, several times faster.

    The SDF is clipped at ``clip_mm``, so outside the mask's bounding box grown by ``clip_mm``
    (plus one voxel) every value is SDF_OUTSIDE; inside that box the distance transforms are
    exact, because the nearest voxel of the other side always lies in the box.
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask_to_sdf(mask, spacing_mm, clip_mm)
    crop = []
    for axis, spacing in enumerate(spacing_mm):
        other_axes = tuple(a for a in range(mask.ndim) if a != axis)
        occupied = np.flatnonzero(mask.any(axis=other_axes))
        margin = int(math.ceil(clip_mm / float(spacing))) + 1
        crop.append(slice(max(occupied[0] - margin, 0), min(occupied[-1] + 1 + margin, mask.shape[axis])))
    sdf = np.full(mask.shape, SDF_OUTSIDE, dtype=np.float32)
    sdf[tuple(crop)] = mask_to_sdf(mask[tuple(crop)], spacing_mm, clip_mm)
    return sdf


def openkbp_to_case(patient: OpenKBPPatient, case_id: Optional[str] = None, split: Optional[str] = None) -> Case:
    """Convert an ``OpenKBPPatient`` to a validated ``Case`` in the package's X/Y/Z convention.

    CT: stored values clipped to [0, 4095], HU = value - 1024, then ``normalize_ct``. Dose in Gy.
    Structures ``HEAD_NECK_STRUCTURES`` as SDFs (``structure_sdf``, equal to
    ``conventions.mask_to_sdf``; an absent structure is SDF_ABSENT everywhere). The possible-dose
    mask is kept as ``extras['possible_dose_mask']`` (uint8, X, Y, Z). ``case_id`` defaults to the
    folder name (``pt_2``), ``split`` to the name of its parent folder (e.g. ``train-pats``).
    """
    if not isinstance(patient, OpenKBPPatient):
        raise TypeError(f"patient must be an OpenKBPPatient, got {type(patient).__name__}")
    ax0, ax1, ax2 = patient.voxel_dimensions_mm
    spacing_xyz = [float(ax1), float(ax0), float(ax2)]
    sdfs, present = [], []
    for name in HEAD_NECK_STRUCTURES:
        mask = patient.structures.get(name)
        mask = to_xyz(mask) if mask is not None else np.zeros(to_xyz(patient.ct).shape, dtype=bool)
        if mask.any():
            present.append(name)
        sdfs.append(structure_sdf(mask, spacing_xyz))
    if split is None:
        split = patient.folder.parent.name if patient.folder is not None else ""
    metadata = {
        "case_id": case_id or patient.patient_id,
        "structures": list(HEAD_NECK_STRUCTURES),
        "spacing_mm": spacing_xyz,
        "rx_dose_gy": OPENKBP_RX_DOSE_GY,
        "site": "head_neck",
        "source": "openkbp",
        "split": split,
        "structures_present": present,
        "possible_dose_mask": "extras['possible_dose_mask'] (uint8, X, Y, Z): voxels where dose may be "
                              "non-zero; the OpenKBP dose score is evaluated inside it",
        "ct_source": "OpenKBP stored values clipped to [0, 4095], HU = value - 1024",
    }
    case = Case(
        ct=normalize_ct(stored_ct_to_hu(to_xyz(patient.ct))),
        dose=to_xyz(patient.dose).astype(np.float32) if patient.dose is not None else None,
        masks_sdf=np.stack(sdfs).astype(np.float32),
        constraints=constraint_vector(HEAD_NECK, present, rx_dose_gy=OPENKBP_RX_DOSE_GY),
        metadata=metadata,
        extras={"possible_dose_mask": to_xyz(patient.possible_dose_mask).astype(np.uint8)},
    )
    return case.validate(source=patient.folder or patient.patient_id)


# --------------------------------------------------------------------------- import


@dataclass
class ImportReport:
    """Outcome of ``import_openkbp``: written and skipped case files, and failures (folder -> message)."""
    written: List[Path] = field(default_factory=list)
    skipped: List[Path] = field(default_factory=list)
    failed: Dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        lines = [f"{len(self.written)} written, {len(self.skipped)} skipped (already converted), "
                 f"{len(self.failed)} failed"]
        lines += [f"  FAILED {folder}: {message}" for folder, message in self.failed.items()]
        return "\n".join(lines)


def find_openkbp_patients(src) -> List[Path]:
    """Patient folders under ``src`` (recursively): folders named ``pt_*`` holding a ``ct.csv``.

    Sorted by split folder, then by patient number (pt_2 before pt_11).
    """
    src = Path(src)
    if not src.is_dir():
        raise ValueError(f"src: OpenKBP folder {src} does not exist or is not a folder")
    candidates = [src] if src.name.startswith("pt_") else []
    candidates += [p for p in src.rglob("pt_*") if p.is_dir()]
    found = {p for p in candidates if (p / "ct.csv").is_file()}

    def order(p: Path):
        number = p.name[3:]
        return (str(p.parent), int(number) if number.isdigit() else math.inf, p.name)

    return sorted(found, key=order)


def case_path_for(patient_folder: Path, src: Path, dst: Path) -> Path:
    """``dst`` mirrors the split folders under ``src``: src/train-pats/pt_2 -> dst/train-pats/pt_2.npz."""
    patient_folder, src = Path(patient_folder), Path(src)
    relative_parent = patient_folder.parent.relative_to(src) if patient_folder != src else Path()
    return Path(dst) / relative_parent / f"{patient_folder.name}.npz"


def import_openkbp(src, dst, force: bool = False, progress: bool = True) -> ImportReport:
    """Convert every OpenKBP patient under ``src`` to a case file under ``dst``.

    The split folders are kept: ``src/train-pats/pt_2/`` -> ``dst/train-pats/pt_2.npz`` (so a
    training run can point at one split); the split name is also in the case metadata.
    Patients are converted one at a time (one patient in memory), each file written
    atomically. Existing outputs are skipped unless ``force``. A bad patient is recorded in
    ``report.failed`` with the error (naming file and line) and the others go on.
    """
    src, dst = Path(src), Path(dst)
    folders = find_openkbp_patients(src)
    report = ImportReport()
    bar = tqdm(folders, desc="import OpenKBP", unit="patient", disable=not progress)
    for folder in bar:
        out = case_path_for(folder, src, dst)
        if out.is_file() and not force:
            report.skipped.append(out)
            continue
        try:
            case = openkbp_to_case(read_openkbp_patient(folder))
            save_case(out, case)
        except (OpenKBPFormatError, CaseFormatError, OSError) as e:
            report.failed[str(folder)] = str(e)
            continue
        report.written.append(out)
    return report
