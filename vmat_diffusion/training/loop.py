"""The training loop, top to bottom: cases -> patches -> augmentation -> step -> validation ->
checkpoint -> logs.

Pieces a research loop can reuse on their own:

* ``train_step(model, micro_batches, optimizer, objective, ...)``: one optimizer step over one
  or more micro-batches (gradient accumulation), autocast, GradScaler, clipping at
  ``clip`` after ``unscale_``, EMA update; returns a ``StepResult`` and never steps on a
  non-finite loss or (without fp16 loss scaling, whose scaler skips such steps) gradient.
* ``validate(model, cases, objective, ...)``: whole-volume validation (sliding windows).
* ``cosine_lr``, ``resolve_precision``, ``make_optimizer`` and, in ``checkpoint.py``,
  ``save_checkpoint`` / ``load_checkpoint`` / ``load_model_from_checkpoint``.

``Trainer(config).fit()`` (or ``fit(config)``) composes them into the full run described in
the package docs (outputs in ``run_logs.py``, checkpoint format in ``checkpoint.py``).

Validation (every epoch, whole validation volumes, never a single patch):

* baseline: the sliding-window prediction of every validation case gives the validation loss
  (the training loss on the whole volume), the MAE in Gy and the gamma pass rate;
* ddpm: the validation loss is the noise-prediction loss on the whole volume at one timestep
  and noise per case (drawn from the case id, the same every epoch); the MAE and gamma come
  from a DDIM sample (``ddim_steps``, synchronous sliding windows) of the first validation case
  only, because sampling costs ``ddim_steps`` network passes per window.

MAE is taken inside the case's ``possible_dose_mask`` (or ``body_mask``/``body``) extra when it
has one, else over the whole volume; predicted doses are clipped at 0 Gy first. Gamma is global
3 %/3 mm with a 10 % cutoff (``gamma.gamma_pass_rate``) on volumes subsampled by
``gamma_subsample`` along each axis (spacing multiplied accordingly), which keeps it cheap.

Exact resume: at the start of epoch ``e`` every RNG of a process is reseeded from
``(seed, e, rank)``, and the patches of epoch ``e`` depend only on ``(seed, e, rank, item)``
(``training.data``), so the state at an epoch boundary is fully given by the checkpoint; on CPU a
run resumed from ``last.ckpt`` ends with bit-identical weights (use ``deterministic`` on GPUs).
Non-finite losses and gradients: ``NonFiniteLossError`` ("non-finite loss at epoch E step S", or
"non-finite gradient ...") stops the run before the step is applied, or the step is skipped with
``skip_nonfinite``; no checkpoint is written for it.
"""
from __future__ import annotations

import math
import os
import random
import sys
import time
import zlib
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .. import __version__
from ..case import Case
from ..conventions import dose_to_unit, unit_to_dose
from ..devices import check_processes_fit, cuda_bf16_is_native, resolve_device
from ..gamma import gamma_pass_rate
from ..host_memory import keep_freed_memory
from ..schedule import NoiseSchedule
from ..sliding_window import predict_full_volume, sliding_window_inference
from ..unet import BaselineUNet3D, SimpleUNet3D
from . import distributed as dist_utils
from .checkpoint import (FORMAT_VERSION, CheckpointError, best_checkpoint_name, build_model, capture_rng_state,
                         load_checkpoint, restore_rng_state, save_checkpoint, strip_module_prefix, to_plain)
from .config import TrainConfig
from .data import (CaseCatalog, CaseReader, CaseSplit, EpochSampler, PatchDataset, check_same_channels, derive_seed,
                   make_train_loader, micro_batches, micro_batches_per_epoch, read_only_tensor, scan_cases,
                   select_cases, split_cases, split_with_validation)
from .ema import EMA, unwrap_model
from .losses import Objective, autocast_context, noise_loss, regression_loss
from .run_logs import RunLog, count_parameters, environment_info, refuse_earlier_run, slice_panel, utc_now

TEST_EXIT_ENV = "VMAT_TEST_EXIT_AFTER_EPOCH"  # test hook: os._exit(17) right after that epoch's last.ckpt
TEST_EXIT_CODE = 17
KEEP_BEST = 3
# fp16: this many steps in a row skipped by the GradScaler (its scale lowered 2**20-fold) means
# the gradient is Inf/NaN whatever the scale: a non-finite gradient, not a scale still settling
SCALER_SKIPS_IN_A_ROW_LIMIT = 20
SCALER_INIT_SCALE = 2.0 ** 16  # GradScaler's default; the scale restarts here after such a run of skips
MASK_EXTRAS = ("possible_dose_mask", "body_mask", "body")


def describe_non_finite(loss: float, what: Optional[str] = None) -> str:
    """"non-finite loss" / "non-finite gradient" (``what``, else judged from this process's loss),
    with "on another process" when the loss was non-finite elsewhere and finite here (DDP)."""
    what = what or ("loss" if not math.isfinite(loss) else "gradient")
    elsewhere = " on another process" if what == "loss" and math.isfinite(loss) else ""
    return f"non-finite {what}{elsewhere}"


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient became NaN or Inf; the run stops without writing a checkpoint for that step.

    ``what``: "loss" or "gradient", or a longer description (e.g. of fp16 loss scaling that
    skipped ``SCALER_SKIPS_IN_A_ROW_LIMIT`` steps in a row)."""

    def __init__(self, epoch: int, step: int, loss: float, grad_norm: float = float("nan"),
                 what: Optional[str] = None):
        self.epoch, self.step, self.loss, self.grad_norm, self.what = epoch, step, loss, grad_norm, what
        super().__init__(f"{describe_non_finite(loss, what)} at epoch {epoch} step {step} (loss = {loss}, "
                         f"gradient norm = {grad_norm}); no checkpoint was written for it. Try a lower --lr, "
                         "--precision 32, or --skip_nonfinite to skip such steps")

    def __reduce__(self):  # picklable (e.g. back from a worker process) despite the extra arguments
        return type(self), (self.epoch, self.step, self.loss, self.grad_norm, self.what)


# --------------------------------------------------------------------------- devices and precision


def cpu_has_amx() -> bool:
    """True on CPUs with AMX tiles (where bf16 convolutions are much faster than fp32)."""
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(check()) if callable(check) else False


def resolve_precision(precision: str, device: torch.device) -> Tuple[Optional[torch.dtype], bool]:
    """(autocast dtype or None for fp32, whether to use a GradScaler) for ``precision``.

    "auto": bf16 on CUDA GPUs with bf16 and on CPUs with AMX, fp16 + GradScaler on GPUs without
    bf16, fp32 otherwise (CPUs with AVX512-BF16 only measured no faster in bf16: ``TrainConfig``).
    "bf16", "16" (CUDA only, with GradScaler), "32".
    """
    if precision == "32":
        return None, False
    if precision == "bf16":
        return torch.bfloat16, False
    if precision == "16":
        if device.type != "cuda":
            raise ValueError("precision: 16 (fp16 with loss scaling) needs a CUDA GPU; use bf16 or 32")
        return torch.float16, True
    if device.type == "cuda":
        return (torch.bfloat16, False) if cuda_bf16_is_native(device) else (torch.float16, True)
    if device.type == "cpu" and cpu_has_amx():
        return torch.bfloat16, False
    return None, False


def precision_name(dtype: Optional[torch.dtype]) -> str:
    return {None: "32", torch.bfloat16: "bf16-mixed", torch.float16: "16-mixed"}[dtype]


def denormals_flushed() -> bool:
    """True when the CPU currently flushes denormal floats to zero (``torch.set_flush_denormal``)."""
    tiny = torch.tensor(1e-39, dtype=torch.float32)  # below float32's smallest normal (1.2e-38)
    return float(tiny * 1.0) == 0.0


def enable_determinism() -> None:
    """Deterministic kernels where PyTorch has them (warns, not fails, where it has none)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def determinism_state() -> Tuple[bool, bool, bool]:
    """What ``enable_determinism`` changes: (deterministic algorithms, warn only, cudnn.benchmark)."""
    return (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.benchmark)


def restore_determinism(state: Tuple[bool, bool, bool]) -> None:
    """Put back a ``determinism_state()``."""
    torch.use_deterministic_algorithms(state[0], warn_only=state[1])
    torch.backends.cudnn.benchmark = state[2]


# --------------------------------------------------------------------------- optimisation pieces


def make_optimizer(model: nn.Module, lr: float = 1e-4, weight_decay: float = 1e-2) -> torch.optim.AdamW:
    """AdamW with weight decay on weights with >= 2 dims (convs, linears), none on biases and norms."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr)


def cosine_lr(step: int, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine to ``min_lr``."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def to_device(batch: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, torch.Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


@dataclass
class StepResult:
    loss: float        # mean loss of the micro-batches (before any scaling)
    finite: bool       # False: the loss or the gradient was NaN/Inf on some process and no step was taken
    grad_norm: float   # gradient norm before clipping (NaN when the loss was not finite)
    non_finite: str = ""  # what was not finite (on some process): "loss" or "gradient" (with details)
    # True: the fp16 GradScaler found Inf/NaN in the scaled gradient, skipped the update and
    # lowered its scale (normal while the scale settles; ``finite`` stays True)
    scaler_skipped: bool = False


def train_step(model: nn.Module, batches: Sequence[Dict[str, torch.Tensor]], optimizer: torch.optim.Optimizer,
               objective: Objective, *, device=None, scaler: Optional[torch.amp.GradScaler] = None,
               autocast_dtype: Optional[torch.dtype] = None, clip: Optional[float] = 1.0,
               generator: Optional[torch.Generator] = None, ema: Optional[EMA] = None) -> StepResult:
    """One optimizer step over ``batches`` (the micro-batches accumulated into it).

    Each micro-batch's loss is divided by ``len(batches)`` before backward, so the step sees the
    mean gradient. Under DDP the gradient all-reduce happens only on the last micro-batch.
    The finiteness of the loss is agreed on by all processes; when it is not finite the
    gradients are dropped and nothing is updated. Without a GradScaler the same holds for a
    non-finite gradient with a finite loss (seen with bf16 autocast on the CPU, whose conv3d
    backward now and then returns NaN weight gradients); with one (fp16) the scaler skips such
    steps itself and lowers its scale (``StepResult.scaler_skipped``; the EMA is then not
    updated either). Gradients are unscaled before they are clipped, so ``clip`` and
    ``grad_norm`` are in the loss's own units with or without a scaler.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    scaler = scaler if scaler is not None and scaler.is_enabled() else None
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=device)
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        sync = nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            parts = objective.loss(model, to_device(batch, device), generator=generator,
                                   autocast_dtype=autocast_dtype)
            loss = parts.total / len(batches)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total += parts.total.detach()
    mean_loss = float(total) / len(batches)
    if not dist_utils.all_true(math.isfinite(mean_loss), device):
        optimizer.zero_grad(set_to_none=True)
        return StepResult(loss=mean_loss, finite=False, grad_norm=float("nan"), non_finite="loss")
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.grad is not None]
    max_norm = clip if clip is not None else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    if scaler is None and not dist_utils.all_true(math.isfinite(grad_norm), device):
        optimizer.zero_grad(set_to_none=True)
        return StepResult(loss=mean_loss, finite=False, grad_norm=grad_norm, non_finite="gradient")
    if scaler is not None:
        scaler.step(optimizer)  # skipped by the scaler when the gradient (all-reduced) holds Inf/NaN,
        scaler.update()         # which is when grad_norm, taken after unscale_, is not finite
        if not math.isfinite(grad_norm):
            return StepResult(loss=mean_loss, finite=True, grad_norm=grad_norm, scaler_skipped=True)
    else:
        optimizer.step()
    if ema is not None:
        ema.update(model)
    return StepResult(loss=mean_loss, finite=True, grad_norm=grad_norm)


# --------------------------------------------------------------------------- validation


@dataclass
class ValidationResult:
    """Sums and counts (so results of several processes can be added) and one example slice."""
    loss_sum: float = 0.0
    loss_count: int = 0
    mae_sum: float = 0.0
    mae_count: int = 0
    gamma_sum: float = 0.0
    gamma_count: int = 0
    example: Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]] = None  # ct, reference Gy, predicted Gy

    @property
    def loss(self) -> Optional[float]:
        return self.loss_sum / self.loss_count if self.loss_count else None

    @property
    def mae_gy(self) -> Optional[float]:
        return self.mae_sum / self.mae_count if self.mae_count else None

    @property
    def gamma(self) -> Optional[float]:
        return self.gamma_sum / self.gamma_count if self.gamma_count else None

    def reduced(self, device) -> "ValidationResult":
        """Sums over all processes (unchanged in a single-process run); the example stays local."""
        values = dist_utils.all_reduce_sum([self.loss_sum, self.loss_count, self.mae_sum, self.mae_count,
                                            self.gamma_sum, self.gamma_count], device)
        return ValidationResult(values[0], int(values[1]), values[2], int(values[3]), values[4], int(values[5]),
                                self.example)


def evaluation_mask(case: Case) -> Optional[np.ndarray]:
    """The region MAE is averaged over: the first of ``MASK_EXTRAS`` the case has, else None."""
    for name in MASK_EXTRAS:
        if name in case.extras:
            mask = np.asarray(case.extras[name]) > 0
            if mask.shape == case.shape and mask.any():
                return mask
    return None


def subsampled_gamma(reference_gy: torch.Tensor, predicted_gy: torch.Tensor, spacing_mm, factor: int = 4
                     ) -> Optional[float]:
    """Global 3 %/3 mm gamma pass rate (percent, 10 % cutoff) on every ``factor``-th voxel; None if
    nothing is evaluated (e.g. an all-zero reference)."""
    ref = reference_gy[::factor, ::factor, ::factor].float()
    pred = predicted_gy[::factor, ::factor, ::factor].float()
    if float(ref.max()) <= 0:
        return None
    spacing = [float(s) * factor for s in spacing_mm]
    rate = gamma_pass_rate(ref, pred, spacing, dose_percent=3.0, distance_mm=3.0, cutoff_percent=10.0)
    return None if math.isnan(rate) else float(rate)


def _case_tensors(case: Case, device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(condition (1, 1 + S, X, Y, Z), constraints (1, K), dose Gy (1, 1, X, Y, Z)) on ``device``.

    Only read, never written: so the store's read-only memory maps are used without a copy."""
    ct = read_only_tensor(case.ct)[None, None]
    sdf = read_only_tensor(case.masks_sdf)[None]
    condition = torch.cat([ct, sdf], dim=1).to(device)
    constraints = read_only_tensor(case.constraints)[None].to(device)
    dose = read_only_tensor(case.dose)[None, None].to(device)
    return condition, constraints, dose


@torch.no_grad()
def predict_dose_baseline(model: nn.Module, condition: torch.Tensor, constraints: torch.Tensor, rx_dose_gy: float,
                          patch_size: int, overlap: int, autocast_dtype=None, batch_size: int = 1) -> torch.Tensor:
    """Whole-volume baseline prediction in dose / Rx units (B, 1, X, Y, Z) float32 (not clipped)."""
    def predictor(windows, constraint_rows):
        with autocast_context(windows.device, autocast_dtype):
            return model(windows, constraint_rows)
    return sliding_window_inference(condition, predictor, patch_size=patch_size, overlap=overlap,
                                    batch_size=batch_size, volume_args=(constraints,))


@torch.no_grad()
def validate(model: nn.Module, cases: Iterable[Case], objective: Objective, *, patch_size: int, overlap: int,
             device=None, autocast_dtype: Optional[torch.dtype] = None, sample_cases: int = 1,
             ddim_steps: int = 50, gamma_subsample: Optional[int] = 4, seed: int = 0,
             window_batch_size: int = 1, example: bool = True) -> ValidationResult:
    """Validate ``model`` (put in eval mode) on whole ``cases`` (see the module doc).

    sample_cases: for ddpm, how many of the first cases get a DDIM sample (MAE, gamma).
    gamma_subsample: subsampling factor for gamma, or None to skip gamma.
    example: keep (ct, reference, prediction) of the first predicted case for an image.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    result = ValidationResult()
    rx = objective.rx_dose_gy
    for index, case in enumerate(cases):
        condition, constraints, dose = _case_tensors(case, device)
        predicted_gy = None
        if objective.kind == "baseline":
            prediction = predict_dose_baseline(model, condition, constraints, rx, patch_size, overlap,
                                               autocast_dtype, window_batch_size)
            loss = regression_loss(prediction, dose / rx, objective.penalty_weight, objective.loss_kind,
                                   _loss_mask(case, objective, device)).total
            predicted_gy = (prediction * rx).clamp_min(0.0)
        else:
            loss = _diffusion_validation_loss(model, objective, condition, constraints, dose, case,
                                              patch_size, overlap, autocast_dtype, window_batch_size, seed)
            if index < sample_cases:
                predicted_gy = _sample_dose(model, objective, condition, constraints, patch_size, overlap,
                                            autocast_dtype, window_batch_size, ddim_steps, seed)
        result.loss_sum += float(loss)
        result.loss_count += 1
        if predicted_gy is None:
            continue
        reference, predicted = dose[0, 0], predicted_gy[0, 0]
        mask = evaluation_mask(case)
        error = (predicted - reference).abs()
        mae = error[torch.as_tensor(mask, device=device)].mean() if mask is not None else error.mean()
        result.mae_sum += float(mae)
        result.mae_count += 1
        if gamma_subsample:
            rate = subsampled_gamma(reference, predicted, case.spacing_mm, gamma_subsample)
            if rate is not None:
                result.gamma_sum += rate
                result.gamma_count += 1
        if example and result.example is None:
            result.example = (np.asarray(case.ct, dtype=np.float32), reference.cpu().numpy(), predicted.cpu().numpy())
    return result


def _loss_mask(case: Case, objective: Objective, device) -> Optional[torch.Tensor]:
    """The case's ``objective.loss_mask`` extra as a (1, 1, X, Y, Z) tensor, or None."""
    if objective.loss_mask is None:
        return None
    return torch.as_tensor(np.asarray(case.extras[objective.loss_mask]), device=device)[None, None]


def _diffusion_validation_loss(model, objective, condition, constraints, dose, case, patch_size, overlap,
                               autocast_dtype, window_batch_size, seed) -> torch.Tensor:
    """Noise-prediction loss on the whole volume at one (timestep, noise) drawn from the case id."""
    generator = torch.Generator().manual_seed(derive_seed(seed, zlib.crc32(case.case_id.encode())))
    schedule = objective.schedule
    x0 = dose_to_unit(dose, objective.rx_dose_gy)
    t = schedule.sample_timesteps(1, generator=generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    x_t = schedule.add_noise(x0, noise, t)

    def predictor(windows, constraint_rows):
        with autocast_context(windows.device, autocast_dtype):
            return model(windows, t.expand(windows.shape[0]), constraint_rows)
    eps_hat = sliding_window_inference(torch.cat([x_t, condition], dim=1), predictor, patch_size=patch_size,
                                       overlap=overlap, batch_size=window_batch_size, volume_args=(constraints,))
    return noise_loss(eps_hat, noise, x_t, t, schedule, objective.penalty_weight, objective.loss_kind,
                      _loss_mask(case, objective, x0.device)).total


def _sample_dose(model, objective, condition, constraints, patch_size, overlap, autocast_dtype, window_batch_size,
                 ddim_steps, seed) -> torch.Tensor:
    """DDIM sample of the whole volume (synchronous windows) -> dose in Gy, clipped at 0."""
    generator = torch.Generator(device=condition.device).manual_seed(derive_seed(seed, 1))

    def noise_model(x, t, c):
        with autocast_context(x.device, autocast_dtype):
            return model(x, t, c)
    x0 = predict_full_volume(noise_model, condition, constraints, objective.schedule, patch_size=patch_size,
                             overlap=overlap, ddim_steps=ddim_steps, batch_size=window_batch_size,
                             generator=generator)
    return unit_to_dose(x0, objective.rx_dose_gy).clamp_min(0.0)


# --------------------------------------------------------------------------- the Trainer


def new_model(kind: str, in_structures: int, constraint_dim: int, base_channels: int, levels: int) -> nn.Module:
    """BaselineUNet3D (input CT + S SDFs) or SimpleUNet3D (input x_t + CT + S SDFs).

    GroupNorm groups: gcd(8, base_channels), so small test models (base 4) work.
    """
    groups = math.gcd(8, base_channels)
    if kind == "baseline":
        return BaselineUNet3D(in_channels=1 + in_structures, base_channels=base_channels, levels=levels,
                              constraint_dim=constraint_dim, groups=groups)
    return SimpleUNet3D(in_channels=2 + in_structures, base_channels=base_channels, levels=levels,
                        constraint_dim=constraint_dim, groups=groups)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


class Trainer:
    """Composes the pieces into a full training run for a ``TrainConfig``.

    >>> summary = Trainer(TrainConfig(data_dir="phantoms", epochs=2, patch_size=32)).fit()

    After ``fit``: ``run_dir`` (outputs), ``model`` (trained weights), ``ema`` (or None),
    ``best`` (best checkpoints), ``summary`` (the training_summary.json dict).
    """

    def __init__(self, config: TrainConfig):
        self.config = config.validate()

    # ------------------------------------------------------------------ setup
    def _say(self, message: str) -> None:
        if self.dist.is_main:
            tqdm.write(message, file=sys.stdout)

    def setup(self) -> None:
        cfg = self.config
        refuse_earlier_run(Path(cfg.log_dir) / cfg.exp_name, resuming=bool(cfg.resume), resume="resume=",
                           elsewhere="exp_name or log_dir")
        wants_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
        self._owns_process_group = not dist_utils.is_distributed()
        check_processes_fit(cfg.device, dist_utils.local_world_size())
        self.dist = dist_utils.init_distributed("cuda" if wants_cuda else "cpu")
        self.device = resolve_device(cfg.device, self.dist.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if cfg.deterministic:
            enable_determinism()
        self.autocast_dtype, use_scaler = resolve_precision(cfg.precision, self.device)
        self.progress = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
        self.progress = self.progress and self.dist.is_main

        # Cases: validate every file, split, and (when resuming) read the checkpoint.
        self.catalog, self.split = self._cases_and_split(scan_cases(cfg.data_dir, progress=self.progress))
        self._check_loss_mask()
        checkpoint = load_checkpoint(cfg.resume, map_location="cpu") if cfg.resume else None
        if checkpoint is not None:
            self._adopt_checkpoint_settings(checkpoint)
        if cfg.rx_dose_gy and any(abs(c.rx_dose_gy - cfg.rx_dose_gy) > 1e-6 for c in self.catalog.cases):
            self._say(f"note: some cases prescribe another Rx than --rx_dose_gy {cfg.rx_dose_gy}; "
                      f"doses are scaled by {cfg.rx_dose_gy} Gy for every case")

        # Model, EMA, optimizer, precision.
        seed_everything(cfg.seed)
        if checkpoint is not None:
            self.model = build_model(checkpoint["model_class"], checkpoint["model_config"])
        else:
            self.model = new_model(cfg.model, len(self.catalog.structures), self.catalog.constraint_dim,
                                   cfg.base_channels, cfg.levels)
        self.model.to(self.device)
        self.schedule = NoiseSchedule(cfg.timesteps, cfg.schedule).to(self.device) if cfg.model == "ddpm" else None
        self.objective = Objective(cfg.model, cfg.rx_dose_gy, cfg.penalty_weight, self.schedule, cfg.loss,
                                   cfg.loss_mask)
        self.ema = EMA(self.model, cfg.ema_decay) if cfg.use_ema else None
        self.optimizer = make_optimizer(self.model, cfg.lr, cfg.weight_decay)
        self.scaler = torch.amp.GradScaler(self.device.type, init_scale=SCALER_INIT_SCALE, enabled=use_scaler)
        self.train_generator = torch.Generator(device=self.device)
        self.ddp_model = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel
            self.ddp_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

        # Data: this rank's share of the training cases, seeded per (epoch, rank, item).
        if cfg.use_store and self.dist.enabled:  # one process builds the store, then all open it
            if self.dist.is_main:
                CaseReader([c.path for c in self.catalog.cases], store=True)
            dist_utils.barrier()
        train_reader = CaseReader([c.path for c in self.split.train], cache=cfg.cache_cases, store=cfg.use_store)
        self.val_reader = CaseReader([c.path for c in self.split.val], cache=cfg.cache_cases, store=cfg.use_store)
        dataset = PatchDataset(train_reader, self.catalog.structures, cfg.patch_size, cfg.patches_per_volume,
                               cfg.seed, rank=self.dist.rank, augment=cfg.augment, loss_mask=cfg.loss_mask)
        self.sampler = EpochSampler(len(train_reader), cfg.seed, self.dist.rank, self.dist.world_size)
        # No pinned memory: micro_batches concatenates the items into new (unpinned) tensors anyway.
        self.loader = make_train_loader(dataset, self.sampler, cfg.num_workers, derive_seed(cfg.seed, self.dist.rank))
        self.micro_per_epoch = micro_batches_per_epoch(len(self.sampler), cfg.patches_per_volume, cfg.batch_size)
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / cfg.accumulate_grad_batches)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.warmup_steps = round(cfg.warmup_epochs * self.steps_per_epoch)

        # Progress counters and history (restored from the checkpoint when resuming).
        self.epoch = 0
        self.global_step = 0
        self.best: List[dict] = []
        self.best_val_mae: Optional[float] = None
        self.best_epoch: Optional[int] = None
        self.validations_without_improvement = 0
        self.scaler_skipped_steps = self.scaler_skips_in_a_row = 0  # fp16 loss scaling (this epoch / in a row)
        self.epoch_times: List[float] = []
        self.elapsed_before = 0.0
        self.last_metrics: Dict[str, Optional[float]] = {}
        if checkpoint is not None:
            self._restore(checkpoint)

        self.run_dir = Path(cfg.log_dir) / cfg.exp_name
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.log = RunLog(self.run_dir, enabled=self.dist.is_main, first_epoch=self.epoch + 1)
        self.log.write_config(self._config_record())
        self.log.log_hparams(self._hparams())

    def _cases_and_split(self, catalog: CaseCatalog) -> Tuple[CaseCatalog, CaseSplit]:
        """(every case of the run, its train/val/test split): a seeded draw by fraction from
        ``data_dir``, or the explicit ``val_ids`` (in data_dir) / ``val_dir`` (its cases join the catalog)."""
        cfg = self.config
        if cfg.val_dir:
            val_catalog = scan_cases(cfg.val_dir, progress=self.progress, name="val_dir")
            check_same_channels(catalog, val_catalog, "val_dir")
            split = split_with_validation(catalog.cases, val_catalog.cases, cfg.test_split, cfg.seed)
            return CaseCatalog(cases=catalog.cases + val_catalog.cases, structures=catalog.structures,
                               constraint_dim=catalog.constraint_dim), split
        if cfg.val_ids:
            val_cases, rest = select_cases(catalog.cases, cfg.val_ids, cfg.data_dir)
            return catalog, split_with_validation(rest, val_cases, cfg.test_split, cfg.seed)
        return catalog, split_cases(catalog.cases, cfg.val_split, cfg.test_split, cfg.seed)

    def _check_loss_mask(self) -> None:
        """Every training and validation case must have the ``loss_mask`` extra."""
        name = self.config.loss_mask
        if name is None:
            return
        missing = [c.path.name for c in self.split.train + self.split.val if name not in c.extras]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ValueError(f"loss_mask: case(s) {shown} have no extra '{name}' "
                             f"(each case needs an array '{name}' of the CT's shape)")

    def _adopt_checkpoint_settings(self, checkpoint: dict) -> None:
        """A resumed run keeps the checkpoint's model and data settings; it must see the same split."""
        cfg = self.config
        saved = checkpoint.get("config") or {}
        for name in ("model", "base_channels", "levels", "timesteps", "schedule", "rx_dose_gy"):
            if name in saved and saved[name] != getattr(cfg, name):
                self._say(f"note: resuming with the checkpoint's {name}={saved[name]!r} (not {getattr(cfg, name)!r})")
                setattr(cfg, name, saved[name])
        cfg.validate()
        if checkpoint.get("structures") not in (None, self.catalog.structures):
            raise CheckpointError(f"{cfg.resume}: trained on structures {checkpoint['structures']}, "
                                  f"but {cfg.data_dir} has {self.catalog.structures}")
        saved_split = checkpoint.get("split")
        if saved_split is not None and saved_split != self.split.ids():
            raise CheckpointError(f"{cfg.resume}: the train/val/test split of {cfg.data_dir} (seed {cfg.seed}) "
                                  "differs from the checkpoint's; resume with the same data folder, splits and seed")

    def _restore(self, checkpoint: dict) -> None:
        self.model.load_state_dict(strip_module_prefix(checkpoint["model"]))
        if self.ema is not None and checkpoint.get("ema") is not None:
            self.ema.load_state_dict(checkpoint["ema"])
            self.ema.decay = self.config.ema_decay  # the run's setting, which may be a new --ema_decay
        elif self.ema is not None:  # EMA switched on for a run trained without it: start from the weights
            self.ema = EMA(self.model, self.config.ema_decay)
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        # load_state_dict restores each group's saved hyperparameters; the run's setting wins
        # (group 0 holds the decayed weights: make_optimizer)
        self.optimizer.param_groups[0]["weight_decay"] = self.config.weight_decay
        if checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.epoch = int(checkpoint["epoch"])
        self.global_step = int(checkpoint["global_step"])
        self.best = list(checkpoint.get("best") or [])
        stopping = checkpoint.get("early_stopping") or {}
        self.best_val_mae = stopping.get("best_val_mae_gy")
        self.best_epoch = stopping.get("best_epoch")
        self.validations_without_improvement = int(stopping.get("validations_without_improvement",
                                                                 stopping.get("epochs_without_improvement", 0)))
        history = checkpoint.get("history") or {}
        self.epoch_times = [float(t) for t in history.get("epoch_times_sec", [])]
        self.elapsed_before = float(history.get("elapsed_sec", 0.0))
        self.last_metrics = dict(checkpoint.get("metrics") or {})
        restore_rng_state(checkpoint["rng"], self.train_generator)
        self._say(f"resumed from {self.config.resume} after epoch {self.epoch} (step {self.global_step})")

    def _config_record(self) -> dict:
        cfg = self.config
        split_ids = self.split.ids()
        return {
            "script": "vmat_diffusion.training", "script_version": __version__, "start_time": utc_now(),
            "resumed_from": cfg.resume, "resumed_after_epoch": self.epoch if cfg.resume else None,
            **environment_info(),
            "device": str(self.device), "world_size": self.dist.world_size,
            "model_kind": cfg.model, "model_class": type(self.model).__name__,
            "model_config": self.model.config, **count_parameters(self.model),
            "hyperparameters": cfg.to_dict(),
            "data": {"data_dir": str(cfg.data_dir), "val_dir": str(cfg.val_dir) if cfg.val_dir else None,
                     "validation": "explicit" if cfg.explicit_validation else "val_split",
                     "n_cases": len(self.catalog),
                     "train_count": len(split_ids["train"]), "val_count": len(split_ids["val"]),
                     "test_count": len(split_ids["test"]), "train_case_ids": split_ids["train"],
                     "val_case_ids": split_ids["val"], "test_case_ids": split_ids["test"],
                     "structures": self.catalog.structures, "constraint_dim": self.catalog.constraint_dim},
            "max_epochs": cfg.epochs, "precision": precision_name(self.autocast_dtype),
            "grad_scaler": self.scaler.is_enabled(), "accumulate_grad_batches": cfg.accumulate_grad_batches,
            "gradient_clip_val": cfg.gradient_clip, "effective_batch_size":
                cfg.batch_size * cfg.accumulate_grad_batches * self.dist.world_size,
            "ema": cfg.use_ema, "micro_batches_per_epoch": self.micro_per_epoch,
            "optimizer_steps_per_epoch": self.steps_per_epoch,
        }

    def _hparams(self) -> dict:
        cfg = self.config
        keys = ("model", "epochs", "batch_size", "patch_size", "patches_per_volume", "lr", "weight_decay",
                "base_channels", "levels", "timesteps", "schedule", "accumulate_grad_batches", "seed")
        values = {key: getattr(cfg, key) for key in keys}
        values.update(precision=precision_name(self.autocast_dtype), ema=cfg.use_ema,
                      world_size=self.dist.world_size, parameters=count_parameters(self.model)["total_parameters"])
        return values

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        """Run (or resume) training to ``epochs`` or early stop; returns the summary dict.

        Global settings it changes (``deterministic``; flushing denormals on the CPU) are put
        back when it returns."""
        flushed_before, determinism_before = denormals_flushed(), determinism_state()
        try:
            self.setup()
            if self.device.type == "cpu":
                # Guard: gradients behind zero-initialised output layers can become denormal, and
                # x86 arithmetic on denormals is very slow (an AdamW step once measured 0.92 s
                # instead of 21 ms in bench_train_step; BENCHMARKS.md).
                torch.set_flush_denormal(True)
            # on the CPU, keep the activations' memory for the next step instead of faulting it
            # in again page by page (a default-width step measured 0.72-0.79 of the time; host_memory)
            with keep_freed_memory(self.device.type == "cpu"):
                return self._fit()
        finally:
            torch.set_flush_denormal(flushed_before)
            restore_determinism(determinism_before)
            if getattr(self, "log", None) is not None:
                self.log.close()
            if getattr(self, "loader", None) is not None:
                del self.loader  # stops persistent workers
            if getattr(self, "_owns_process_group", False):
                dist_utils.cleanup_distributed()

    def _fit(self) -> dict:
        cfg = self.config
        start = self.run_start = time.time()
        early_stopped, stop_reason = False, "max epochs"
        n_val, n_validated = len(self.val_reader), self._validated_count()
        validating = str(n_val) if n_validated == n_val else f"the first {n_validated} of {n_val} (--max_val_cases)"
        self._say(f"training {type(self.model).__name__} ({count_parameters(self.model)['total_parameters']:,} "
                  f"parameters) on {len(self.split.train)} cases, validating on {validating}; "
                  f"{self.micro_per_epoch} batches/epoch, precision {precision_name(self.autocast_dtype)}, "
                  f"device {self.device}, {self.dist.world_size} process(es); outputs in {self.run_dir}")
        epochs = range(self.epoch + 1, cfg.epochs + 1)
        for epoch in tqdm(epochs, desc="epochs", disable=not self.progress, initial=self.epoch, total=cfg.epochs):
            epoch_start = time.time()
            try:
                train_loss = self._train_one_epoch(epoch)
            except NonFiniteLossError as error:
                self._write_summary(start, early_stopped=False, stop_reason=str(error))
                raise
            stop_for_time = self._out_of_time(time.time() - epoch_start)
            last_epoch = epoch == cfg.epochs or stop_for_time
            validation = self._validate() if last_epoch or epoch % cfg.val_every == 0 else ValidationResult()
            self.epoch = epoch
            self.epoch_times.append(time.time() - epoch_start)
            improved = self._track_best(validation.mae_gy)
            metrics = {"train_loss": train_loss, "val_loss": validation.loss, "val_mae_gy": validation.mae_gy,
                       "val_gamma": validation.gamma, "learning_rate": self.optimizer.param_groups[0]["lr"]}
            self.last_metrics = metrics
            self._log_epoch(epoch, metrics, validation)
            if self.dist.is_main:
                if improved:
                    self._save_best(epoch, validation.mae_gy)
                save_checkpoint(self.checkpoint_dir / "last.ckpt", self._checkpoint())
            dist_utils.barrier()
            if os.environ.get(TEST_EXIT_ENV) == str(epoch):
                os._exit(TEST_EXIT_CODE)
            if cfg.patience and self.validations_without_improvement >= cfg.patience:
                early_stopped = True
                best = ("no finite validation MAE yet" if self.best_val_mae is None
                        else f"best {self.best_val_mae:.3f} Gy at epoch {self.best_epoch}")
                self._say(f"early stop: no better validation MAE in {cfg.patience} validations "
                          f"(every {cfg.val_every} epoch(s); {best})")
                break
            if stop_for_time and epoch < cfg.epochs:
                stop_reason = "time budget"
                self._say(f"stopping after epoch {epoch}: the next epoch would end past --max_minutes "
                          f"{cfg.max_minutes:g} (the learning-rate schedule was set for {cfg.epochs} epochs)")
                break
            if cfg.gpu_cooling and epoch < cfg.epochs:
                time.sleep(cfg.epoch_pause)
        if early_stopped:
            stop_reason = "early stopping"
        self.summary = self._write_summary(start, early_stopped, stop_reason)
        return self.summary

    def _out_of_time(self, train_seconds: float) -> bool:
        """True when another epoch (estimated from the mean epoch time, this one's training part
        included) would end past ``max_minutes``. All processes agree (any one out of time stops all)."""
        cfg = self.config
        if cfg.max_minutes is None:
            return False
        elapsed = self.elapsed_before + (time.time() - self.run_start)
        per_epoch = float(np.mean(self.epoch_times + [train_seconds]))
        return dist_utils.any_true(elapsed + per_epoch > 60.0 * cfg.max_minutes, self.device)

    def _seed_epoch(self, epoch: int) -> None:
        """Every RNG of this process as a function of (seed, epoch, rank): resume is exact on every rank."""
        seed = derive_seed(self.config.seed, epoch, self.dist.rank)
        seed_everything(seed)
        self.train_generator.manual_seed(derive_seed(seed, 1))
        self.sampler.set_epoch(epoch)

    def _train_one_epoch(self, epoch: int) -> Optional[float]:
        cfg = self.config
        self._seed_epoch(epoch)
        self.ddp_model.train()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        losses: List[float] = []
        group: List[Dict[str, torch.Tensor]] = []
        self.scaler_skipped_steps = 0
        bar = tqdm(total=self.micro_per_epoch, desc=f"epoch {epoch}", leave=False, disable=not self.progress)
        # The schedule follows the position in the epochs, not a step count: a run resumed with
        # another batch size, accumulation or number of processes continues the same curve.
        schedule_step = (epoch - 1) * self.steps_per_epoch
        for index, batch in enumerate(micro_batches(self.loader, cfg.batch_size)):
            group.append(batch)
            bar.update(1)
            if len(group) == cfg.accumulate_grad_batches or index == self.micro_per_epoch - 1:
                set_lr(self.optimizer, cosine_lr(schedule_step, cfg.lr, cfg.min_lr, self.warmup_steps,
                                                 self.total_steps))
                schedule_step += 1
                result = train_step(self.ddp_model, group, self.optimizer, self.objective, device=self.device,
                                    scaler=self.scaler, autocast_dtype=self.autocast_dtype,
                                    clip=cfg.gradient_clip, generator=self.train_generator, ema=self.ema)
                group = []
                if result.scaler_skipped:
                    self.scaler_skipped_steps += 1
                    self.scaler_skips_in_a_row += 1
                    if self.scaler_skips_in_a_row >= SCALER_SKIPS_IN_A_ROW_LIMIT:
                        result = StepResult(result.loss, False, result.grad_norm,
                                            f"gradient in {SCALER_SKIPS_IN_A_ROW_LIMIT} steps in a row (fp16 loss scaling)")
                        self.scaler_skips_in_a_row = 0
                        if cfg.skip_nonfinite:  # the run goes on: from a usable scale, not one halved
                            # towards 0, where no fp16 gradient survives and none can grow it back
                            self.scaler.update(new_scale=SCALER_INIT_SCALE)
                else:
                    self.scaler_skips_in_a_row = 0
                if not result.finite:
                    if not cfg.skip_nonfinite:
                        bar.close()
                        raise NonFiniteLossError(epoch, self.global_step + 1, result.loss, result.grad_norm,
                                                 result.non_finite)
                    self._say(f"skipped step {self.global_step + 1} of epoch {epoch}: "
                              f"{describe_non_finite(result.loss, result.non_finite)} "
                              f"(loss {result.loss}, gradient norm {result.grad_norm})")
                else:
                    self.global_step += 1
                    losses.append(result.loss)
                    bar.set_postfix(loss=f"{result.loss:.4g}")
            if cfg.gpu_cooling and (index + 1) % cfg.cooling_interval == 0:
                time.sleep(cfg.cooling_pause)
        bar.close()
        total, count = dist_utils.all_reduce_sum([sum(losses), len(losses)], self.device)
        return total / count if count else None

    def _validated_count(self) -> int:
        """How many validation cases (the first ones) each validation runs on (--max_val_cases)."""
        n_val = len(self.val_reader)
        return n_val if self.config.max_val_cases is None else min(self.config.max_val_cases, n_val)

    def _validate(self) -> ValidationResult:
        cfg = self.config
        model = self.ema.module if self.ema is not None else self.model
        mine = list(range(self._validated_count()))[self.dist.rank::self.dist.world_size]
        cases = (self.val_reader[i] for i in mine)
        result = validate(model, cases, self.objective, patch_size=cfg.patch_size, overlap=cfg.overlap,
                          device=self.device, autocast_dtype=self.autocast_dtype,
                          sample_cases=1 if self.dist.is_main else 0, ddim_steps=cfg.ddim_steps,
                          gamma_subsample=cfg.gamma_subsample, seed=cfg.seed, window_batch_size=cfg.batch_size,
                          example=self.dist.is_main)
        return result.reduced(self.device)

    def _track_best(self, val_mae: Optional[float]) -> bool:
        """Update the early-stopping counter (validations without a better MAE; epochs that are
        not validated do not count); True when this epoch's MAE ranks among the best kept."""
        if val_mae is not None and math.isfinite(val_mae) and (self.best_val_mae is None or val_mae < self.best_val_mae):
            self.best_val_mae, self.best_epoch = val_mae, self.epoch
            self.validations_without_improvement = 0
        elif val_mae is not None:  # validated (a non-finite MAE counts as no improvement)
            self.validations_without_improvement += 1
        # A checkpoint is kept when it ranks among the KEEP_BEST lowest MAEs so far.
        if val_mae is None or not math.isfinite(val_mae):
            return False
        return len(self.best) < KEEP_BEST or val_mae < max(entry["val_mae_gy"] for entry in self.best)

    def _save_best(self, epoch: int, val_mae: float) -> None:
        name = best_checkpoint_name(epoch, val_mae)
        self.best.append({"epoch": epoch, "val_mae_gy": float(val_mae), "file": name})
        self.best.sort(key=lambda entry: (entry["val_mae_gy"], entry["epoch"]))
        dropped = self.best[KEEP_BEST:]
        self.best = self.best[:KEEP_BEST]
        save_checkpoint(self.checkpoint_dir / name, self._checkpoint())
        for entry in dropped:
            (self.checkpoint_dir / entry["file"]).unlink(missing_ok=True)

    def _checkpoint(self) -> dict:
        cfg = self.config
        elapsed = self.elapsed_before + (time.time() - self.run_start)
        return {
            "format_version": FORMAT_VERSION,
            "model_kind": cfg.model,
            "model_class": type(self.model).__name__,
            "model_config": dict(self.model.config),
            "model": strip_module_prefix(unwrap_model(self.model).state_dict()),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {"name": "cosine", "base_lr": cfg.lr, "min_lr": cfg.min_lr,
                          "warmup_steps": self.warmup_steps, "total_steps": self.total_steps,
                          "step": self.epoch * self.steps_per_epoch},  # the next step's schedule position
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "epoch": self.epoch,
            "global_step": self.global_step,
            "best": to_plain(self.best),
            "early_stopping": to_plain({"best_val_mae_gy": self.best_val_mae, "best_epoch": self.best_epoch,
                                        "validations_without_improvement": self.validations_without_improvement}),
            "history": {"epoch_times_sec": [float(t) for t in self.epoch_times], "elapsed_sec": float(elapsed)},
            "config": to_plain(cfg.to_dict()),
            "structures": list(self.catalog.structures),
            "constraint_dim": int(self.catalog.constraint_dim),
            "rx_dose_gy": float(cfg.rx_dose_gy),
            "schedule": dict(self.schedule.config) if self.schedule is not None else None,
            "split": self.split.ids(),
            "rng": {**capture_rng_state(self.train_generator),
                    "data": {"seed": cfg.seed, "scheme": "SeedSequence([seed, epoch, rank, item])"}},
            "metrics": to_plain(self.last_metrics),
        }

    def _log_epoch(self, epoch: int, metrics: Dict[str, Optional[float]], validation: ValidationResult) -> None:
        cfg = self.config
        mean_epoch = float(np.mean(self.epoch_times))
        gpu_gb = torch.cuda.max_memory_allocated(self.device) / 1e9 if self.device.type == "cuda" else 0.0
        row = {"epoch": epoch, "epoch_time_sec": round(self.epoch_times[-1], 3), **metrics}
        scalars = {"train/loss": metrics["train_loss"], "val/loss": metrics["val_loss"],
                   "val/mae_gy": metrics["val_mae_gy"], "val/gamma_3mm3pct": metrics["val_gamma"],
                   "misc/gpu_memory_gb": gpu_gb, "misc/eta_hours": mean_epoch * (cfg.epochs - epoch) / 3600.0,
                   "lr-AdamW": metrics["learning_rate"]}
        if self.scaler.is_enabled():
            scalars.update({"misc/loss_scale": self.scaler.get_scale(),
                            "misc/scaler_skipped_steps": self.scaler_skipped_steps})
        self.log.log_epoch(row, scalars)
        if validation.example is not None:
            self.log.log_image(slice_panel(*validation.example), epoch)
        text = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        self._say(f"epoch {epoch}/{cfg.epochs}  train_loss {text(metrics['train_loss'], '.4g')}  "
                  f"val_loss {text(metrics['val_loss'], '.4g')}  val_mae {text(metrics['val_mae_gy'], '.3f')} Gy  "
                  f"gamma {text(metrics['val_gamma'], '.1f')} %  lr {metrics['learning_rate']:.3g}  "
                  f"{self.epoch_times[-1]:.1f} s")

    def _write_summary(self, start: float, early_stopped: bool, stop_reason: str) -> dict:
        total_sec = self.elapsed_before + (time.time() - start)
        summary = {
            "end_time": utc_now(),
            "total_hours": total_sec / 3600.0,
            "epochs_completed": self.epoch,
            "average_epoch_time_sec": float(np.mean(self.epoch_times)) if self.epoch_times else None,
            "best_val_mae_gy": self.best_val_mae,
            "best_epoch": self.best_epoch,
            "final_train_loss": self.last_metrics.get("train_loss"),
            "final_val_loss": self.last_metrics.get("val_loss"),
            "final_val_mae_gy": self.last_metrics.get("val_mae_gy"),
            "final_val_gamma": self.last_metrics.get("val_gamma"),
            "early_stopped": bool(early_stopped),
            "stop_reason": stop_reason,
            "global_steps": self.global_step,
            "best_checkpoints": [str(self.checkpoint_dir / entry["file"]) for entry in self.best],
            "last_checkpoint": str(self.checkpoint_dir / "last.ckpt"),
        }
        self.log.write_summary(summary)
        return summary


def fit(config: TrainConfig) -> dict:
    """Train with ``config``; returns the training summary (see ``Trainer``)."""
    return Trainer(config).fit()
