"""Run outputs in ``<log_dir>/<exp_name>/`` (written by rank 0 only).

* ``training_config.json``  environment, model, hyperparameters and data split (at start)
* ``epoch_metrics.csv``     one row per epoch: ``EPOCH_COLUMNS``
* ``training_summary.json`` end time, duration, best epoch, final metrics (at the end)
* TensorBoard events: scalars ``train/loss``, ``val/loss``, ``val/mae_gy``,
  ``val/gamma_3mm3pct`` (only when computed), ``misc/gpu_memory_gb`` (peak allocated CUDA
  memory of the epoch; 0 on CPU), ``misc/eta_hours``, ``lr-AdamW``, all against the epoch
  number; the hparams summary; and per epoch an image ``val/example_slices``: mid-axial slice
  of CT, reference dose, predicted dose and their difference (axial slice at the middle Z,
  shown with anterior at the top and the patient's right on the left).
* ``checkpoints/``          written by ``checkpoint.py``
"""
from __future__ import annotations

import csv
import io
import math
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from ..fileio import atomic_write_json, atomic_write_text

EPOCH_COLUMNS = ("epoch", "epoch_time_sec", "train_loss", "val_loss", "val_mae_gy", "learning_rate", "val_gamma")
HPARAM_METRICS = ("val/mae_gy", "val/loss", "val/gamma_3mm3pct")
IMAGE_TAG = "val/example_slices"


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def environment_info() -> Dict[str, object]:
    """Versions, platform and GPUs of this machine (plain values)."""
    info: Dict[str, object] = {
        "python_version": sys.version.split()[0],
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "cudnn_version": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "platform": platform.platform(),
        "hostname": platform.node(),
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
    }
    if info["gpu_count"]:
        props = torch.cuda.get_device_properties(0)
        info["gpu_name"] = props.name
        info["gpu_memory_gb"] = round(props.total_memory / 1e9, 2)
    else:
        info["gpu_name"] = None
        info["gpu_memory_gb"] = None
    return info


def count_parameters(model: torch.nn.Module) -> Dict[str, int]:
    return {"total_parameters": sum(p.numel() for p in model.parameters()),
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}


# --------------------------------------------------------------------------- images


_DOSE_COLORS = np.array([[0.0, 0.0, 0.3], [0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0],
                         [1.0, 0.0, 0.0], [0.5, 0.0, 0.0]])
_DIFF_COLORS = np.array([[0.0, 0.0, 1.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])


def colormap(values: np.ndarray, colors: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (H, W) -> RGB (H, W, 3) in [0, 1], piecewise-linear through ``colors``."""
    v = np.clip(np.nan_to_num(values), 0.0, 1.0) * (len(colors) - 1)
    low = np.minimum(v.astype(int), len(colors) - 2)
    frac = (v - low)[..., None]
    return colors[low] * (1 - frac) + colors[low + 1] * frac


def slice_panel(ct: np.ndarray, reference_gy: np.ndarray, predicted_gy: np.ndarray, min_height: int = 128) -> np.ndarray:
    """CT | reference | prediction | difference at the middle axial slice, uint8 (H, W, 3).

    Inputs are (X, Y, Z) volumes; dose panels share one colour scale (0 .. max reference),
    the difference (prediction - reference) is blue (under) - white - red (over), symmetric.
    Slices shorter than ``min_height`` pixels are enlarged by an integer factor.
    """
    z = ct.shape[2] // 2
    ct_s, ref_s, pred_s = (np.asarray(v[:, :, z], dtype=np.float64).T for v in (ct, reference_gy, predicted_gy))
    dose_max = max(float(ref_s.max()), float(pred_s.max()), 1e-6)
    diff = pred_s - ref_s
    diff_max = max(float(np.abs(diff).max()), 1e-6)
    ct_rgb = np.repeat(np.clip(ct_s, 0, 1)[..., None], 3, axis=2)
    panels = [ct_rgb, colormap(ref_s / dose_max, _DOSE_COLORS), colormap(pred_s / dose_max, _DOSE_COLORS),
              colormap(diff / (2 * diff_max) + 0.5, _DIFF_COLORS)]
    scale = max(1, min_height // ct_rgb.shape[0])  # small volumes: enlarge (nearest) to be visible
    panels = [panel.repeat(scale, axis=0).repeat(scale, axis=1) for panel in panels]
    gap = np.ones((panels[0].shape[0], 2, 3))
    image = np.concatenate([part for panel in panels for part in (panel, gap)][:-1], axis=1)
    return (image * 255).round().astype(np.uint8)


# --------------------------------------------------------------------------- the log


def _csv_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return str(value)


def refuse_earlier_run(run_dir: Path, resuming: bool, resume: str = "--resume",
                       elsewhere: str = "--exp_name or --log_dir") -> None:
    """ValueError when ``run_dir`` already holds checkpoints and this run does not resume them: a
    fresh run there would mix its checkpoints, metrics and TensorBoard events with that run's.
    ``resume``, ``elsewhere``: how the caller's user resumes and chooses another run folder (the
    CLI's flags by default), named in the message."""
    earlier = sorted((Path(run_dir) / "checkpoints").glob("*.ckpt"), key=lambda path: path.name != "last.ckpt")
    if earlier and not resuming:
        raise ValueError(f"log_dir: {run_dir} already holds a run ({earlier[0].name}); continue it with "
                         f"{resume} {Path(run_dir) / 'checkpoints' / 'last.ckpt'}, or choose another {elsewhere}, "
                         "or delete that folder")


class RunLog:
    """Files and TensorBoard events of one run; every method is a no-op when ``enabled`` is False
    (ranks other than 0)."""

    def __init__(self, run_dir, enabled: bool = True, first_epoch: int = 1):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.run_dir / "epoch_metrics.csv"
        self._prepare_csv(keep_before=first_epoch)
        from torch.utils.tensorboard import SummaryWriter
        # purge_step drops events of epochs >= first_epoch left by an interrupted run.
        self.writer = SummaryWriter(log_dir=str(self.run_dir), purge_step=first_epoch if first_epoch > 1 else None)

    def _prepare_csv(self, keep_before: int) -> None:
        """Start the CSV, keeping rows of epochs < ``keep_before`` (a resumed run redoes the rest)."""
        rows = []
        if keep_before > 1 and self.csv_path.is_file():
            with open(self.csv_path, newline="") as f:
                rows = [row for row in csv.DictReader(f) if row.get("epoch", "").isdigit()
                        and int(row["epoch"]) < keep_before]
        buffer = io.StringIO()
        out = csv.DictWriter(buffer, fieldnames=EPOCH_COLUMNS, lineterminator="\n")
        out.writeheader()
        out.writerows({key: row.get(key, "") for key in EPOCH_COLUMNS} for row in rows)
        atomic_write_text(self.csv_path, buffer.getvalue())

    def write_config(self, config: Dict[str, object]) -> None:
        if self.enabled:
            atomic_write_json(self.run_dir / "training_config.json", config)

    def write_summary(self, summary: Dict[str, object]) -> None:
        if not self.enabled:
            return
        atomic_write_json(self.run_dir / "training_summary.json", summary)
        from torch.utils.tensorboard.summary import hparams
        _, _, session_end = hparams({"model": ""}, {tag: 0.0 for tag in HPARAM_METRICS})
        self.writer.file_writer.add_summary(session_end)
        self.writer.flush()

    def log_hparams(self, hparam_values: Dict[str, object]) -> None:
        """The hparams-plugin summary; its metrics are the ``val/*`` scalars logged per epoch."""
        if not self.enabled:
            return
        from torch.utils.tensorboard.summary import hparams
        clean = {k: (v if isinstance(v, (bool, int, float, str)) else str(v)) for k, v in hparam_values.items()}
        experiment, session_start, _ = hparams(clean, {tag: 0.0 for tag in HPARAM_METRICS})
        self.writer.file_writer.add_summary(experiment)
        self.writer.file_writer.add_summary(session_start)

    def log_epoch(self, row: Dict[str, object], scalars: Dict[str, Optional[float]]) -> None:
        """Append one CSV row (keys ``EPOCH_COLUMNS``) and the TensorBoard scalars (None skipped)."""
        if not self.enabled:
            return
        with open(self.csv_path, "a", newline="") as f:
            csv.writer(f, lineterminator="\n").writerow([_csv_value(row.get(key)) for key in EPOCH_COLUMNS])
        epoch = int(row["epoch"])
        for tag, value in scalars.items():
            if value is not None and math.isfinite(value):
                self.writer.add_scalar(tag, float(value), epoch)
        self.writer.flush()

    def log_image(self, image_hwc: np.ndarray, epoch: int, tag: str = IMAGE_TAG) -> None:
        if self.enabled:
            self.writer.add_image(tag, image_hwc, epoch, dataformats="HWC")
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def read_epoch_metrics(path) -> Sequence[Dict[str, str]]:
    """Rows of an ``epoch_metrics.csv`` as dicts of strings."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))

