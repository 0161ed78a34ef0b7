"""``TrainConfig``: every setting of a training run, with the training guide's defaults.

Settings the guide does not fix (chosen here, documented on the field):

* ``exp_name = "vmat_dose"``, ``cooling_interval = 10`` micro-batches, ``cooling_pause = 0.5`` s,
  ``epoch_pause = 2.0`` s (the guide's 2 s between epochs; only with ``gpu_cooling``).
* ``use_simple_unet`` is accepted for compatibility with the guide's command lines and is always
  True: ``SimpleUNet3D`` is the package's only diffusion backbone (ignored for ``model="baseline"``).
* ``patience = 20`` validations without a better validation MAE (0 turns early stopping off);
  with ``val_every = 1`` that is 20 epochs.
* ``min_lr = 1e-6``: the floor of the cosine decay.
* ``precision = "auto"``: bf16 autocast on CUDA GPUs that support it and on CPUs with AMX
  tiles, fp16 autocast + GradScaler on older GPUs, fp32 otherwise. CPUs with AVX512-BF16 but no
  AMX get fp32: measured there (idle 2-core Xeon, BaselineUNet3D base 16, patch 64) bf16 steps
  took as long as fp32 steps (1.26 vs 1.22 s batch 1, 2.53 vs 2.66 s batch 2), so fp32's accuracy
  comes for free.
* ``ema = None``: EMA on for ``ddpm``, off for ``baseline``; decay 0.999.
* ``val_overlap = None``: a quarter of the patch size (32 voxels for 128^3 patches).
* Validation cases: by default ``val_split`` of ``data_dir``'s cases drawn with ``seed``. An
  explicit set replaces the draw: ``val_dir`` (a second folder of cases; every case there
  validates) or ``val_ids`` (case ids in ``data_dir``). ``test_split`` then holds out that
  fraction of the remaining cases (0 trains on all of them).
* ``loss = "mse"``: the training guide's MSE; ``"l1"`` trains on the mean absolute error
  instead (for the baseline, the quantity the OpenKBP dose score measures; for ddpm, L1 on the
  noise). The negative-dose penalty is added in both cases.
* ``loss_mask = None``: the data term over all voxels of a patch. The name of a case extra (a
  (X, Y, Z) mask, e.g. OpenKBP's ``possible_dose_mask``) averages it over the voxels inside
  instead, as the dose score does; every case must have that extra. Validation loss likewise.
* ``val_every = 1``: validate every N epochs (and always after the last epoch); early-stopping
  ``patience`` counts validations (as Lightning's), so ``val_every = 5, patience = 4`` stops after
  4 validations, 20 epochs, without improvement.
* ``max_minutes = None``: a time budget; training stops before an epoch that would end past it
  (estimated from the mean epoch time, earlier sessions of a resumed run included), after
  validating and checkpointing the last epoch. The learning-rate schedule still follows
  ``epochs``: choose ``epochs`` to fit the budget for a full cosine decay.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from dataclasses import dataclass
from typing import List, Optional

from ..fileio import non_folder_on_path

MODELS = ("baseline", "ddpm")
LOSSES = ("mse", "l1")
SCHEDULES = ("cosine", "linear")
STRATEGIES = ("auto", "ddp")
PRECISIONS = ("auto", "32", "bf16", "16")
PRECISION_ALIASES = {"32-true": "32", "fp32": "32", "bf16-mixed": "bf16", "16-mixed": "16", "fp16": "16"}


@dataclass
class TrainConfig:
    # data
    data_dir: str = ""
    val_split: float = 0.1
    test_split: float = 0.1
    patch_size: int = 128
    patches_per_volume: int = 4
    augment: bool = True
    num_workers: int = 2
    cache_cases: bool = False          # load the training cases into RAM once (off: read per item)
    use_store: bool = False            # read cases through vmat_diffusion.store (memory-mapped)
    rx_dose_gy: float = 70.0           # dose scale: the baseline regresses dose / rx_dose_gy
    val_dir: str = ""                  # a folder of validation cases (replaces the val_split draw)
    val_ids: Optional[List[str]] = None  # case ids in data_dir to validate on (replaces the draw)
    # model
    model: str = "baseline"
    base_channels: int = 48
    levels: int = 4
    timesteps: int = 1000
    schedule: str = "cosine"
    use_simple_unet: bool = True
    # optimisation
    epochs: int = 200
    batch_size: int = 2                # patches per micro-batch
    lr: float = 1e-4
    min_lr: float = 1e-6
    weight_decay: float = 1e-2
    warmup_epochs: float = 0.0
    accumulate_grad_batches: int = 1
    gradient_clip: float = 1.0
    penalty_weight: float = 0.1        # weight of the negative-dose penalty
    loss: str = "mse"                  # "mse" or "l1" (module docstring)
    loss_mask: Optional[str] = None    # case extra the data term is averaged over (module docstring)
    precision: str = "auto"
    ema: Optional[bool] = None
    ema_decay: float = 0.999
    patience: int = 20
    skip_nonfinite: bool = False
    # validation
    val_overlap: Optional[int] = None
    ddim_steps: int = 50
    gamma_subsample: int = 4
    max_val_cases: Optional[int] = None
    val_every: int = 1                 # epochs between validations (the last epoch always validates)
    # run
    log_dir: str = "./runs"
    exp_name: str = "vmat_dose"
    seed: int = 42
    resume: Optional[str] = None
    max_minutes: Optional[float] = None  # time budget of the whole run (module docstring)
    device: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    deterministic: bool = False
    gpu_cooling: bool = False
    cooling_interval: int = 10         # micro-batches between cooling pauses
    cooling_pause: float = 0.5         # seconds
    epoch_pause: float = 2.0           # seconds between epochs when gpu_cooling is on
    progress: Optional[bool] = None    # tqdm bars; None: only when stderr is a terminal

    # ------------------------------------------------------------------ derived values
    @property
    def use_ema(self) -> bool:
        return self.model == "ddpm" if self.ema is None else bool(self.ema)

    @property
    def explicit_validation(self) -> bool:
        """True when ``val_dir`` or ``val_ids`` fixes the validation cases."""
        return bool(self.val_dir) or bool(self.val_ids)

    @property
    def overlap(self) -> int:
        return self.patch_size // 4 if self.val_overlap is None else int(self.val_overlap)

    def to_dict(self) -> dict:
        """Plain JSON-able dict of all fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """Build from a dict (e.g. a checkpoint's ``config``), ignoring unknown keys."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    # ------------------------------------------------------------------ checks
    def validate(self) -> "TrainConfig":
        """Raise one ValueError naming the first setting that is out of range."""
        self.precision = PRECISION_ALIASES.get(str(self.precision), str(self.precision))
        _choice("model", self.model, MODELS)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("strategy", self.strategy, STRATEGIES)
        _choice("precision", self.precision, PRECISIONS)
        _choice("loss", self.loss, LOSSES)
        if self.loss_mask is not None and (not isinstance(self.loss_mask, str) or not self.loss_mask.strip()):
            raise ValueError(f"loss_mask: expected the name of a case extra (e.g. possible_dose_mask), "
                             f"got {self.loss_mask!r}")
        if not self.data_dir:
            raise ValueError("data_dir: a folder of case .npz files is required")
        for name in ("epochs", "batch_size", "patch_size", "patches_per_volume", "base_channels",
                     "accumulate_grad_batches", "devices", "num_nodes", "ddim_steps",
                     "gamma_subsample", "cooling_interval", "val_every"):
            _positive_int(name, getattr(self, name))
        _positive_int("levels", self.levels)
        _positive_int("timesteps", self.timesteps)
        for name in ("num_workers", "patience", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: expected an integer >= 0, got {value!r}")
        for name in ("lr", "rx_dose_gy"):
            _positive_float(name, getattr(self, name))
        for name in ("min_lr", "weight_decay", "warmup_epochs", "penalty_weight", "cooling_pause",
                     "epoch_pause"):
            _non_negative_float(name, getattr(self, name))
        if self.gradient_clip is not None:
            _positive_float("gradient_clip", self.gradient_clip)
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr: must not exceed lr ({self.lr}), got {self.min_lr}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay: expected a number in (0, 1), got {self.ema_decay!r}")
        for name in ("val_split", "test_split"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
                raise ValueError(f"{name}: expected a fraction in [0, 1), got {value!r}")
        if self.val_dir and self.val_ids:
            raise ValueError("val_dir, val_ids: give one of them (a folder of validation cases, or case ids "
                             "in data_dir), not both")
        if self.val_ids is not None:
            if isinstance(self.val_ids, str) or not all(isinstance(i, str) and i for i in self.val_ids):
                raise ValueError(f"val_ids: expected a list of case ids, got {self.val_ids!r}")
            if not self.val_ids:
                raise ValueError("val_ids: expected at least one case id, got an empty list")
        if not self.explicit_validation:  # val_split matters only for the drawn split
            if self.val_split <= 0.0:
                raise ValueError(f"val_split: validation needs at least one case, got {self.val_split}")
            if self.val_split + self.test_split >= 1.0:
                raise ValueError(f"val_split + test_split must leave cases for training, "
                                 f"got {self.val_split} + {self.test_split}")
        multiple = 2 ** (self.levels - 1)
        if self.patch_size % multiple:
            raise ValueError(f"patch_size: must be divisible by 2**(levels-1) = {multiple} "
                             f"for a {self.levels}-level U-Net, got {self.patch_size}")
        if not 0 <= self.overlap < self.patch_size:
            raise ValueError(f"val_overlap: expected 0 <= overlap < patch_size ({self.patch_size}), "
                             f"got {self.overlap}")
        if self.max_val_cases is not None:
            _positive_int("max_val_cases", self.max_val_cases)
        if self.max_minutes is not None:
            _positive_float("max_minutes", self.max_minutes)
        if self.model == "ddpm" and self.ddim_steps > self.timesteps:
            raise ValueError(f"ddim_steps: must not exceed timesteps ({self.timesteps}), got {self.ddim_steps}")
        if not self.exp_name or any(sep in self.exp_name for sep in ("/", "\\")):
            raise ValueError(f"exp_name: expected a plain folder name, got {self.exp_name!r}")
        blocking = non_folder_on_path(Path(self.log_dir) / self.exp_name)
        if blocking is not None:
            raise ValueError(f"log_dir: {blocking} exists and is not a folder (runs are written to "
                             f"log_dir/exp_name/)")
        return self


def _choice(name, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(choices)}, got {value!r}")


def _positive_int(name, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")


def _positive_float(name, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a positive number, got {value!r}")


def _non_negative_float(name, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: expected a number >= 0, got {value!r}")
