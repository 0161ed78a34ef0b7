"""``vmat-infer``: predict the dose of one case or a folder of cases with a trained checkpoint.

    vmat-infer --checkpoint best.ckpt --input case.npz [--output pred/case_pred.npz] --compute_metrics
    vmat-infer --checkpoint best.ckpt --input_dir cases/ --output_dir pred/ --compute_metrics

Works for both model kinds from the checkpoint alone (structures, dose scale, noise schedule and
the training patch size are read from it).

Outputs
-------
* ``<case_id>_pred.npz`` per case (atomic write, no pickles): ``dose_pred_gy`` (X, Y, Z) float32
  Gy, ``dose_std_gy`` (only for ``--samples K`` > 1: voxel-wise sd of the K diffusion samples),
  ``metadata`` (JSON string: case_id, checkpoint, model_kind, ddim_steps, samples, patch_size,
  overlap, spacing_mm, structures, timestamp, ...). ``--input``: ``--output`` is the prediction
  file (a path ending in .npz, or an existing folder), default ``./<case_id>_pred.npz``;
  ``--output_dir`` may be given instead. ``--input_dir``: ``--output_dir`` (required) is the folder.
* With ``--compute_metrics``, next to the predictions: ``metrics.json`` (settings, one entry per
  case as ``inference.case_metrics`` returns it, cases skipped for lack of a reference dose, and a
  summary: mean and sd over cases) and ``metrics.csv`` (one row per case, then a ``mean`` and an
  ``sd`` row). Both are rewritten after every case, so a long run leaves partial results. A case
  whose structures fit no site of the constraint table (and whose metadata names none) gets no
  clinical goals (null in metrics.json, empty cells in metrics.csv; one note on stderr).
* ``<case_id>_dvh.png`` per case (predicted solid, reference dashed) when matplotlib is
  importable; skipped silently otherwise, or with ``--no_plots``.

Prediction: dose clamped to >= 0 Gy and set to 0 outside the case's ``possible_dose_mask`` when
it has one (``--no_mask_outside`` keeps the raw values there). Diffusion samples are drawn from
``torch.Generator().manual_seed(--seed)`` per case, so a case's result does not depend on the
other cases in the run.

Exit codes: 0 success; 2 bad input (missing or unreadable checkpoint, unknown model kind, a case
whose structures differ from the model's, ``--samples`` > 1 with a baseline model, ...), with
one message on stderr and no traceback.
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..case import Case, CaseFormatError, find_cases, load_case, read_metadata_array
from ..constraints import SITES
from ..dvh import dvh
from ..fileio import atomic_write, atomic_write_json, atomic_write_text, non_folder_on_path
from ..host_memory import keep_freed_memory
from ..inference import (PRECISIONS, InferenceInputError, check_model, check_structures, flat_metrics,
                         case_metrics, predict_case, resolve_device, save_prediction, summarize_metrics,
                         window_settings)
from ..sliding_window import PREDICT_MODES
from ..training.checkpoint import CheckpointError, load_model_from_checkpoint

PRED_SUFFIX = "_pred.npz"
METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmat-infer",
        description="Predict 3-D dose (Gy) for case files with a trained baseline or diffusion checkpoint; "
                    "optionally score it against the reference dose.")
    parser.add_argument("--checkpoint", required=True, help="training checkpoint (.ckpt) of either model kind")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="one case file (.npz)")
    source.add_argument("--input_dir", help="folder of case files (*.npz; *_pred.npz files are ignored)")
    parser.add_argument("--output", help="with --input: the prediction file (.npz) or an existing folder "
                                         "(default: ./<case_id>_pred.npz)")
    parser.add_argument("--output_dir", help="folder for <case_id>_pred.npz, metrics and plots "
                                             "(required with --input_dir)")
    parser.add_argument("--compute_metrics", action="store_true",
                        help="score each prediction against the case's reference dose (metrics.json, metrics.csv)")
    parser.add_argument("--gamma_subsample", type=_positive_int, default=2,
                        help="gamma on every N-th voxel per axis (1 = full resolution; default: %(default)s)")
    parser.add_argument("--ddim_steps", type=_positive_int, default=50, help="DDIM steps (ddpm; default: %(default)s)")
    parser.add_argument("--samples", type=_positive_int, default=1,
                        help="diffusion samples K; K > 1 writes their mean and a voxel-wise sd (default: 1)")
    parser.add_argument("--mode", choices=PREDICT_MODES, default="synchronous",
                        help="how diffusion windows are combined (default: %(default)s)")
    parser.add_argument("--patch_size", type=_positive_int, default=None,
                        help="window size in voxels (default: the training patch size, else 128)")
    parser.add_argument("--overlap", type=_non_negative_int, default=None,
                        help="minimum window overlap in voxels (default: patch_size // 4)")
    parser.add_argument("--batch_size", type=_positive_int, default=1, help="windows per forward pass (default: 1)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="auto: bf16 autocast on CUDA GPUs that support it, fp32 otherwise (default)")
    ema = parser.add_mutually_exclusive_group()
    ema.add_argument("--use_ema", dest="use_ema", action="store_true", default=None,
                     help="use the EMA weights (the default when the checkpoint has them)")
    ema.add_argument("--no_ema", dest="use_ema", action="store_false", help="use the raw (non-EMA) weights")
    parser.add_argument("--no_mask_outside", action="store_true",
                        help="keep the predicted dose outside the case's possible_dose_mask (default: set to 0)")
    parser.add_argument("--seed", type=_non_negative_int, default=0,
                        help="seed of the diffusion noise, per case (default: %(default)s)")
    parser.add_argument("--no_plots", action="store_true", help="do not write DVH plots")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, no per-case lines")
    return parser


# ----------------------------------------------------------------------------- inputs and outputs

def case_header(path: Path) -> Optional[dict]:
    """The ``metadata`` of a case file, read without loading its arrays; None if unreadable
    (``load_case`` then reports the problem when the case is reached)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            meta = read_metadata_array(path, npz["metadata"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # CaseFormatError is a ValueError
        return None
    return meta if isinstance(meta, dict) else None


def input_cases(args) -> List[Path]:
    """The case files to predict; InferenceInputError when there are none."""
    if args.input is not None:
        path = Path(args.input)
        if not path.is_file():
            raise InferenceInputError(f"--input: case file {path} not found")
        return [path]
    folder = Path(args.input_dir)
    if not folder.is_dir():
        raise InferenceInputError(f"--input_dir: {folder} is not a folder")
    paths = [p for p in find_cases(folder) if not p.name.endswith(PRED_SUFFIX)]
    if not paths:
        raise InferenceInputError(f"--input_dir: no case files (*.npz) in {folder}")
    return paths


def output_paths(args, case_ids: Sequence[str]) -> Dict[str, Path]:
    """case_id -> prediction file, from --output / --output_dir (see the module docstring)."""
    outputs = _output_paths(args, case_ids)
    flag = "--output" if args.output is not None else "--output_dir"
    for folder in {path.parent for path in outputs.values()}:
        blocking = non_folder_on_path(folder)
        if blocking is not None:
            raise InferenceInputError(f"{flag}: {blocking} exists and is not a folder")
    return outputs


def _output_paths(args, case_ids: Sequence[str]) -> Dict[str, Path]:
    if args.input_dir is not None:
        if args.output is not None:
            raise InferenceInputError("--output names one prediction file; with --input_dir use --output_dir")
        if args.output_dir is None:
            raise InferenceInputError("--output_dir is required with --input_dir")
        folder = Path(args.output_dir)
        return {case_id: folder / f"{case_id}{PRED_SUFFIX}" for case_id in case_ids}
    (case_id,) = case_ids
    if args.output is not None and args.output_dir is not None:
        raise InferenceInputError("give either --output (the prediction file) or --output_dir, not both")
    if args.output is not None:
        output = Path(args.output)
        if output.is_dir():
            return {case_id: output / f"{case_id}{PRED_SUFFIX}"}
        if output.suffix != ".npz":
            raise InferenceInputError(f"--output: expected a prediction file ending in .npz or an existing "
                                      f"folder, got {output}")
        return {case_id: output}
    folder = Path(args.output_dir) if args.output_dir is not None else Path(".")
    return {case_id: folder / f"{case_id}{PRED_SUFFIX}"}


def check_not_overwriting_inputs(outputs: Dict[str, Path], inputs: Sequence[Path]) -> None:
    """InferenceInputError when a prediction file would replace one of the input case files."""
    sources = {p.resolve() for p in inputs}
    for path in outputs.values():
        if path.resolve() in sources:
            raise InferenceInputError(f"--output: {path} is an input case file; choose another prediction path")


def check_headers(paths: Sequence[Path], info) -> List[str]:
    """Case ids of ``paths`` (file stem when unreadable); structures checked before any prediction."""
    case_ids = []
    for path in paths:
        meta = case_header(path)
        case_id = str(meta.get("case_id", path.stem)) if meta else path.stem
        if meta and isinstance(meta.get("structures"), list):
            try:
                check_structures(case_id, meta["structures"], info)
            except InferenceInputError as e:
                raise InferenceInputError(f"{path}: {e}") from None
        case_ids.append(case_id)
    duplicates = sorted({c for c in case_ids if case_ids.count(c) > 1})
    if duplicates:
        raise InferenceInputError(f"--input_dir: several files share case_id {duplicates}; "
                                  "their predictions would overwrite each other")
    return case_ids


def load_checkpoint_model(path: str, use_ema: Optional[bool]):
    """(model, info) on the CPU; InferenceInputError for a missing or foreign file."""
    if not Path(path).is_file():
        raise InferenceInputError(f"--checkpoint: file {path} not found")
    try:
        model, info = load_model_from_checkpoint(path, use_ema=use_ema is not False, map_location="cpu")
    except CheckpointError as e:
        raise InferenceInputError(f"--checkpoint: {e}") from None
    if use_ema and not info.get("used_ema"):
        print(f"note: {path} has no EMA weights; using the trained weights", file=sys.stderr)
    check_model(model, info)
    return model, info


# ----------------------------------------------------------------------------- metrics files and plots

def write_metrics(folder: Path, settings: dict, cases: List[dict], skipped: List[dict]) -> None:
    """metrics.json (settings, per-case metrics, skipped cases, summary) and metrics.csv."""
    rows = [flat_metrics(c) for c in cases]
    summary = summarize_metrics(rows)
    atomic_write_json(folder / METRICS_JSON, {"settings": settings, "cases": cases, "skipped": skipped,
                                              "summary": summary})
    atomic_write_text(folder / METRICS_CSV, metrics_csv(rows, summary))


def metrics_csv(rows: List[dict], summary: dict) -> str:
    """CSV text: one row per case, then ``mean`` and ``sd`` rows (empty cells where not defined)."""
    columns: List[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    if not columns:
        columns = ["case_id"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="", extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    for label in ("mean", "sd"):
        values = summary[label]
        writer.writerow({"case_id": label, **{k: ("" if v is None else v) for k, v in values.items()}})
    return buffer.getvalue()


def save_dvh_plot(path: Path, pred_gy: np.ndarray, case: Case) -> bool:
    """Cumulative DVHs of the present structures (prediction solid, reference dashed) as a PNG.

    Returns False (and writes nothing) when matplotlib is not installed. Uses matplotlib's
    object interface with the Agg canvas, so no global backend is changed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    present = case.present_structures()
    top = float(max(pred_gy.max(), case.dose.max() if case.dose is not None else 0.0))
    figure = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    colours = [f"C{i % 10}" for i in range(len(present))]
    for name, colour in zip(present, colours):
        mask = case.mask(name)
        predicted = dvh(pred_gy, mask, case.spacing_mm, max_dose_gy=top)
        axes.plot(predicted.dose_gy, predicted.volume_percent, color=colour, label=name)
        if case.dose is not None:
            reference = dvh(case.dose, mask, case.spacing_mm, max_dose_gy=top)
            axes.plot(reference.dose_gy, reference.volume_percent, color=colour, linestyle="--")
    axes.set_xlabel("dose (Gy)")
    axes.set_ylabel("volume (%)")
    title = f"{case.case_id}: predicted (solid)" + (" vs reference (dashed)" if case.dose is not None else "")
    axes.set_title(title)
    axes.set_ylim(0, 101)
    axes.grid(alpha=0.3)
    if present:
        axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    data = buffer.getvalue()
    atomic_write(path, lambda f: f.write(data))
    return True


# ----------------------------------------------------------------------------- main

def run(args) -> int:
    paths = input_cases(args)
    model, info = load_checkpoint_model(args.checkpoint, args.use_ema)
    kind = info["model_kind"]
    if kind == "baseline" and args.samples > 1:
        raise InferenceInputError(f"--samples {args.samples}: the checkpoint holds a baseline model, which is "
                                  "deterministic; --samples > 1 needs a diffusion (ddpm) checkpoint")
    case_ids = check_headers(paths, info)
    outputs = output_paths(args, case_ids)
    check_not_overwriting_inputs(outputs, paths)
    device = resolve_device(args.device)
    patch_size, overlap = window_settings(info, args.patch_size, args.overlap)
    settings = {"checkpoint": str(args.checkpoint), "model_kind": kind, "used_ema": info.get("used_ema"),
                "patch_size": patch_size, "overlap": overlap, "batch_size": args.batch_size,
                "ddim_steps": args.ddim_steps if kind == "ddpm" else None,
                "samples": args.samples, "mode": args.mode if kind == "ddpm" else None, "seed": args.seed,
                "device": str(device), "precision": args.precision, "mask_outside": not args.no_mask_outside,
                "gamma_subsample": args.gamma_subsample}
    show_progress = not args.quiet and sys.stderr.isatty()
    # On the CPU, a 128^3 window's activations are faulted into memory anew at every model call
    # unless freed memory is kept (measured: BaselineUNet3D forward 18.1 -> 11.3 s per window).
    with keep_freed_memory(device.type == "cpu"):
        metric_cases: List[dict] = []
        skipped: List[dict] = []
        goals_noted = False
        for path, case_id in tqdm(list(zip(paths, case_ids)), desc="cases", unit="case", disable=not show_progress):
            case = load_case(path, require_dose=False)
            out_path = outputs[case_id]
            generator = torch.Generator().manual_seed(args.seed)
            prediction = predict_case(model, info, case, patch_size=patch_size, overlap=overlap,
                                      batch_size=args.batch_size, ddim_steps=args.ddim_steps, samples=args.samples,
                                      device=device, generator=generator, precision=args.precision, mode=args.mode,
                                      mask_outside=not args.no_mask_outside)
            prediction.metadata.update(checkpoint=str(args.checkpoint), used_ema=info.get("used_ema"),
                                       seed=args.seed, source_file=str(path))
            save_prediction(out_path, prediction)
            if not args.no_plots:
                save_dvh_plot(out_path.parent / f"{case.case_id}_dvh.png", prediction.dose_gy, case)
            line = f"{case.case_id}: wrote {out_path}"
            if args.compute_metrics:
                if case.dose is None:
                    note = "no reference dose in the case file; metrics skipped"
                    skipped.append({"case_id": case.case_id, "file": str(path), "reason": note})
                    line += f" ({note})"
                else:
                    metrics = case_metrics(prediction.dose_gy, case, gamma_subsample=args.gamma_subsample,
                                           gamma_device=device, std_gy=prediction.std_gy)
                    metrics["prediction_file"] = str(out_path)
                    metric_cases.append(metrics)
                    if metrics["goals_site"] is None and not goals_noted:
                        goals_noted = True
                        print(f"note: {case.case_id}: clinical goals not checked: {metrics['goals_not_checked']}; "
                              f"set metadata 'site' in the case file to one of {', '.join(SITES)} to check its "
                              "goals. Goals are null in metrics.json for such cases (this note is shown once)",
                              file=sys.stderr)
                    line += f" | {_metrics_line(metrics)}"
                write_metrics(out_path.parent, settings, metric_cases, skipped)
            if not args.quiet:
                tqdm.write(line, file=sys.stdout)
        if args.compute_metrics and not args.quiet and metric_cases:
            mean = summarize_metrics([flat_metrics(c) for c in metric_cases])["mean"]
            print(f"mean over {len(metric_cases)} case(s): {_metrics_line(mean)}")
    return 0


def _metrics_line(values: dict) -> str:
    parts = []
    for key, label, unit in (("mae_gy", "MAE", " Gy"), ("dvh_score", "DVH score", " Gy"),
                             ("gamma_pass_rate", "gamma 3%/3mm", " %"),
                             ("gamma_pass_rate_targets", "gamma in targets+5mm", " %")):
        if values.get(key) is not None:
            parts.append(f"{label} {values[key]:.2f}{unit}")
    return ", ".join(parts) if parts else "no scores"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (InferenceInputError, CaseFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
