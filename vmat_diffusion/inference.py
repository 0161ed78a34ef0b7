"""Whole-case dose prediction with a trained model, and the scores of one prediction.

* ``predict_case(model, info, case, ...) -> Prediction``: dose (X, Y, Z) in Gy for one ``Case``
  with either model kind, read from a checkpoint by
  ``vmat_diffusion.training.checkpoint.load_model_from_checkpoint`` (``info`` is its second
  return value: ``model_kind``, ``structures``, ``rx_dose_gy``, the noise schedule, ...).

  - baseline (``BaselineUNet3D``): ``model(cat([ct, masks_sdf]), constraints) * rx_dose_gy``
    over overlapping windows (``sliding_window.sliding_window_inference``).
  - ddpm (``SimpleUNet3D``): a DDIM run over the whole volume
    (``sliding_window.predict_full_volume``), then ``conventions.unit_to_dose``. With
    ``samples=K > 1`` the K samples give the mean (the prediction) and the voxel-wise
    standard deviation (``std_gy``, an uncertainty map; ``ddof=1``).

  ``rx_dose_gy`` is the *model's* dose scale (the training config's, stored in the checkpoint),
  not the case's prescription: the network was trained on dose / that scale.
  Post-processing of every sample: dose clamped to >= 0 Gy, and (``mask_outside=True``, the
  default) set to 0 outside the case's ``possible_dose_mask`` when the case has one (as the
  OpenKBP evaluation does); the standard deviation is then 0 there too.

* ``case_metrics(pred_gy, case, ...) -> dict``: MAE, OpenKBP dose and DVH scores, DVH metrics
  per structure, clinical goals, and the 3 %/3 mm global gamma pass rate (whole dose and inside
  the targets grown by 5 mm); see its docstring for every key.
* ``save_prediction`` / ``load_prediction``: ``<case_id>_pred.npz`` files (no pickles).
* ``flat_metrics`` / ``summarize_metrics``: one row of numbers per case, mean and sd over cases.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import numbers
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from . import devices
from .case import Case
from .constraints import UnknownSiteError
from .conventions import unit_to_dose
from .ddim import check_eta
from .fileio import atomic_write
from .gamma import dilate_mask, gamma_index, pass_rate_from_gamma
from .metrics import compare_goals, dose_score, dvh_score_details, dvh_table, goal_site, is_default_target, \
    mae_gy, masks_from_case
from .schedule import SCHEDULES, NoiseSchedule
from .sliding_window import PREDICT_MODES, predict_full_volume, sliding_window_inference

MODEL_KINDS = ("baseline", "ddpm")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
POSSIBLE_DOSE_KEY = "possible_dose_mask"
PREDICTION_KEYS = ("dose_pred_gy", "dose_std_gy", "metadata")
# Channels in front of the structure SDFs: CT (baseline); noisy dose x_t and CT (ddpm).
LEADING_CHANNELS = {"baseline": 1, "ddpm": 2}
MODEL_CLASS_OF_KIND = {"baseline": "BaselineUNet3D", "ddpm": "SimpleUNet3D"}


class InferenceInputError(ValueError):
    """The input does not fit the model or the settings (the message says what and how)."""


@dataclass(eq=False)  # array fields: element-wise == would be ambiguous
class Prediction:
    """A predicted dose of one case.

    dose_gy: (X, Y, Z) float32, Gy (the mean of the samples for ``samples > 1``).
    std_gy: (X, Y, Z) float32 voxel-wise standard deviation of the samples (Gy), or None.
    metadata: JSON-able dict (case_id, model_kind, settings, spacing_mm, structures, timestamp...).
    """
    dose_gy: np.ndarray
    std_gy: Optional[np.ndarray]
    metadata: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- checkpoint info

def info_value(info, key: str, default=None):
    """``info[key]`` for a dict-like checkpoint info, ``info.key`` for an object; ``default`` if absent."""
    if isinstance(info, Mapping):
        return info.get(key, default)
    return getattr(info, key, default)


def model_kind(info) -> str:
    """The checkpoint's model kind, checked to be one of ``MODEL_KINDS``."""
    kind = info_value(info, "model_kind")
    if kind not in MODEL_KINDS:
        raise InferenceInputError(f"checkpoint: unknown model kind {kind!r} "
                                  f"(expected one of {', '.join(MODEL_KINDS)})")
    return kind


def check_model(model: torch.nn.Module, info) -> str:
    """The model kind, checked against the recorded ``model_class`` and the model's own class."""
    kind = model_kind(info)
    expected = MODEL_CLASS_OF_KIND[kind]
    recorded = info_value(info, "model_class")
    for name, where in ((recorded, "the checkpoint records"), (type(model).__name__, "the model is a")):
        if name is not None and name in MODEL_CLASS_OF_KIND.values() and name != expected:
            raise InferenceInputError(f"checkpoint: model kind {kind!r} needs a {expected}, but {where} {name}")
    return kind


def model_dose_scale(info) -> float:
    """The dose (Gy) the model was trained to scale by (``info['rx_dose_gy']``)."""
    value = info_value(info, "rx_dose_gy")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise InferenceInputError(f"checkpoint: 'rx_dose_gy' must be a positive number, got {value!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise InferenceInputError(f"checkpoint: 'rx_dose_gy' must be a positive number, got {value!r}")
    return value


def _config_value(info, key: str):
    """``key`` of the checkpoint's training config (``info['config']``, dict or object), or None."""
    config = info_value(info, "config")
    if config is None:
        return None
    return config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)


def schedule_from_info(info) -> NoiseSchedule:
    """The diffusion model's ``NoiseSchedule`` from the checkpoint info.

    Reads ``info['schedule']`` as a dict ``{"timesteps", "schedule"}`` (``NoiseSchedule.config``),
    else ``info['timesteps']`` / ``info['schedule']`` directly, else the training config's.
    Raises InferenceInputError when the schedule is missing or malformed.
    """
    schedule = info_value(info, "schedule")
    if isinstance(schedule, Mapping):
        timesteps, name = schedule.get("timesteps"), schedule.get("schedule")
    else:
        timesteps, name = info_value(info, "timesteps"), schedule
    timesteps = timesteps if timesteps is not None else _config_value(info, "timesteps")
    name = name if name is not None else _config_value(info, "schedule")
    if timesteps is None or name is None:
        raise InferenceInputError("checkpoint: a diffusion checkpoint must record its noise schedule "
                                  "(timesteps and schedule name)")
    try:
        return NoiseSchedule(timesteps=timesteps, schedule=name)
    except (TypeError, ValueError) as e:
        raise InferenceInputError(
            f"checkpoint: 'schedule' must be {{timesteps: int >= 1, schedule: {'|'.join(map(repr, SCHEDULES))}}}, "
            f"got {{timesteps: {timesteps!r}, schedule: {name!r}}} ({e})") from None


DEFAULT_PATCH_SIZE = 128  # window size (voxels) when the checkpoint records no training patch size


def training_patch_size(info) -> Optional[int]:
    """The patch size (voxels) the model was trained on (``info['config']['patch_size']``), or None.

    Raises InferenceInputError when the checkpoint records something other than a positive integer.
    """
    value = _config_value(info, "patch_size")
    return None if value is None else _positive_int("checkpoint: 'config.patch_size'", value)


def window_settings(info, patch_size: Optional[int] = None, overlap: Optional[int] = None):
    """(patch_size, overlap) in voxels for predicting with the checkpoint described by ``info``.

    ``patch_size=None``: the training patch size from the checkpoint (``DEFAULT_PATCH_SIZE`` when
    it records none); ``overlap=None``: ``patch_size // 4``. Explicit values are returned as given
    (``check_window`` checks them against the network).
    """
    if patch_size is None:
        patch_size = training_patch_size(info) or DEFAULT_PATCH_SIZE
    if overlap is None and isinstance(patch_size, numbers.Integral):  # else check_window names patch_size
        overlap = patch_size // 4
    return patch_size, overlap


# ----------------------------------------------------------------------------- input checks

def describe_structure_mismatch(case_structures: Sequence[str], model_structures: Sequence[str]) -> str:
    """Why two structure lists differ: missing / extra names, or the same names in another order."""
    case_structures, model_structures = list(case_structures), list(model_structures)
    missing = [s for s in model_structures if s not in case_structures]
    extra = [s for s in case_structures if s not in model_structures]
    parts = []
    if missing:
        parts.append(f"missing {missing}")
    if extra:
        parts.append(f"not known to the model {extra}")
    if not parts:
        parts.append("same names in another channel order")
    return (f"has structures {case_structures} but the model was trained on {model_structures} "
            f"({'; '.join(parts)})")


def check_structures(case_id: str, case_structures: Sequence[str], info) -> None:
    """Raise InferenceInputError unless the case has the model's structures in the model's order."""
    expected = info_value(info, "structures")
    if expected is None:
        raise InferenceInputError("checkpoint: no 'structures' recorded; cannot check the case's channels")
    if list(case_structures) != list(expected):
        raise InferenceInputError(f"case {case_id!r} {describe_structure_mismatch(case_structures, expected)}")


def check_case_matches_model(model: torch.nn.Module, info, case: Case) -> None:
    """Raise InferenceInputError when ``case`` cannot be fed to ``model`` (structures, channels, constraints)."""
    kind = check_model(model, info)
    check_structures(case.case_id, case.structures, info)
    config = getattr(model, "config", {}) or {}
    in_channels = config.get("in_channels")
    expected_channels = LEADING_CHANNELS[kind] + len(case.structures)
    if in_channels is not None and int(in_channels) != expected_channels:
        raise InferenceInputError(
            f"checkpoint: the {kind} model takes {in_channels} input channels, but a case with "
            f"{len(case.structures)} structures needs {expected_channels}")
    constraint_dim = config.get("constraint_dim")
    if constraint_dim is not None and int(constraint_dim) != case.constraints.shape[0]:
        raise InferenceInputError(
            f"case {case.case_id!r}: constraint vector has {case.constraints.shape[0]} entries, "
            f"the model expects {constraint_dim}")


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise InferenceInputError(f"{name}: expected a positive integer, got {value!r}")
    return int(value)


def check_window(model: torch.nn.Module, patch_size: int, overlap: int) -> None:
    """Raise InferenceInputError unless the window fits the network (size multiple, overlap < patch)."""
    patch_size = _positive_int("patch_size", patch_size)
    if isinstance(overlap, bool) or not isinstance(overlap, numbers.Integral) or not 0 <= overlap < patch_size:
        raise InferenceInputError(f"overlap: expected an integer in [0, patch_size={patch_size}), got {overlap!r}")
    multiple = int(getattr(model, "size_multiple", 1))
    if patch_size % multiple:
        raise InferenceInputError(f"patch_size: must be a multiple of {multiple} for this network "
                                  f"(2**(levels-1)), got {patch_size}")


def resolve_device(device: Union[str, torch.device] = "auto") -> torch.device:
    """``devices.resolve_device`` ("auto" -> CUDA when available, else CPU; "cuda:N" checked
    against this machine's GPUs), its errors as InferenceInputError."""
    try:
        return devices.resolve_device(device)
    except ValueError as e:
        raise InferenceInputError(str(e)) from None


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """Autocast dtype for ``precision`` on ``device``; None means plain float32.

    "auto": bf16 on CUDA GPUs that support it, float32 otherwise (also on CPU, where bf16
    autocast is slow on most processors). "fp32", "bf16", "fp16": as named.
    """
    if precision not in PRECISIONS:
        raise InferenceInputError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        if device.type == "cuda" and devices.cuda_bf16_is_native(device):
            return torch.bfloat16
        return None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ----------------------------------------------------------------------------- prediction

def case_inputs(case: Case, device: torch.device):
    """(condition (1, 1 + S, X, Y, Z) = [ct, masks_sdf], constraints (1, K)) float32 on ``device``."""
    ct = torch.from_numpy(np.ascontiguousarray(case.ct, dtype=np.float32))[None]
    sdf = torch.from_numpy(np.ascontiguousarray(case.masks_sdf, dtype=np.float32))
    condition = torch.cat([ct, sdf], dim=0)[None].to(device)
    constraints = torch.from_numpy(np.asarray(case.constraints, dtype=np.float32))[None].to(device)
    return condition, constraints


def possible_dose_mask(case: Case) -> Optional[np.ndarray]:
    """The case's ``possible_dose_mask`` extra as a boolean (X, Y, Z) array, or None."""
    mask = case.extras.get(POSSIBLE_DOSE_KEY)
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.shape != case.shape:
        raise InferenceInputError(f"case {case.case_id!r}: {POSSIBLE_DOSE_KEY} has shape {mask.shape}, "
                                  f"expected the CT shape {case.shape}")
    return mask != 0


def _predict_baseline(model, condition, constraints, scale_gy, window, forward_dtype, progress):
    device = condition.device

    def predictor(windows, constraint_rows):
        with _autocast(device, forward_dtype):
            return model(windows, constraint_rows)

    dose_over_rx = sliding_window_inference(condition, predictor, volume_args=(constraints,),
                                            progress=progress, **window)
    return dose_over_rx[0, 0] * scale_gy


def _predict_ddpm(model, condition, constraints, scale_gy, window, forward_dtype, progress, schedule,
                  ddim_steps, mode, eta, generator):
    device = condition.device

    def noise_predictor(x, t, constraint_rows):
        with _autocast(device, forward_dtype):
            return model(x, t, constraint_rows)

    x0 = predict_full_volume(noise_predictor, condition, constraints, schedule, ddim_steps=ddim_steps,
                             mode=mode, eta=eta, generator=generator, progress=progress, **window)
    return unit_to_dose(x0[0, 0], scale_gy)


@torch.no_grad()
def predict_case(model: torch.nn.Module, info, case: Case, patch_size: Optional[int] = None,
                 overlap: Optional[int] = None,
                 batch_size: int = 1, ddim_steps: int = 50, samples: int = 1,
                 device: Union[str, torch.device] = "cpu", generator: Optional[torch.Generator] = None,
                 progress: bool = False, precision: str = "auto", mode: str = "synchronous",
                 eta: float = 0.0, mask_outside: bool = True) -> Prediction:
    """Predict the dose (Gy) of one case with a baseline or diffusion model.

    model, info: as returned by ``load_model_from_checkpoint`` (``info`` dict or object with
        ``model_kind``, ``structures``, ``rx_dose_gy`` and, for ddpm, the noise schedule).
        The model is moved to ``device`` and put in eval mode.
    case: a ``Case`` with the model's structures in the model's channel order; ``dose`` may be None.
    patch_size, overlap: window size and minimum overlap (voxels); patch_size must be a multiple
        of the network's ``size_multiple``. None (default): the checkpoint's training patch size
        (128 when it records none) and patch_size // 4, as ``vmat-infer`` (``window_settings``).
    batch_size: windows per forward pass.
    ddim_steps, mode, eta: DDIM settings (ddpm only; see ``predict_full_volume``); eta in [0, 1].
    samples: number of diffusion samples K (ddpm only); K > 1 gives the mean and ``std_gy``.
    device: "cpu", "cuda[:N]" or "auto". generator: torch.Generator for the diffusion noise
        (reproducible samples); None draws from torch's global generator.
    precision: "auto" (bf16 autocast on supporting CUDA GPUs, float32 on CPU), "fp32", "bf16", "fp16".
    mask_outside: set the dose to 0 outside the case's ``possible_dose_mask`` (when it has one).

    Returns a ``Prediction`` (dose_gy (X, Y, Z) float32 >= 0, std_gy or None, metadata).
    Raises InferenceInputError (a ValueError) when the case or a setting does not fit the model.
    """
    kind = check_model(model, info)
    samples = _positive_int("samples", samples)
    if kind == "baseline" and samples > 1:
        raise InferenceInputError(f"samples: the baseline model is deterministic, so samples={samples} "
                                  "would repeat one prediction; use samples=1 (K > 1 needs a ddpm checkpoint)")
    batch_size = _positive_int("batch_size", batch_size)
    patch_size, overlap = window_settings(info, patch_size, overlap)
    check_window(model, patch_size, overlap)
    check_case_matches_model(model, info, case)
    if mode not in PREDICT_MODES:
        raise InferenceInputError(f"mode: expected one of {', '.join(PREDICT_MODES)}, got {mode!r}")
    try:
        eta = check_eta(eta)
    except ValueError as e:
        raise InferenceInputError(str(e)) from None
    device = resolve_device(device)
    forward_dtype = autocast_dtype(precision, device)
    scale_gy = model_dose_scale(info)
    schedule = None
    if kind == "ddpm":
        ddim_steps = _positive_int("ddim_steps", ddim_steps)
        schedule = schedule_from_info(info)
        if ddim_steps > schedule.timesteps:
            raise InferenceInputError(f"ddim_steps: at most the schedule's {schedule.timesteps} timesteps, "
                                      f"got {ddim_steps}")

    model = model.to(device).eval()
    condition, constraints = case_inputs(case, device)
    keep = possible_dose_mask(case) if mask_outside else None
    keep_t = torch.from_numpy(keep).to(device) if keep is not None else None
    window = dict(patch_size=int(patch_size), overlap=int(overlap), batch_size=batch_size)

    total = torch.zeros(case.shape, dtype=torch.float64, device=device)
    total_sq = torch.zeros_like(total) if samples > 1 else None
    for _ in range(samples):
        if kind == "baseline":
            dose = _predict_baseline(model, condition, constraints, scale_gy, window, forward_dtype, progress)
        else:
            dose = _predict_ddpm(model, condition, constraints, scale_gy, window, forward_dtype, progress,
                                 schedule, ddim_steps, mode, eta, generator)
        dose = dose.to(torch.float64).clamp_(min=0.0)
        if keep_t is not None:
            dose = dose * keep_t
        total += dose
        if total_sq is not None:
            total_sq += dose * dose
    mean = total / samples
    std = None
    if total_sq is not None:
        # Sample variance from the running sums (float64 keeps the cancellation harmless here).
        variance = (total_sq - samples * mean * mean).clamp_(min=0.0) / (samples - 1)
        std = variance.sqrt().to(torch.float32).cpu().numpy()

    metadata = {
        "case_id": case.case_id,
        "model_kind": kind,
        "checkpoint": info_value(info, "path") or info_value(info, "checkpoint_path"),
        "samples": samples,
        "ddim_steps": ddim_steps if kind == "ddpm" else None,
        "mode": mode if kind == "ddpm" else None,
        "eta": float(eta) if kind == "ddpm" else None,
        "patch_size": int(patch_size),
        "overlap": int(overlap),
        "batch_size": batch_size,
        "precision": {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[forward_dtype],
        "device": str(device),
        "mask_outside": bool(mask_outside and keep is not None),
        "dose_scale_gy": scale_gy,
        "spacing_mm": list(case.spacing_mm),
        "shape": list(case.shape),
        "structures": case.structures,
        "rx_dose_gy": case.rx_dose_gy,
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return Prediction(dose_gy=mean.to(torch.float32).cpu().numpy(), std_gy=std, metadata=metadata)


# ----------------------------------------------------------------------------- prediction files

def prediction_to_bytes(prediction: Prediction) -> bytes:
    """npz bytes with ``dose_pred_gy``, ``dose_std_gy`` (when present) and ``metadata`` (JSON string)."""
    arrays = {"dose_pred_gy": np.asarray(prediction.dose_gy, dtype=np.float32),
              "metadata": np.array(json.dumps(prediction.metadata, default=str))}
    if prediction.std_gy is not None:
        arrays["dose_std_gy"] = np.asarray(prediction.std_gy, dtype=np.float32)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def save_prediction(path, prediction: Prediction) -> Path:
    """Write ``prediction`` atomically to ``path`` (an .npz without pickles)."""
    path = Path(path)
    data = prediction_to_bytes(prediction)
    atomic_write(path, lambda f: f.write(data))
    return path


def load_prediction(path) -> Prediction:
    """Read a file written by ``save_prediction`` (never unpickles)."""
    path = Path(path)
    with np.load(path, allow_pickle=False) as npz:
        if "dose_pred_gy" not in npz.files:
            raise ValueError(f"{path}: not a prediction file (no 'dose_pred_gy'; has {npz.files})")
        dose = npz["dose_pred_gy"]
        std = npz["dose_std_gy"] if "dose_std_gy" in npz.files else None
        metadata = json.loads(str(npz["metadata"])) if "metadata" in npz.files else {}
    return Prediction(dose_gy=dose, std_gy=std, metadata=metadata)


# ----------------------------------------------------------------------------- metrics

def _finite_or_none(value) -> Optional[float]:
    value = float(value)
    return value if math.isfinite(value) else None


def target_names(case: Case) -> List[str]:
    """Present target structures of the case (OpenKBP's rule: names starting with "PTV")."""
    return [name for name in case.present_structures() if is_default_target(name)]


def gamma_metrics(pred_gy: np.ndarray, case: Case, subsample: int = 2, dose_percent: float = 3.0,
                  distance_mm: float = 3.0, cutoff_percent: float = 10.0, target_margin_mm: float = 5.0,
                  device: Union[str, torch.device] = "cpu") -> dict:
    """Global gamma pass rates of ``pred_gy`` against ``case.dose`` on a subsampled grid.

    Every ``subsample``-th voxel along each axis is kept (spacing scaled by ``subsample``;
    1 = full resolution); gamma is normalised to the reference maximum (global), voxels under
    ``cutoff_percent`` of it are not evaluated. One gamma map gives both rates: over all
    evaluated voxels, and over those inside the union of the targets grown by
    ``target_margin_mm`` (grown at full resolution, then subsampled).

    Returns ``pass_rate`` and ``target_pass_rate`` (percent, None when no voxel is evaluated
    or the case has no target), ``evaluated_voxels``, ``target_voxels`` and the settings.
    """
    subsample = _positive_int("gamma_subsample", subsample)
    step = (slice(None, None, subsample),) * 3
    spacing = [s * subsample for s in case.spacing_mm]
    device = torch.device(device)
    reference = torch.from_numpy(np.ascontiguousarray(case.dose[step], dtype=np.float32)).to(device)
    evaluated = torch.from_numpy(np.ascontiguousarray(np.asarray(pred_gy)[step], dtype=np.float32)).to(device)
    gamma = gamma_index(reference, evaluated, spacing, dose_percent=dose_percent, distance_mm=distance_mm,
                        cutoff_percent=cutoff_percent, local=False).cpu()
    targets = target_names(case)
    target_rate, target_voxels = None, 0
    if targets:
        union = np.logical_or.reduce([case.mask(name) for name in targets])
        region = torch.from_numpy(np.ascontiguousarray(dilate_mask(union, case.spacing_mm, target_margin_mm)[step]))
        target_voxels = int((region & ~torch.isnan(gamma)).sum())
        target_rate = _finite_or_none(pass_rate_from_gamma(gamma, mask=region))
    return {
        "pass_rate": _finite_or_none(pass_rate_from_gamma(gamma)),
        "target_pass_rate": target_rate,
        "evaluated_voxels": int((~torch.isnan(gamma)).sum()),
        "target_voxels": target_voxels,
        "dose_percent": float(dose_percent),
        "distance_mm": float(distance_mm),
        "cutoff_percent": float(cutoff_percent),
        "normalisation": "global (reference maximum)",
        "subsample": subsample,
        "spacing_mm": spacing,
        "targets": targets,
        "target_margin_mm": float(target_margin_mm),
    }


def case_metrics(pred_gy, case: Case, gamma_subsample: int = 2, dose_percent: float = 3.0,
                 distance_mm: float = 3.0, cutoff_percent: float = 10.0, target_margin_mm: float = 5.0,
                 v_doses_gy: Iterable[float] = (), compute_gamma: bool = True,
                 gamma_device: Union[str, torch.device] = "cpu", std_gy=None) -> dict:
    """Scores of a predicted dose ``pred_gy`` (X, Y, Z) Gy against the case's reference dose.

    Keys (JSON-able; None where a value cannot be computed):

    * ``case_id``.
    * ``mae_gy``: mean |pred - ref| in Gy over the case's ``possible_dose_mask`` (the body /
      region that can receive dose) when it has one, else over all voxels;
      ``mae_region`` names which ("possible_dose_mask" or "all_voxels").
    * ``dose_score``: OpenKBP dose score (``metrics.dose_score``), only with a possible-dose
      mask (then equal to ``mae_gy``), else None.
    * ``dvh_score``: OpenKBP DVH score (``metrics.dvh_score``, doses zeroed outside the
      possible-dose mask as OpenKBP does); None when no structure is present.
      ``dvh_score_details``: its rows (structure, metric, reference_gy, predicted_gy, difference_gy).
    * ``dvh_metrics``: {structure: {"reference": {...}, "predicted": {...}}} of
      ``dvh.dvh_metrics`` (D99, D98, D95, D2, D1, D0.1cc, Dmean, Dmax, volume_cc, V metrics
      for ``v_doses_gy``), present structures only.
    * ``goals``: ``metrics.compare_goals`` rows; ``goals_agree`` / ``goals_total`` count them;
      ``goals_site``: the site whose goals they are (``metrics.goal_site``: the case's metadata
      ``site``, else the one site whose structure list holds all the case's structures). When no
      site fits, ``goals_site``, ``goals``, ``goals_agree`` and ``goals_total`` are None and
      ``goals_not_checked`` says why (None when the goals were checked).
    * ``gamma_pass_rate``, ``gamma_pass_rate_targets``: global ``dose_percent`` % /
      ``distance_mm`` mm gamma pass rates (percent), every ``gamma_subsample``-th voxel
      (1 = full resolution); ``gamma``: the settings and voxel counts (``gamma_metrics``).
      With ``compute_gamma=False`` these are None.
    * ``mean_std_gy``: only when ``std_gy`` (the samples' standard deviation map) is given:
      its mean over the same region as ``mae_gy``.
    """
    if case.dose is None:
        raise ValueError(f"case {case.case_id!r}: no reference dose, metrics need one")
    pred = np.asarray(pred_gy.detach().cpu().numpy() if torch.is_tensor(pred_gy) else pred_gy, dtype=np.float32)
    if pred.shape != case.shape:
        raise ValueError(f"pred_gy: shape {pred.shape} differs from the case's {case.shape}")
    ref = case.dose
    keep = possible_dose_mask(case)
    masks = masks_from_case(case)

    result = {"case_id": case.case_id}
    if keep is not None and keep.any():
        result["mae_gy"] = mae_gy(pred, ref, keep)
        result["mae_region"] = "possible_dose_mask"
        result["dose_score"] = dose_score(pred, ref, keep)
    else:
        result["mae_gy"] = mae_gy(pred, ref)
        result["mae_region"] = "all_voxels"
        result["dose_score"] = None
    if std_gy is not None:
        std = np.asarray(std_gy, dtype=np.float64)
        result["mean_std_gy"] = float(std[keep].mean() if result["mae_region"] == "possible_dose_mask" else std.mean())
    details = dvh_score_details(pred, ref, masks, case.spacing_mm, possible_dose_mask=keep)
    result["dvh_score"] = float(np.mean([abs(r["difference_gy"]) for r in details])) if details else None
    result["dvh_score_details"] = details
    reference_table = dvh_table(ref, masks, case.spacing_mm, v_doses_gy)
    predicted_table = dvh_table(pred, masks, case.spacing_mm, v_doses_gy)
    result["dvh_metrics"] = {name: {"reference": reference_table[name], "predicted": predicted_table[name]}
                             for name in reference_table}
    try:
        site = goal_site(case)
    except UnknownSiteError as e:
        result["goals_site"] = result["goals"] = result["goals_agree"] = result["goals_total"] = None
        result["goals_not_checked"] = e.reason
    else:
        goals = compare_goals(pred, ref, case, site=site)
        result["goals_site"] = site.name
        result["goals_not_checked"] = None
        result["goals"] = goals
        result["goals_agree"] = sum(1 for g in goals if g["agree"])
        result["goals_total"] = len(goals)
    if compute_gamma:
        gamma = gamma_metrics(pred, case, gamma_subsample, dose_percent, distance_mm, cutoff_percent,
                              target_margin_mm, device=gamma_device)
        result["gamma_pass_rate"] = gamma["pass_rate"]
        result["gamma_pass_rate_targets"] = gamma["target_pass_rate"]
        result["gamma"] = gamma
    else:
        result["gamma_pass_rate"] = result["gamma_pass_rate_targets"] = result["gamma"] = None
    return result


# ----------------------------------------------------------------------------- tables of many cases

SCALAR_METRICS = ("mae_gy", "dose_score", "dvh_score", "gamma_pass_rate", "gamma_pass_rate_targets",
                  "goals_agree", "goals_total", "mean_std_gy")


def flat_metrics(metrics: Mapping) -> Dict[str, object]:
    """One flat row of a ``case_metrics`` dict: ``case_id``, the scalar metrics, and one
    ``<structure>_<metric>_diff_gy`` column (predicted - reference) per DVH-score row."""
    row = {"case_id": metrics.get("case_id")}
    for key in SCALAR_METRICS:
        if key in metrics:
            row[key] = metrics[key]
    for detail in metrics.get("dvh_score_details") or ():
        row[f"{detail['structure']}_{detail['metric']}_diff_gy"] = detail["difference_gy"]
    return row


def summarize_metrics(rows: Sequence[Mapping]) -> dict:
    """Mean and sd (ddof=1; None for fewer than 2 values) of every numeric column over ``rows``.

    rows: flat rows (``flat_metrics``); None values are left out of a column.
    Returns ``{"n_cases", "mean": {column: value}, "sd": {column: value}, "n": {column: count}}``.
    """
    columns: List[str] = []
    for row in rows:
        columns += [key for key, value in row.items() if key not in columns and _is_number(value)]
    mean, sd, count = {}, {}, {}
    for column in columns:
        values = np.array([float(row[column]) for row in rows if _is_number(row.get(column))])
        count[column] = int(values.size)
        mean[column] = float(values.mean()) if values.size else None
        sd[column] = float(values.std(ddof=1)) if values.size > 1 else None
    return {"n_cases": len(rows), "mean": mean, "sd": sd, "n": count}


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))
