"""Memory-mapped case store: read one patch of a big case without decompressing the whole file.

A full prostate case (512 x 512 x 256, 10 channels) is about 2.7 GB of float32; cutting one
128^3 patch from a compressed ``.npz`` decompresses all of it. The store converts each case
once into a folder of uncompressed ``.npy`` arrays that are opened with ``mmap_mode="r"``,
so a patch read touches only the pages of that patch.

Layout (one folder per case, named after its case_id)::

    store_dir/
      <case_id>/
        ct.npy  dose.npy  masks_sdf.npy  constraints.npy     (as in the case file; no dose.npy if absent)
        extra_<name>.npy                                     (each extras array, e.g. possible_dose_mask)
        centers_<threshold>.npy                              (int (N, 3) dose-biased patch centres)
        metadata.json                                        (the case metadata, unchanged)
        source.json                                          (source path, size, mtime: the idempotence key)

Each case folder is built in a hidden temporary folder and renamed into place, so a failed
or interrupted build never leaves a half case behind (hidden ``.tmp-*`` folders are ignored).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
from tqdm.auto import tqdm

from .case import Case, CaseFormatError, find_cases, load_case
from .fileio import atomic_write, atomic_write_json

STORE_FORMAT_VERSION = 1
DEFAULT_CACHE_NAME = ".vmat_store"
DEFAULT_THRESHOLDS = (0.1,)
_CORE_ARRAYS = ("ct", "dose", "masks_sdf", "constraints")
_EXTRA_PREFIX = "extra_"

PathsOrFolder = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]


def centers_filename(threshold: float) -> str:
    """File name of the centres precomputed at ``threshold`` (fraction of Rx), e.g. ``centers_0.1.npy``."""
    threshold = float(threshold)
    if not 0.0 <= threshold <= 10.0:
        raise ValueError(f"threshold must be a fraction of the prescription in [0, 10], got {threshold}")
    return f"centers_{threshold:g}.npy"


def _folder_name(case_id: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "_", case_id)
    return "_" + name if not name or name.startswith(".") else name


# --------------------------------------------------------------------------- reading


@dataclass
class StoreCase(Case):
    """A ``Case`` whose arrays are read-only ``np.memmap`` views of a store folder.

    Everything that works on a Case (``case_id``, ``structures``, ``spacing_mm``,
    ``rx_dose_gy``, ``shape``, ``mask``) works here; slicing reads only the slice from disk.
    Pickling sends the folder path, not the data (DataLoader workers re-open the memmaps).
    """
    folder: Optional[Path] = None

    def precomputed_centers(self, threshold: float) -> Optional[np.ndarray]:
        """Stored dose-biased centres (N, 3) (integer voxel indices) for ``threshold``, else None."""
        path = self.folder / centers_filename(threshold)
        return np.load(path, allow_pickle=False) if path.is_file() else None

    def stored_thresholds(self) -> List[float]:
        """Thresholds whose centres are stored, ascending."""
        return sorted(float(p.stem[len("centers_"):]) for p in self.folder.glob("centers_*.npy"))

    def to_case(self) -> Case:
        """A plain in-memory Case (copies every array into RAM)."""
        return Case(ct=np.array(self.ct), dose=None if self.dose is None else np.array(self.dose),
                    masks_sdf=np.array(self.masks_sdf), constraints=np.array(self.constraints),
                    metadata=dict(self.metadata), extras={k: np.array(v) for k, v in self.extras.items()})

    def __reduce__(self):
        return (open_store_case, (self.folder,))


def _memmap(path: Path) -> np.ndarray:
    return np.load(path, mmap_mode="r", allow_pickle=False)


def _read_store_metadata(folder: Path) -> dict:
    """``folder/metadata.json`` as a dict with a ``case_id``; CaseFormatError naming the file otherwise."""
    path = folder / "metadata.json"
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        problem = f"not valid JSON ({e})"
    else:
        if isinstance(metadata, dict) and "case_id" in metadata:
            return metadata
        problem = "expected a JSON object with a 'case_id'"
    raise CaseFormatError(path, None, f"{problem}; rebuild this case (vmat-build-store --force, or "
                                      "build_store(..., force=True)) or delete its folder")


def open_store_case(folder) -> StoreCase:
    """Open one case folder of a store (arrays memory-mapped read-only)."""
    folder = Path(folder)
    meta_path = folder / "metadata.json"
    if not meta_path.is_file():
        raise CaseFormatError(folder, "metadata", "not a store case folder (no metadata.json)")
    for key in ("ct", "masks_sdf", "constraints"):
        if not (folder / f"{key}.npy").is_file():
            raise CaseFormatError(folder, key, f"missing {key}.npy in the store case folder")
    metadata = _read_store_metadata(folder)
    dose_path = folder / "dose.npy"
    extras = {p.stem[len(_EXTRA_PREFIX):]: _memmap(p) for p in sorted(folder.glob(f"{_EXTRA_PREFIX}*.npy"))}
    return StoreCase(ct=_memmap(folder / "ct.npy"), dose=_memmap(dose_path) if dose_path.is_file() else None,
                     masks_sdf=_memmap(folder / "masks_sdf.npy"), constraints=_memmap(folder / "constraints.npy"),
                     metadata=metadata, extras=extras, folder=folder)


def _read_source_record(folder: Path) -> Optional[dict]:
    try:
        return json.loads((folder / "source.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


class CaseStore:
    """The cases of one store folder, by case_id.

    >>> store = CaseStore("data/.vmat_store")
    >>> case = store.open(store.case_ids[0])      # StoreCase, arrays memory-mapped
    """

    def __init__(self, store_dir):
        self.store_dir = Path(store_dir)
        if not self.store_dir.is_dir():
            raise ValueError(f"store_dir: {self.store_dir} is not a folder (build it with build_store)")
        self._folders: Dict[str, Path] = {}
        for folder in sorted(self.store_dir.iterdir()):
            if folder.name.startswith(".") or not (folder / "metadata.json").is_file():
                continue
            case_id = str(_read_store_metadata(folder)["case_id"])
            self._folders[case_id] = folder

    def __len__(self) -> int:
        return len(self._folders)

    def __contains__(self, case_id) -> bool:
        return case_id in self._folders

    @property
    def case_ids(self) -> List[str]:
        return sorted(self._folders)

    def folder(self, case_id: str) -> Path:
        try:
            return self._folders[case_id]
        except KeyError:
            raise KeyError(f"case_id '{case_id}' is not in the store {self.store_dir} "
                           f"({len(self)} cases)") from None

    def open(self, case_id: str) -> StoreCase:
        return open_store_case(self.folder(case_id))

    def open_all(self) -> List[StoreCase]:
        return [self.open(case_id) for case_id in self.case_ids]


# --------------------------------------------------------------------------- building


@dataclass
class StoreBuildReport:
    """``case_dirs``: the store folder of each source, in input order; ``built`` / ``skipped``: sources."""
    store_dir: Path
    case_dirs: List[Path] = field(default_factory=list)
    built: List[Path] = field(default_factory=list)
    skipped: List[Path] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{len(self.case_dirs)} cases in {self.store_dir}: {len(self.built)} converted, "
                f"{len(self.skipped)} already up to date")


def _resolve_sources(case_paths_or_folder: PathsOrFolder) -> List[Path]:
    if isinstance(case_paths_or_folder, (str, os.PathLike)):
        source = Path(case_paths_or_folder)
        if source.is_dir():
            return find_cases(source)
        if source.is_file():
            return [source]
        raise ValueError(f"case_paths_or_folder: {source} is neither a folder nor a case file")
    paths = [Path(p) for p in case_paths_or_folder]
    for path in paths:
        if not path.is_file():
            raise ValueError(f"case_paths_or_folder: case file {path} not found")
    return paths


def _source_record(source: Path) -> dict:
    stat = source.stat()
    return {"source": str(source.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "format_version": STORE_FORMAT_VERSION}


def _up_to_date(folder: Path, record: dict) -> bool:
    stored = _read_source_record(folder)
    return stored is not None and all(stored.get(k) == v for k, v in record.items())


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def _save_centers(folder: Path, dose: np.ndarray, rx_dose_gy: float, threshold: float, atomic: bool) -> None:
    from .patches import dose_biased_centers  # deferred: patches imports torch, reading a store does not need it

    centers = np.asarray(dose_biased_centers(dose, rx_dose_gy, threshold)).reshape(-1, 3)
    target = folder / centers_filename(threshold)
    if not atomic:
        _save_npy(target, centers)
        return
    atomic_write(target, lambda f: np.lib.format.write_array(f, centers, allow_pickle=False))


def _write_case_folder(case: Case, folder: Path, record: dict, thresholds: Iterable[float]) -> None:
    folder.mkdir(parents=True)
    _save_npy(folder / "ct.npy", case.ct)
    if case.dose is not None:
        _save_npy(folder / "dose.npy", case.dose)
    _save_npy(folder / "masks_sdf.npy", case.masks_sdf)
    _save_npy(folder / "constraints.npy", case.constraints)
    for name, array in case.extras.items():
        _save_npy(folder / f"{_EXTRA_PREFIX}{name}.npy", array)
    if case.dose is not None:
        for threshold in thresholds:
            _save_centers(folder, case.dose, case.rx_dose_gy, threshold, atomic=False)
    atomic_write_json(folder / "metadata.json", case.metadata)  # fsynced before the folder is renamed
    atomic_write_json(folder / "source.json", record)


def _install(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` folder to ``final``, replacing an older version of it."""
    old_parent = None
    if final.exists():
        old_parent = Path(tempfile.mkdtemp(prefix=f".old-{final.name}-", dir=final.parent))
        os.rename(final, old_parent / "case")
    try:
        os.rename(tmp, final)
    except OSError:
        if old_parent is not None and not final.exists():
            os.rename(old_parent / "case", final)
        raise
    finally:
        if old_parent is not None:
            shutil.rmtree(old_parent, ignore_errors=True)


def _build_one(source: Path, store_dir: Path, record: dict, thresholds: Sequence[float]) -> Path:
    case = load_case(source, require_dose=False)  # validates the whole case
    final = store_dir / _folder_name(case.case_id)
    existing = _read_source_record(final) if final.exists() else None
    if existing is not None and existing.get("source") != record["source"] and Path(existing["source"]).is_file():
        raise ValueError(f"{source}: case_id '{case.case_id}' is already in the store {store_dir} "
                         f"from {existing['source']}; case ids must be unique")
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=store_dir))
    try:
        _write_case_folder(case, tmp / "case", record, thresholds)
        _install(tmp / "case", final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _add_missing_centers(folder: Path, thresholds: Sequence[float]) -> None:
    missing = [t for t in thresholds if not (folder / centers_filename(t)).is_file()]
    if not missing or not (folder / "dose.npy").is_file():
        return
    case = open_store_case(folder)
    for threshold in missing:
        _save_centers(folder, case.dose, case.rx_dose_gy, threshold, atomic=True)


def _existing_folders_by_source(store_dir: Path) -> Dict[str, Path]:
    found = {}
    for folder in store_dir.iterdir():
        record = _read_source_record(folder) if not folder.name.startswith(".") else None
        if record is not None:
            found[record.get("source")] = folder
    return found


def build_store(case_paths_or_folder: PathsOrFolder, store_dir, thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                force: bool = False, progress: bool = True) -> StoreBuildReport:
    """Convert case files (``.npz``) into a memory-mapped store; returns a StoreBuildReport.

    case_paths_or_folder: a folder (its ``*.npz`` files), one case file, or a list of them.
    thresholds: dose thresholds (fraction of Rx) whose dose-biased patch centres are stored.
    A case is converted again only when its source file's size or modification time changed
    (or ``force``); centres for new thresholds are added to up-to-date cases in place.
    Each case is validated (``load_case``) and written atomically.
    """
    sources = _resolve_sources(case_paths_or_folder)
    thresholds = [float(t) for t in thresholds]
    for threshold in thresholds:
        centers_filename(threshold)  # validates
    store_dir = Path(store_dir)
    store_dir.mkdir(parents=True, exist_ok=True)
    by_source = _existing_folders_by_source(store_dir)
    report = StoreBuildReport(store_dir=store_dir)
    for source in tqdm(sources, desc="build case store", unit="case", disable=not progress):
        record = _source_record(source)
        folder = by_source.get(record["source"])
        if folder is not None and not force and _up_to_date(folder, record):
            _add_missing_centers(folder, thresholds)
            report.skipped.append(source)
        else:
            previous = folder
            folder = _build_one(source, store_dir, record, thresholds)
            if previous is not None and previous != folder:  # the source's case_id changed
                shutil.rmtree(previous, ignore_errors=True)
            by_source[record["source"]] = folder
            report.built.append(source)
        report.case_dirs.append(folder)
    return report


def open_cases(paths_or_dir: PathsOrFolder, cache_dir=None, thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
               progress: bool = False) -> List[StoreCase]:
    """Case files -> StoreCases, converting them into a store on first use.

    paths_or_dir: a folder of ``.npz`` case files, one file, or a list of files.
    cache_dir: the store folder; default ``<folder of the case files>/.vmat_store`` (for a list,
        the folder of each file). Conversion happens once; later calls only check size/mtime.
    Returns StoreCases in the order of the files.
    """
    sources = _resolve_sources(paths_or_dir)
    if cache_dir is not None:
        groups = {Path(cache_dir): sources}
    else:
        groups: Dict[Path, List[Path]] = {}
        for source in sources:
            groups.setdefault(source.parent / DEFAULT_CACHE_NAME, []).append(source)
    folder_of: Dict[Path, Path] = {}
    for store_dir, group in groups.items():
        try:
            report = build_store(group, store_dir, thresholds=thresholds, progress=progress)
        except PermissionError as e:
            raise PermissionError(f"cannot write the case store {store_dir} ({e}); pass cache_dir= "
                                  "a writable folder") from None
        folder_of.update(zip(group, report.case_dirs))
    return [open_store_case(folder_of[source]) for source in sources]
