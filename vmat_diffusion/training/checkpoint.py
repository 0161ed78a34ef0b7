"""Training checkpoints: format, atomic save, safe load (``weights_only=True`` only).

Format (a dict saved with ``torch.save``; only tensors and plain Python values, so
``torch.load(path, weights_only=True)`` reads it and nothing in it can run code)::

    format_version   int, FORMAT_VERSION
    model_kind       "baseline" | "ddpm"
    model_class      "BaselineUNet3D" | "SimpleUNet3D"
    model_config     constructor kwargs of the model (``type(model)(**model_config)`` rebuilds it)
    model            state_dict of the trained weights (no DDP ``module.`` prefix)
    ema              {"decay", "num_updates", "module": state_dict} or None
    optimizer        AdamW state_dict
    scheduler        {"name": "cosine", "base_lr", "min_lr", "warmup_steps", "total_steps", "step"}
                     (schedule position of the next step: epochs done x optimizer steps per epoch)
    scaler           GradScaler state_dict ({} when fp16 loss scaling is off)
    epoch            epochs completed (1-based count; training resumes with the next one)
    global_step      optimizer steps taken
    best             [{"epoch", "val_mae_gy", "file"}] best checkpoints kept, best first
    early_stopping   {"best_val_mae_gy", "best_epoch", "validations_without_improvement"}
    history          {"epoch_times_sec": [...], "elapsed_sec": float}
    config           TrainConfig as a plain dict
    structures       structure names, channel order of ``masks_sdf``
    constraint_dim   length of the constraint vector
    rx_dose_gy       dose scale used in training (baseline output x rx_dose_gy = Gy)
    schedule         {"timesteps", "schedule"} (ddpm) or None
    split            {"train": [case ids], "val": [...], "test": [...]}
    rng              {"torch_cpu": ByteTensor, "torch_cuda": [ByteTensor, ...], "numpy": dict,
                      "python": list, "train_generator": ByteTensor or None,
                      "data": {"seed", "scheme"}}
    metrics          metrics of the last epoch (plain floats, None where not computed)

Writes go through ``fileio.atomic_open`` (temporary file, fsync, rename): a process killed at
any moment leaves the previous file whole. ``save_checkpoint`` refuses to write a checkpoint
holding NaN or Inf weights.
"""
from __future__ import annotations

import pickle
import random
import zipfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..fileio import atomic_open
from ..unet import BaselineUNet3D, SimpleUNet3D

FORMAT_VERSION = 1
MODEL_CLASSES = {"BaselineUNet3D": BaselineUNet3D, "SimpleUNet3D": SimpleUNet3D}
REQUIRED_KEYS = ("format_version", "model_kind", "model_class", "model_config", "model")


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, not ours, or holds pickled Python objects."""


# --------------------------------------------------------------------------- RNG states


def capture_rng_state(train_generator: Optional[torch.Generator] = None) -> Dict[str, Any]:
    """Every global RNG state as tensors / plain values (loadable with weights_only=True)."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state = {**numpy_state, "state": {"key": [int(k) for k in numpy_state["state"]["key"]],
                                            "pos": int(numpy_state["state"]["pos"])},
                   "has_gauss": int(numpy_state["has_gauss"]), "gauss": float(numpy_state["gauss"])}
    version, internal, gauss = random.getstate()
    return {
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": numpy_state,
        "python": [version, list(internal), gauss],
        "train_generator": train_generator.get_state() if train_generator is not None else None,
    }


def restore_rng_state(state: Dict[str, Any], train_generator: Optional[torch.Generator] = None) -> None:
    """Inverse of ``capture_rng_state`` (CUDA states only where the same devices exist).

    ``train_generator``'s state is restored only when it was saved from a generator of the same
    kind: a CUDA generator's state (16 bytes) does not fit a CPU generator (5056) or the other
    way round, as when a run saved on a GPU is resumed on a CPU. (``Trainer`` reseeds its
    generator at every epoch start anyway, so its resume stays exact.)"""
    torch.set_rng_state(state["torch_cpu"])
    cuda_states = state.get("torch_cuda") or []
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    numpy_state = dict(state["numpy"])
    numpy_state["state"] = {"key": np.asarray(numpy_state["state"]["key"], dtype=np.uint32),
                            "pos": int(numpy_state["state"]["pos"])}
    np.random.set_state(numpy_state)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    saved = state.get("train_generator")
    if train_generator is not None and saved is not None and saved.numel() == train_generator.get_state().numel():
        train_generator.set_state(saved)


# --------------------------------------------------------------------------- helpers


def strip_module_prefix(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Remove the ``module.`` prefix DDP/DataParallel add to every key."""
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}


def best_checkpoint_name(epoch: int, val_mae_gy: float) -> str:
    """``best-epoch=007-val_mae_gy=1.23.ckpt``."""
    return f"best-epoch={int(epoch):03d}-val_mae_gy={float(val_mae_gy):.2f}.ckpt"


def to_plain(value):
    """Recursively convert numpy scalars/arrays and Paths to plain Python values; tensors kept."""
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, torch.Tensor) or value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"checkpoint values must be tensors or plain values, got {type(value).__name__}")


def non_finite_tensors(tree, prefix: str = "") -> list:
    """Names of floating-point tensors in a nested dict/list that hold NaN or Inf."""
    bad = []
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point() and not bool(torch.isfinite(tree).all()):
            bad.append(prefix or "<tensor>")
    elif isinstance(tree, dict):
        for key, value in tree.items():
            bad += non_finite_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            bad += non_finite_tensors(value, f"{prefix}[{i}]")
    return bad


# --------------------------------------------------------------------------- save / load


def save_checkpoint(path, checkpoint: Dict[str, Any]) -> Path:
    """Atomically write ``checkpoint``; CheckpointError if model/EMA weights are not finite."""
    path = Path(path)
    bad = non_finite_tensors({"model": checkpoint.get("model"), "ema": checkpoint.get("ema")})
    if bad:
        raise CheckpointError(f"{path}: refusing to write a checkpoint with non-finite weights "
                              f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})")
    with atomic_open(path, "wb") as f:
        torch.save(checkpoint, f)
    return path


def load_checkpoint(path, map_location="cpu", mmap: bool = False) -> Dict[str, Any]:
    """Read a training checkpoint with ``torch.load(weights_only=True)``.

    mmap: map the tensors' storage instead of reading it (cheap when only the plain values,
    e.g. ``config``, are wanted).

    Raises CheckpointError naming the file when it is missing, not a PyTorch checkpoint,
    holds pickled Python objects (refused: unpickling can run arbitrary code), or is not a
    vmat_diffusion training checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (expected a torch.save zip archive)")
    if _is_npz(path):
        raise CheckpointError(f"{path}: a numpy .npz archive (a case file?), not a checkpoint; expected "
                              "a .ckpt written by vmat-train (e.g. checkpoints/best.ckpt)")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "global" in str(e).lower():
            raise CheckpointError(f"{path}: holds non-tensor (pickled Python) objects, which are refused "
                                  "because loading them can run arbitrary code; only checkpoints of "
                                  "tensors and plain values are accepted") from None
        raise CheckpointError(f"{path}: unreadable checkpoint ({_first_line(e)})") from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: unreadable or truncated checkpoint ({_first_line(e)})") from None
    if not isinstance(checkpoint, dict) or "format_version" not in checkpoint:
        raise CheckpointError(f"{path}: not a vmat_diffusion training checkpoint (no 'format_version')")
    if checkpoint["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {checkpoint['format_version']} is not supported "
                              f"(this version reads format {FORMAT_VERSION})")
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    return checkpoint


def _is_npz(path: Path) -> bool:
    """True for a zip of top-level .npy members (numpy.savez); torch.save archives keep theirs in a folder."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return bool(names) and all(name.endswith(".npy") and "/" not in name for name in names)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def build_model(model_class: str, model_config: Dict[str, Any]) -> nn.Module:
    """Instantiate ``BaselineUNet3D`` or ``SimpleUNet3D`` from its recorded constructor kwargs."""
    if model_class not in MODEL_CLASSES:
        raise CheckpointError(f"unknown model_class {model_class!r} (known: {', '.join(MODEL_CLASSES)})")
    return MODEL_CLASSES[model_class](**model_config)


def load_model_from_checkpoint(path, use_ema: bool = True, map_location="cpu") -> Tuple[nn.Module, Dict[str, Any]]:
    """Rebuild the trained model (eval mode) from a checkpoint.

    use_ema: load the EMA weights when the checkpoint has them (else the raw weights).
    Returns ``(model, info)``; info holds model_kind, model_class, model_config, structures,
    constraint_dim, rx_dose_gy, schedule ({"timesteps", "schedule"} or None), epoch,
    global_step, metrics, config, split, used_ema and path.
    """
    checkpoint = load_checkpoint(path, map_location=map_location)
    model = build_model(checkpoint["model_class"], checkpoint["model_config"])
    ema = checkpoint.get("ema")
    used_ema = bool(use_ema and ema is not None)
    state = ema["module"] if used_ema else checkpoint["model"]
    try:
        model.load_state_dict(strip_module_prefix(state))
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit {checkpoint['model_class']}"
                              f"({checkpoint['model_config']}): {_first_line(e)}") from None
    model.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu").eval()
    info = {key: checkpoint.get(key) for key in ("model_kind", "model_class", "model_config", "structures",
                                                 "constraint_dim", "rx_dose_gy", "schedule", "epoch",
                                                 "global_step", "metrics", "config", "split")}
    info["used_ema"] = used_ema
    info["path"] = str(path)
    return model, info

