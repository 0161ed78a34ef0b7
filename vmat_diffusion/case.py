"""The case format: one patient in one ``.npz`` (the data contract of the whole package).

Keys (axes X, Y, Z as in ``vmat_diffusion.conventions``):

==============  ==================  ====================================================
key             dtype, shape        meaning
==============  ==================  ====================================================
``ct``          float32 (X, Y, Z)   normalised CT (``conventions.normalize_ct``)
``dose``        float32 (X, Y, Z)   dose in Gy
``masks_sdf``   float32 (S, X, Y, Z) scaled signed distance per structure, negative inside,
                                    in [-1, 1] (``conventions.mask_to_sdf``); a structure
                                    not contoured is SDF_ABSENT (+2) everywhere
``constraints`` float32 (K,)        conditioning vector (``constraints.constraint_vector``)
``metadata``    JSON string         at least ``case_id``, ``structures`` (S names, channel
                                    order), ``spacing_mm`` (X, Y, Z), ``rx_dose_gy``
(any other)     numeric array       kept in ``Case.extras`` (e.g. ``possible_dose_mask``);
                                    a 3-D one must have the CT's shape
==============  ==================  ====================================================
"""
from __future__ import annotations

import io
import json
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from .conventions import SDF_ABSENT, SDF_CLIP_MM, is_stored_mask
from .fileio import atomic_write

REQUIRED_ARRAYS = ("ct", "dose", "masks_sdf", "constraints")
REQUIRED_METADATA = ("case_id", "structures", "spacing_mm", "rx_dose_gy")


class CaseFormatError(ValueError):
    """A case file (or Case object) breaks the case format; the message names file and key."""

    def __init__(self, path, key: Optional[str], problem: str):
        self.path, self.key, self.problem = str(path), key, problem
        where = f"{self.path}" + (f", key '{key}'" if key else "")
        super().__init__(f"{where}: {problem}")


@dataclass
class Case:
    """One patient. Arrays are numpy, axes (X, Y, Z) right->left, ant->post, sup->inf.

    ``dose`` may be None only for cases loaded with ``require_dose=False`` (inference on a
    patient without a reference plan).
    """
    ct: np.ndarray
    dose: Optional[np.ndarray]
    masks_sdf: np.ndarray
    constraints: np.ndarray
    metadata: dict
    extras: Dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def case_id(self) -> str:
        return str(self.metadata["case_id"])

    @property
    def structures(self) -> List[str]:
        return list(self.metadata["structures"])

    @property
    def spacing_mm(self) -> Tuple[float, float, float]:
        return tuple(float(s) for s in self.metadata["spacing_mm"])

    @property
    def rx_dose_gy(self) -> float:
        return float(self.metadata["rx_dose_gy"])

    @property
    def shape(self) -> Tuple[int, int, int]:
        return tuple(self.ct.shape)

    def mask(self, structure: str) -> np.ndarray:
        """Boolean (X, Y, Z) mask of one structure (inside = SDF < 0)."""
        try:
            channel = self.structures.index(structure)
        except ValueError:
            raise KeyError(f"case {self.case_id}: no structure '{structure}' "
                           f"(has {self.structures})") from None
        return self.masks_sdf[channel] < 0

    def present_structures(self) -> List[str]:
        """Structures with a non-empty mask."""
        return [name for name, sdf in zip(self.structures, self.masks_sdf) if (sdf < 0).any()]

    def validate(self, source="<Case>") -> "Case":
        """Check every rule of the format; raise one CaseFormatError naming the key."""
        _validate(self, source)
        return self


def _check_float_array(path, key, arr, ndim) -> np.ndarray:
    if not isinstance(arr, np.ndarray):
        raise CaseFormatError(path, key, f"expected a numpy array, got {type(arr).__name__}")
    if arr.dtype.kind != "f":
        raise CaseFormatError(path, key, f"expected a float32 array (other float dtypes are converted), "
                                         f"got dtype {arr.dtype}")
    if arr.ndim != ndim:
        raise CaseFormatError(path, key, f"expected {ndim} dimensions, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        bad = int(arr.size - np.isfinite(arr).sum())
        raise CaseFormatError(path, key, f"contains {bad} NaN or Inf values")
    return arr.astype(np.float32, copy=False)


def _json_value(value):
    """numpy scalars -> ``.item()``, numpy arrays -> ``.tolist()``, inside dicts, lists and tuples too."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return value


def _validate_metadata(path, meta) -> dict:
    if not isinstance(meta, dict):
        raise CaseFormatError(path, "metadata", f"expected a JSON object, got {type(meta).__name__}")
    meta = {key: _json_value(value) for key, value in meta.items()}
    for key, value in meta.items():
        try:
            json.dumps({key: value})
        except (TypeError, ValueError) as e:
            raise CaseFormatError(path, "metadata", f"field {key!r} cannot be written as JSON ({e}); metadata "
                                  "values must be str, numbers, bool, None, lists or dicts") from None
    for key in REQUIRED_METADATA:
        if key not in meta:
            raise CaseFormatError(path, "metadata", f"missing field '{key}' "
                                  f"(required: {', '.join(REQUIRED_METADATA)})")
    structures = meta["structures"]
    if not isinstance(structures, (list, tuple)) or not all(isinstance(s, str) for s in structures):
        raise CaseFormatError(path, "metadata", "'structures' must be a list of names")
    if len(set(structures)) != len(structures):
        raise CaseFormatError(path, "metadata", f"'structures' has duplicate names: {structures}")
    spacing = meta["spacing_mm"]
    try:
        spacing = [float(s) for s in spacing]
    except (TypeError, ValueError):
        raise CaseFormatError(path, "metadata", f"'spacing_mm' must be 3 numbers, got {spacing!r}") from None
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise CaseFormatError(path, "metadata",
                              f"'spacing_mm' must be 3 finite positive numbers (mm), got {meta['spacing_mm']!r}")
    try:
        rx = float(meta["rx_dose_gy"])
    except (TypeError, ValueError):
        rx = float("nan")
    if not (math.isfinite(rx) and rx > 0):
        raise CaseFormatError(path, "metadata", f"'rx_dose_gy' must be a positive number (Gy), got {meta['rx_dose_gy']!r}")
    meta["structures"] = list(structures)
    meta["spacing_mm"] = spacing
    meta["rx_dose_gy"] = rx
    meta["case_id"] = str(meta["case_id"])
    return meta


def _validate(case: Case, path) -> None:
    case.metadata = _validate_metadata(path, case.metadata)
    case.ct = _check_float_array(path, "ct", case.ct, 3)
    if case.dose is not None:
        case.dose = _check_float_array(path, "dose", case.dose, 3)
        if case.dose.shape != case.ct.shape:
            raise CaseFormatError(path, "dose", f"shape {case.dose.shape} differs from ct {case.ct.shape}")
    case.masks_sdf = _check_float_array(path, "masks_sdf", case.masks_sdf, 4)
    if case.masks_sdf.shape[1:] != case.ct.shape:
        raise CaseFormatError(path, "masks_sdf",
                              f"spatial shape {case.masks_sdf.shape[1:]} differs from ct {case.ct.shape}")
    n_struct = len(case.metadata["structures"])
    if case.masks_sdf.shape[0] != n_struct:
        raise CaseFormatError(path, "masks_sdf", f"has {case.masks_sdf.shape[0]} channels but metadata "
                              f"'structures' names {n_struct}: {case.metadata['structures']}")
    _check_sdf_values(path, case.masks_sdf, case.metadata["structures"])
    case.constraints = _check_float_array(path, "constraints", case.constraints, 1)
    for key, arr in case.extras.items():
        if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "biuf":
            got = f"dtype {arr.dtype}" if isinstance(arr, np.ndarray) else type(arr).__name__
            raise CaseFormatError(path, key, f"extra arrays must be numeric (bool, integer or float) numpy "
                                             f"arrays, got {got}")
        if arr.ndim == 3 and arr.shape != case.ct.shape:
            raise CaseFormatError(path, key, f"shape {arr.shape} differs from ct {case.ct.shape} "
                                             "(a 3-D extra array is a volume on the CT's grid)")


def _check_sdf_values(path, masks_sdf: np.ndarray, structures) -> None:
    """Each channel is SDF_ABSENT everywhere, or a scaled SDF: values in [-1, 1] and not a mask
    stored as numbers (``conventions.is_stored_mask``; 1 everywhere is SDF_OUTSIDE, an SDF away
    from its structure). One min, max and count of zeros per channel."""
    flat = masks_sdf.reshape(masks_sdf.shape[0], -1)
    if flat.shape[1] == 0:
        return
    lows, highs = flat.min(axis=1), flat.max(axis=1)
    for channel, (low, high) in enumerate(zip(lows.tolist(), highs.tolist())):
        mask_like = is_stored_mask(flat[channel])
        if low == high == SDF_ABSENT or (-1.0 <= low <= high <= 1.0 and not mask_like):
            continue
        detail = " (only 0s and 1s, or many exact 0s: a binary or resampled mask, not an SDF)" if mask_like else ""
        raise CaseFormatError(
            path, "masks_sdf",
            f"channel {channel} ('{structures[channel]}') has values in [{low:g}, {high:g}]{detail}; expected a "
            f"scaled signed distance in [-1, 1] (mm / {SDF_CLIP_MM:g}, negative inside), or "
            f"{SDF_ABSENT:g} everywhere for a structure that is not contoured. Binary masks must be converted "
            "first: vmat_diffusion.conventions.mask_to_sdf(mask, spacing_mm)")


def _parse_metadata_json(path, text) -> dict:
    """JSON text (str, or utf-8 bytes) -> the parsed value; CaseFormatError naming the key otherwise."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(text)
    except UnicodeDecodeError as e:
        raise CaseFormatError(path, "metadata", f"bytes are not UTF-8 text ({e})") from None
    except json.JSONDecodeError as e:
        raise CaseFormatError(path, "metadata", f"is not valid JSON ({e})") from None


def read_metadata_array(path, raw: np.ndarray, allow_pickle: bool = False):
    """The ``metadata`` array of a case file -> its parsed value (a dict for a valid file).

    A str or bytes (utf-8) array holds JSON text; with ``allow_pickle`` an object array holds a
    pickled dict or JSON string. Raises CaseFormatError naming ``path`` and the key otherwise.
    """
    if raw.dtype.kind in "US":
        parts = [raw.item()] if raw.ndim == 0 else raw.ravel().tolist()
        return _parse_metadata_json(path, b"".join(parts) if raw.dtype.kind == "S" else "".join(parts))
    if raw.dtype.hasobject and allow_pickle:
        value = raw.item() if raw.ndim == 0 else raw
        if isinstance(value, (str, bytes)):
            return _parse_metadata_json(path, value)
        return value
    raise CaseFormatError(path, "metadata", f"expected a JSON string, got an array of dtype {raw.dtype}")


def load_case(path, allow_pickle: bool = False, require_dose: bool = True) -> Case:
    """Read and validate one case file.

    allow_pickle: accept older files whose ``metadata`` is a pickled dict. Off by default,
        because unpickling an npz from elsewhere can run arbitrary code.
    require_dose: when False a file without ``dose`` loads with ``Case.dose = None``.
    Raises CaseFormatError (naming file and key) for any breach of the format.
    """
    path = Path(path)
    if not path.is_file():
        raise CaseFormatError(path, None, "file not found")
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic == b"\x93NUMPY":
        raise CaseFormatError(path, None, "expected an .npz archive of named arrays, got a single .npy array")
    if not zipfile.is_zipfile(path):
        raise CaseFormatError(path, None, "not a complete .npz archive (no zip directory: truncated, or "
                                          "not the zip of named .npy arrays that numpy.savez and save_case write)")
    try:
        npz = np.load(path, allow_pickle=allow_pickle)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise CaseFormatError(path, None, f"not a readable .npz archive ({type(e).__name__}: {e})") from None
    arrays = {}
    with npz:
        for key in npz.files:
            try:
                arrays[key] = npz[key]
            except ValueError as e:
                if "allow_pickle" in str(e):
                    raise CaseFormatError(
                        path, key, "holds a pickled Python object; refused because loading a pickle "
                        "can run code. If you trust this file, convert it once in Python: "
                        "save_case(path, load_case(path, allow_pickle=True)) rewrites it without pickles") from None
                raise CaseFormatError(path, key, f"unreadable array ({e})") from None
            except (zipfile.BadZipFile, OSError, EOFError, KeyError) as e:
                raise CaseFormatError(path, key, f"truncated or corrupt entry ({type(e).__name__}: {e})") from None
    required = REQUIRED_ARRAYS if require_dose else tuple(k for k in REQUIRED_ARRAYS if k != "dose")
    for key in required + ("metadata",):
        if key not in arrays:
            raise CaseFormatError(path, key, f"missing (file has: {', '.join(sorted(arrays)) or 'nothing'})")
    meta = read_metadata_array(path, arrays.pop("metadata"), allow_pickle)
    case = Case(ct=arrays.pop("ct"), dose=arrays.pop("dose", None), masks_sdf=arrays.pop("masks_sdf"),
                constraints=arrays.pop("constraints"), metadata=meta, extras=arrays)
    _validate(case, path)
    return case


def case_to_bytes(case: Case, compress: bool = True) -> bytes:
    """Serialise a validated case to npz bytes (metadata as a JSON string, no pickles)."""
    arrays = {"ct": case.ct, "masks_sdf": case.masks_sdf, "constraints": case.constraints,
              "metadata": np.array(json.dumps(case.metadata))}
    if case.dose is not None:
        arrays["dose"] = case.dose
    for key, arr in case.extras.items():
        if key in arrays:
            raise CaseFormatError("<Case>", key, "extra array name clashes with a required key")
        arrays[key] = arr
    buf = io.BytesIO()
    (np.savez_compressed if compress else np.savez)(buf, **arrays)
    return buf.getvalue()


def save_case(path, case: Case, compress: bool = True) -> Path:
    """Validate ``case`` and write it atomically to ``path`` (temporary file, fsync, rename)."""
    path = Path(path)
    case.validate(source=path)
    data = case_to_bytes(case, compress=compress)
    atomic_write(path, lambda f: f.write(data))
    return path


def find_cases(folder) -> List[Path]:
    """Sorted ``*.npz`` case files directly inside ``folder``."""
    return sorted(Path(folder).glob("*.npz"))
