"""Cases -> split -> patches -> augmentation -> micro-batches, all seeded.

Randomness without hidden state
-------------------------------
Nothing random in the data path keeps state across epochs: the case order of epoch ``e`` on
rank ``r`` comes from ``SeedSequence([seed, e, r])`` and the patches and augmentation of the
``i``-th item of that epoch from ``SeedSequence([seed, e, r, i])``. A resumed run therefore
draws exactly the patches the uninterrupted run would have drawn, whatever the number of
DataLoader workers, and no generator object has to be pickled into a checkpoint.

Items and batches
-----------------
One dataset item is one case: its ``patches_per_volume`` patches, each augmented, stacked to
``ct`` (P, 1, p, p, p), ``masks_sdf`` (P, S, p, p, p), ``dose`` (P, 1, p, p, p) in Gy and
``constraints`` (P, K), plus ``loss_mask`` (P, 1, p, p, p), the extra's values, when the dataset is given a
loss-mask extra (``TrainConfig.loss_mask``). ``micro_batches`` cuts the stream of patches into batches of
``batch_size`` patches (the last one of an epoch may be smaller; a batch can hold patches of
two cases when ``batch_size`` does not divide ``patches_per_volume``). Whole volumes are read
per item and not kept in RAM unless ``cache_cases`` is set (or the memory-mapped store is used).
"""
from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..case import Case, CaseFormatError, find_cases, load_case
from ..patches import PatchSampler


def read_only_tensor(array: np.ndarray) -> torch.Tensor:
    """float32 tensor sharing ``array``'s memory, also when that is read-only (the store's memory
    maps: torch warns there, because writing to the tensor would fail; callers only read it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.as_tensor(np.asarray(array, dtype=np.float32))


def derive_seed(*values: int) -> int:
    """A 63-bit seed that depends on every value (numpy SeedSequence hashing)."""
    state = np.random.SeedSequence([int(v) for v in values]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def item_rng(seed: int, epoch: int, rank: int, position: int) -> np.random.Generator:
    """The generator for the ``position``-th item of ``epoch`` on ``rank``."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, rank, position]))


# --------------------------------------------------------------------------- scanning and splitting


@dataclass
class CaseInfo:
    """What the trainer needs to know about one case file without keeping its arrays."""
    path: Path
    case_id: str
    shape: Tuple[int, int, int]
    structures: List[str]
    constraint_dim: int
    spacing_mm: Tuple[float, float, float]
    rx_dose_gy: float
    extras: Tuple[str, ...] = ()   # names of the case's extra arrays


@dataclass
class CaseCatalog:
    """All cases of a data folder, checked to share structures and constraint size."""
    cases: List[CaseInfo]
    structures: List[str]
    constraint_dim: int

    def __len__(self) -> int:
        return len(self.cases)


def scan_cases(data_dir, progress: bool = False, name: str = "data_dir") -> CaseCatalog:
    """Load and validate every ``*.npz`` case in ``data_dir`` (``name``: the setting named in errors).

    Raises FileNotFoundError for a missing folder, ValueError for a folder without cases or
    cases that disagree on structures / constraint size, CaseFormatError for a broken case.
    """
    folder = Path(data_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{name}: {folder} is not a folder")
    paths = find_cases(folder)
    if not paths:
        raise ValueError(f"{name}: no case files (*.npz) in {folder}")
    from tqdm.auto import tqdm
    infos: List[CaseInfo] = []
    for path in tqdm(paths, desc="checking cases", disable=not progress):
        case = load_case(path)
        info = CaseInfo(path=path, case_id=case.case_id, shape=case.shape, structures=case.structures,
                        constraint_dim=int(case.constraints.shape[0]), spacing_mm=case.spacing_mm,
                        rx_dose_gy=case.rx_dose_gy, extras=tuple(sorted(case.extras)))
        if infos:
            _check_consistent(infos[0], info)
        infos.append(info)
    ids = [info.case_id for info in infos]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"{name}: duplicate case_id(s) {duplicates} in {folder}")
    return CaseCatalog(cases=infos, structures=list(infos[0].structures), constraint_dim=infos[0].constraint_dim)


def _check_consistent(first: CaseInfo, other: CaseInfo) -> None:
    if other.structures != first.structures:
        raise CaseFormatError(other.path, "metadata", f"structures {other.structures} differ from "
                              f"{first.structures} of {first.path.name}; all cases must share one channel order")
    if other.constraint_dim != first.constraint_dim:
        raise CaseFormatError(other.path, "constraints", f"has {other.constraint_dim} entries, "
                              f"{first.path.name} has {first.constraint_dim}")


@dataclass
class CaseSplit:
    train: List[CaseInfo]
    val: List[CaseInfo]
    test: List[CaseInfo] = field(default_factory=list)

    def ids(self) -> Dict[str, List[str]]:
        return {name: [c.case_id for c in getattr(self, name)] for name in ("train", "val", "test")}


def split_counts(n_cases: int, val_split: float, test_split: float) -> Tuple[int, int, int]:
    """(train, val, test) counts: val and test get ``round(n x fraction)``, at least 1 each when
    their fraction is > 0; training must keep at least one case."""
    n_val = max(1, round(n_cases * val_split)) if val_split > 0 else 0
    n_test = max(1, round(n_cases * test_split)) if test_split > 0 else 0
    n_train = n_cases - n_val - n_test
    if n_train < 1:
        raise ValueError(f"data_dir: {n_cases} case(s) are too few for val_split={val_split} and "
                         f"test_split={test_split} (needs {n_val} validation + {n_test} test + 1 training case)")
    return n_train, n_val, n_test


def split_cases(cases: Sequence[CaseInfo], val_split: float = 0.1, test_split: float = 0.1,
                seed: int = 42) -> CaseSplit:
    """Deterministic split: cases sorted by case_id, shuffled with ``seed``, cut into
    test, validation and training parts (in that order); each part sorted by case_id."""
    shuffled = _seeded_order(cases, seed)
    n_train, n_val, n_test = split_counts(len(shuffled), val_split, test_split)
    return CaseSplit(train=_by_id(shuffled[n_test + n_val:]), val=_by_id(shuffled[n_test:n_test + n_val]),
                     test=_by_id(shuffled[:n_test]))


def _seeded_order(cases: Sequence[CaseInfo], seed: int) -> List[CaseInfo]:
    """The cases sorted by case_id, then shuffled with ``seed`` (independent of the input order)."""
    ordered = sorted(cases, key=lambda c: c.case_id)
    return [ordered[i] for i in np.random.default_rng(seed).permutation(len(ordered))]


def _by_id(part: Sequence[CaseInfo]) -> List[CaseInfo]:
    return sorted(part, key=lambda c: c.case_id)


def split_with_validation(cases: Sequence[CaseInfo], val_cases: Sequence[CaseInfo], test_split: float = 0.0,
                          seed: int = 42) -> CaseSplit:
    """Split with a fixed validation set: ``val_cases`` validate; ``test_split`` of ``cases``
    (drawn with ``seed`` as in ``split_cases``) is held out; the rest trains. Parts sorted by case_id."""
    shuffled = _seeded_order(cases, seed)
    n_test = max(1, round(len(shuffled) * test_split)) if test_split > 0 else 0
    if len(shuffled) - n_test < 1:
        raise ValueError(f"data_dir: {len(shuffled)} training case(s) are too few for test_split={test_split} "
                         f"(needs {n_test} test + 1 training case)")
    return CaseSplit(train=_by_id(shuffled[n_test:]), val=_by_id(val_cases), test=_by_id(shuffled[:n_test]))


def select_cases(cases: Sequence[CaseInfo], ids: Sequence[str], data_dir) -> Tuple[List[CaseInfo], List[CaseInfo]]:
    """(cases whose id is in ``ids``, the others); one error naming every id not found."""
    wanted = list(dict.fromkeys(str(i) for i in ids))
    by_id = {c.case_id: c for c in cases}
    missing = [i for i in wanted if i not in by_id]
    if missing:
        raise ValueError(f"val_ids: case id(s) {missing} not found in data_dir {data_dir} "
                         f"(it has {sorted(by_id)[:10]}{' ...' if len(by_id) > 10 else ''})")
    chosen = set(wanted)
    return [by_id[i] for i in wanted], [c for c in cases if c.case_id not in chosen]


def check_same_channels(catalog: CaseCatalog, other: CaseCatalog, other_name: str) -> None:
    """A second folder of cases (e.g. ``val_dir``) must match the training cases' channels and ids must not clash."""
    first = catalog.cases[0]
    for info in other.cases:
        _check_consistent(first, info)
    clash = sorted({c.case_id for c in catalog.cases} & {c.case_id for c in other.cases})
    if clash:
        raise ValueError(f"{other_name}: case id(s) {clash} are also in data_dir; a case cannot both train "
                         "and validate")


# --------------------------------------------------------------------------- reading cases


class CaseReader:
    """Case ``i`` of a list of files: read from the ``.npz`` each time (default), from RAM
    (``cache=True``: all loaded once) or memory-mapped from the case store (``store=True``)."""

    def __init__(self, paths: Sequence[Path], cache: bool = False, store: bool = False):
        self.paths = [Path(p) for p in paths]
        self._cases: Optional[List[Case]] = None
        if store:
            from ..store import open_cases
            self._cases = list(open_cases(self.paths))
        elif cache:
            self._cases = [load_case(p) for p in self.paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Case:
        if self._cases is not None:
            return self._cases[index]
        return load_case(self.paths[index])


# --------------------------------------------------------------------------- training patches


class EpochSampler(Sampler):
    """Yields ``(epoch, position, case_index)`` keys for one rank's share of an epoch.

    The case order is a permutation of all training cases drawn from (seed, epoch); rank ``r``
    takes positions ``r::world_size`` of it (padded so all ranks get the same count). Call
    ``set_epoch`` before iterating.
    """

    def __init__(self, n_cases: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        if n_cases < 1:
            raise ValueError("EpochSampler needs at least one training case")
        self.n_cases, self.seed, self.rank, self.world_size, self.shuffle = n_cases, seed, rank, world_size, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return math.ceil(self.n_cases / self.world_size)

    def __iter__(self) -> Iterator[Tuple[int, int, int]]:
        if self.shuffle:
            order = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch])).permutation(self.n_cases)
        else:
            order = np.arange(self.n_cases)
        padded = [int(order[i % self.n_cases]) for i in range(len(self) * self.world_size)]
        for position, case_index in enumerate(padded[self.rank::self.world_size]):
            yield self.epoch, position, case_index


class PatchDataset(Dataset):
    """Item ``(epoch, position, case_index)`` -> the case's augmented patches, stacked (see module doc)."""

    def __init__(self, reader: CaseReader, structures: Sequence[str], patch_size: int, patches_per_volume: int,
                 seed: int, rank: int = 0, augment: bool = True, loss_mask: Optional[str] = None):
        self.reader = reader
        self.structures = list(structures)
        self.seed, self.rank, self.augment = int(seed), int(rank), bool(augment)
        self.loss_mask = loss_mask
        self.sampler = PatchSampler(patch_size=patch_size, patches_per_volume=patches_per_volume,
                                    extras=() if loss_mask is None else (loss_mask,))

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, key) -> Dict[str, torch.Tensor]:
        epoch, position, case_index = key
        rng = item_rng(self.seed, epoch, self.rank, position)
        case = self.reader[case_index]
        self.sampler.rng = rng
        patches = self.sampler.sample(case)
        if self.augment:
            from ..augment import augment
            patches = [augment(patch, self.structures, rng) for patch in patches]
        constraints = read_only_tensor(case.constraints)
        item = {
            "ct": torch.stack([p["ct"] for p in patches]),
            "masks_sdf": torch.stack([p["masks_sdf"] for p in patches]),
            "dose": torch.stack([p["dose"] for p in patches]),
            "constraints": constraints.expand(len(patches), -1).clone(),
        }
        if self.loss_mask is not None:
            item["loss_mask"] = torch.stack([p[self.loss_mask] for p in patches])
        return item


def _seed_worker(worker_id: int) -> None:
    """Seed a DataLoader worker's global RNGs from the seed torch gives it (itself derived from
    the loader's seeded generator); the patches themselves use per-item generators."""
    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)
    random.seed(seed)


def make_train_loader(dataset: PatchDataset, sampler: EpochSampler, num_workers: int, seed: int,
                      pin_memory: bool = False) -> DataLoader:
    """A DataLoader of case items (no automatic batching; see ``micro_batches``) with seeded workers."""
    return DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=num_workers,
                      worker_init_fn=_seed_worker, generator=torch.Generator().manual_seed(seed),
                      pin_memory=pin_memory, persistent_workers=num_workers > 0)


def micro_batches(items, batch_size: int) -> Iterator[Dict[str, torch.Tensor]]:
    """Cut a stream of stacked-patch items into batches of ``batch_size`` patches (last may be smaller).

    Every item must have the same keys (``PatchDataset``'s: ct, masks_sdf, dose, constraints and,
    when it makes one, loss_mask)."""
    pending: Dict[str, List[torch.Tensor]] = {}
    count = 0
    for item in items:
        for key in item:
            pending.setdefault(key, []).append(item[key])
        count += item["ct"].shape[0]
        while count >= batch_size:
            joined = {key: torch.cat(values) for key, values in pending.items()}
            yield {key: value[:batch_size] for key, value in joined.items()}
            pending = {key: [value[batch_size:]] for key, value in joined.items()}
            count -= batch_size
    if count > 0:
        yield {key: torch.cat(values) for key, values in pending.items()}


def micro_batches_per_epoch(items_per_rank: int, patches_per_volume: int, batch_size: int) -> int:
    return math.ceil(items_per_rank * patches_per_volume / batch_size)
