"""Train and score a dose model on the real OpenKBP patients (CPU-sized run).

    python examples/openkbp_baseline.py --threads 2              # baseline U-Net, half resolution (~50 min)
    python examples/openkbp_baseline.py --model ddpm --epochs 55 --val_every 10 --samples 2
    python examples/openkbp_baseline.py --score_only             # re-score the last checkpoint

Steps:

1. Import the OpenKBP patients (``$VMAT_OPENKBP_DIR`` or ``../shared/data/openkbp`` next to the
   repository) to case files under ``<work_dir>/cases_full/<split>/`` (skipped when present).
2. ``--resolution half``: every case is 2x downsampled (128^3 -> 64^3, spacing doubled; CT, dose
   and structure SDFs averaged over 2x2x2 blocks, the possible-dose mask kept where any of the 8
   voxels is inside) so that a CPU can train in an hour. ``full`` trains on the 128^3 cases.
3. Train with the package's ``Trainer`` on the ``train-pats`` patients, validating on the
   ``validation-pats`` patients (the split is fixed by the OpenKBP folders, not drawn at random).
4. Predict each validation patient over its whole volume with sliding windows
   (``inference.predict_case``; DDIM for ``--model ddpm``), upsample half-resolution predictions
   trilinearly to 128^3, zero them outside the possible-dose mask and score them against the
   original 128^3 reference with ``inference.case_metrics`` (OpenKBP dose and DVH scores, MAE,
   3 %/3 mm gamma). The reference trivial predictor is the voxel-wise mean of the training doses.

The scores come from the LAST checkpoint (end of the cosine schedule), not the one with the best
validation MAE, so the validation patients do not select the model they are scored on.
Outputs: ``<work_dir>/results_<model>_<resolution>.json`` (``results_<exp_name>.json`` with
``--exp_name``; scores, per-patient numbers, training time, machine, exact command) and
``<work_dir>/runs/<exp_name>/`` (the Trainer's logs and checkpoints).
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vmat_diffusion.case import Case, load_case, save_case
from vmat_diffusion.fileio import atomic_write_json
from vmat_diffusion.inference import case_metrics, predict_case
from vmat_diffusion.openkbp import import_openkbp
from vmat_diffusion.training import TrainConfig, Trainer, load_checkpoint, load_model_from_checkpoint
from vmat_diffusion.training.run_logs import refuse_earlier_run

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_SPLIT, VAL_SPLIT = "train-pats", "validation-pats"
# OpenKBP challenge winner (Babier et al., Med Phys 2021), 200 training patients on a GPU.
PUBLISHED_BEST = {"dose_score_gy": 2.31, "dvh_score_gy": 1.55}


# ----------------------------------------------------------------------------- data

def openkbp_source() -> Path:
    """The shared OpenKBP folder; one clear error when it is missing."""
    src = Path(os.environ.get("VMAT_OPENKBP_DIR") or REPO_ROOT.parent / "shared" / "data" / "openkbp")
    if not (src / TRAIN_SPLIT).is_dir() or not (src / VAL_SPLIT).is_dir():
        raise SystemExit(f"OpenKBP data not found: {src} must hold {TRAIN_SPLIT}/ and {VAL_SPLIT}/ "
                         "(set VMAT_OPENKBP_DIR to the folder with the OpenKBP patient folders)")
    return src


def import_cases(work_dir: Path) -> dict:
    """Import OpenKBP to ``work_dir/cases_full/<split>/pt_N.npz``; returns {split: [paths]}."""
    src = openkbp_source()
    report = import_openkbp(src, work_dir / "cases_full", progress=False)
    if not report.ok:
        raise SystemExit("OpenKBP import failed:\n" + report.summary())
    return {split: sorted((work_dir / "cases_full" / split).glob("*.npz")) for split in (TRAIN_SPLIT, VAL_SPLIT)}


def downsample_volume(volume: np.ndarray, reduce: str = "mean") -> np.ndarray:
    """(..., X, Y, Z) -> (..., X/2, Y/2, Z/2): mean (or max) over 2x2x2 blocks. Sizes must be even."""
    tensor = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))
    batched = tensor.reshape(-1, 1, *tensor.shape[-3:])
    pooled = F.avg_pool3d(batched, 2) if reduce == "mean" else F.max_pool3d(batched, 2)
    return pooled.reshape(*tensor.shape[:-3], *pooled.shape[-3:]).numpy()


def downsample_case(case: Case) -> Case:
    """A 2x coarser copy of ``case``: spacing doubled, CT / dose / scaled SDFs block-averaged
    (an SDF average keeps the sign of the block's majority side), possible-dose mask block-max."""
    if any(s % 2 for s in case.shape):
        raise ValueError(f"case {case.case_id}: shape {case.shape} must be even along every axis to halve it")
    extras = {}
    if "possible_dose_mask" in case.extras:
        extras["possible_dose_mask"] = downsample_volume(case.extras["possible_dose_mask"], "max").astype(np.uint8)
    metadata = dict(case.metadata, spacing_mm=[2.0 * s for s in case.spacing_mm],
                    resampled_from={"shape": list(case.shape), "spacing_mm": list(case.spacing_mm)})
    return Case(ct=downsample_volume(case.ct), dose=downsample_volume(case.dose),
                masks_sdf=downsample_volume(case.masks_sdf), constraints=case.constraints,
                metadata=metadata, extras=extras).validate(source=case.case_id)


def upsample_dose(dose_gy: np.ndarray, shape) -> np.ndarray:
    """Trilinear upsampling (cell-centred, ``align_corners=False``, the inverse geometry of
    ``downsample_volume``) of a (X, Y, Z) dose to ``shape``."""
    tensor = torch.from_numpy(np.ascontiguousarray(dose_gy, dtype=np.float32))[None, None]
    return F.interpolate(tensor, size=tuple(shape), mode="trilinear", align_corners=False)[0, 0].numpy()


def training_folder(work_dir: Path, full_paths: dict, resolution: str) -> Path:
    """One flat folder with every case (train and validation) at the training resolution.

    full: symbolic links to the imported files; half: downsampled copies (written once).
    """
    folder = work_dir / f"cases_{resolution}"
    folder.mkdir(parents=True, exist_ok=True)
    for path in full_paths[TRAIN_SPLIT] + full_paths[VAL_SPLIT]:
        target = folder / path.name
        if target.exists():
            continue
        if resolution == "full":
            target.symlink_to(path.resolve())
        else:
            save_case(target, downsample_case(load_case(path)))
    return folder


def train_config(args, data_dir: Path, val_ids) -> TrainConfig:
    """The run's TrainConfig: the OpenKBP validation patients validate (``val_ids``), every other
    case in ``data_dir`` trains (``test_split=0``)."""
    is_ddpm = args.model == "ddpm"
    return TrainConfig(
        data_dir=str(data_dir), val_ids=list(val_ids), test_split=0.0, patch_size=args.patch_size,
        patches_per_volume=args.patches_per_volume, num_workers=0, cache_cases=True, model=args.model,
        base_channels=args.base_channels, levels=args.levels, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, min_lr=args.lr / 100, warmup_epochs=1.0, precision=args.precision, loss=args.loss,
        loss_mask=args.loss_mask,
        ema=True, ema_decay=args.ema_decay, patience=0, ddim_steps=args.val_ddim_steps,
        gamma_subsample=2 if args.resolution == "half" else 4,
        max_val_cases=args.max_val_cases if args.max_val_cases else (1 if is_ddpm else None),
        val_every=args.val_every, max_minutes=args.max_minutes,
        log_dir=str(args.work_dir / "runs"), exp_name=args.exp_name, seed=args.seed, device="cpu",
        resume=str(args.resume) if args.resume else None,
        progress=False)


def train(args, data_dir: Path, val_ids) -> dict:
    return Trainer(train_config(args, data_dir, val_ids)).fit()


# ----------------------------------------------------------------------------- scoring

def predict_full_resolution(model, info, train_res_path: Path, args, full_case: Case) -> np.ndarray:
    """Whole-volume prediction at the training resolution, brought back to 128^3 and masked."""
    case = load_case(train_res_path) if args.resolution == "half" else full_case
    generator = torch.Generator().manual_seed(args.seed)
    prediction = predict_case(model, info, case, patch_size=args.patch_size, overlap=args.patch_size // 4,
                              batch_size=1, ddim_steps=args.ddim_steps, samples=args.samples, device="cpu",
                              generator=generator, precision=args.predict_precision)
    dose = prediction.dose_gy
    if args.resolution == "half":
        dose = upsample_dose(dose, full_case.shape)
    keep = full_case.extras["possible_dose_mask"] > 0
    return np.where(keep, np.clip(dose, 0.0, None), 0.0).astype(np.float32)


def mean_training_dose(train_paths) -> np.ndarray:
    """Voxel-wise mean (array space) of the training patients' 128^3 doses (Gy)."""
    total = None
    for path in train_paths:
        dose = load_case(path).dose.astype(np.float64)
        total = dose if total is None else total + dose
    return (total / len(train_paths)).astype(np.float32)


def score(pred_gy: np.ndarray, case: Case, gamma_subsample: int) -> dict:
    metrics = case_metrics(pred_gy, case, gamma_subsample=gamma_subsample)
    return {key: metrics[key] for key in ("case_id", "mae_gy", "dose_score", "dvh_score", "gamma_pass_rate",
                                          "gamma_pass_rate_targets", "dvh_score_details")}


def summarise(rows) -> dict:
    """Means over patients; ``dvh_score_pooled`` pools every (patient, structure, metric) row as
    the OpenKBP challenge does."""
    pooled = [abs(d["difference_gy"]) for row in rows for d in row["dvh_score_details"]]
    mean = lambda key: float(np.mean([r[key] for r in rows if r[key] is not None]))  # noqa: E731
    return {"dose_score_gy": mean("dose_score"), "dvh_score_gy_pooled": float(np.mean(pooled)),
            "dvh_score_gy_mean_of_patients": mean("dvh_score"), "mae_gy": mean("mae_gy"),
            "gamma_pass_rate_3mm3pct": mean("gamma_pass_rate"),
            "gamma_pass_rate_targets": mean("gamma_pass_rate_targets")}


def machine_info() -> dict:
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu_model": model, "logical_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}


def print_table(results: dict) -> None:
    lines = [f"{'predictor':44s} {'dose score':>10s} {'DVH score':>10s} {'MAE':>7s} {'gamma':>7s}"]
    for name, s in results["summary"].items():
        lines.append(f"{name:44s} {s['dose_score_gy']:10.2f} {s['dvh_score_gy_pooled']:10.2f} "
                     f"{s['mae_gy']:7.2f} {s['gamma_pass_rate_3mm3pct']:6.1f}%")
    fit = results.get("on_training_patients")
    if fit:
        lines.append(f"{'same model on training patients':44s} {fit['dose_score_gy']:10.2f} "
                     f"{fit['dvh_score_gy_pooled']:10.2f} {fit['mae_gy']:7.2f} {fit['gamma_pass_rate_3mm3pct']:6.1f}%")
    floor = results.get("reference_dose_half_res_roundtrip")
    if floor:
        lines.append(f"{'reference dose via 64^3 (resolution floor)':44s} {floor['dose_score_gy']:10.2f} "
                     f"{floor['dvh_score_gy_pooled']:10.2f} {floor['mae_gy']:7.2f} "
                     f"{floor['gamma_pass_rate_3mm3pct']:6.1f}%")
    lines.append(f"{'OpenKBP winner (200 pts, GPU)':44s} {PUBLISHED_BEST['dose_score_gy']:10.2f} "
                 f"{PUBLISHED_BEST['dvh_score_gy']:10.2f}")
    print("\n".join(lines))


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=("baseline", "ddpm"), default="baseline")
    p.add_argument("--work_dir", type=Path, default=Path("openkbp_work"))
    p.add_argument("--resolution", choices=("full", "half"), default="half",
                   help="half: train and predict at 64^3 (2x spacing), upsample to 128^3 for scoring")
    p.add_argument("--epochs", type=int, default=75)
    p.add_argument("--patch_size", type=int, default=64,
                   help="training patch (64 = the whole half-resolution volume)")
    p.add_argument("--patches_per_volume", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--base_channels", type=int, default=16)
    p.add_argument("--levels", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3, help="peak LR (cosine to lr/100, 1 warmup epoch)")
    p.add_argument("--loss", choices=("mse", "l1"), default=None,
                   help="data term (default: l1 for baseline, the quantity the dose score measures; "
                        "mse on the noise for ddpm)")
    p.add_argument("--loss_mask", default=None, metavar="EXTRA",
                   help="average the data term over this case extra only (default: possible_dose_mask, "
                        "what the dose score measures); 'none': all voxels of a patch")
    p.add_argument("--val_every", type=int, default=5, help="validate every N epochs (and after the last)")
    p.add_argument("--max_minutes", type=float, default=None,
                   help="training time budget (stops before an epoch that would end past it)")
    p.add_argument("--ema_decay", type=float, default=0.995)
    p.add_argument("--precision", default="auto", help="training precision (auto: fp32 on CPUs without AMX)")
    p.add_argument("--ddim_steps", type=int, default=25, help="DDIM steps of the scored prediction (ddpm)")
    p.add_argument("--val_ddim_steps", type=int, default=10, help="DDIM steps of the per-epoch validation (ddpm)")
    p.add_argument("--predict_precision", choices=("fp32", "bf16"), default="fp32",
                   help="precision of the scored prediction (bf16 halves the DDIM time on bf16 CPUs)")
    p.add_argument("--samples", type=int, default=1, help="diffusion samples averaged per patient (ddpm)")
    p.add_argument("--max_val_cases", type=int, default=0,
                   help="validation patients used per epoch (0: all for baseline, 1 for ddpm)")
    p.add_argument("--gamma_subsample", type=int, default=2, help="gamma on every n-th voxel of the 128^3 grid")
    p.add_argument("--score_train", type=int, default=0,
                   help="also score the first N training patients (shows the gap between fit and validation)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default, all cores)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--exp_name", default=None, help="run folder name (default: openkbp_<model>_<resolution>)")
    p.add_argument("--resume", type=Path, default=None,
                   help="continue training from this checkpoint (e.g. <run>/checkpoints/last.ckpt); "
                        "--epochs may differ from the first command's (the cosine schedule is stretched)")
    p.add_argument("--score_only", action="store_true", help="skip training; score the run's last checkpoint")
    p.add_argument("--checkpoint", type=Path, default=None, help="score this checkpoint instead of last.ckpt")
    args = p.parse_args(argv)
    args.results_file = f"results_{args.exp_name or args.model + '_' + args.resolution}.json"
    args.exp_name = args.exp_name or f"openkbp_{args.model}_{args.resolution}"
    args.loss = args.loss or ("l1" if args.model == "baseline" else "mse")
    if args.loss_mask is None:
        args.loss_mask = "possible_dose_mask"
    elif args.loss_mask.lower() == "none":
        args.loss_mask = None
    work = args.work_dir.resolve()
    for forbidden in ("vmat_diffusion", "tests"):
        if (REPO_ROOT / forbidden) in (work, *work.parents):
            p.error(f"--work_dir must not be inside {REPO_ROOT / forbidden}")
    if not args.score_only:
        try:
            refuse_earlier_run(args.work_dir / "runs" / args.exp_name, resuming=args.resume is not None,
                               elsewhere="--exp_name or --work_dir")
        except ValueError as e:
            p.error(str(e))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    args.work_dir.mkdir(parents=True, exist_ok=True)

    full_paths = import_cases(args.work_dir)
    data_dir = training_folder(args.work_dir, full_paths, args.resolution)
    train_ids = [p.stem for p in full_paths[TRAIN_SPLIT]]
    val_ids = [p.stem for p in full_paths[VAL_SPLIT]]
    print(f"{len(train_ids)} training patients, {len(val_ids)} validation patients; cases in {data_dir}")

    run_dir = args.work_dir / "runs" / args.exp_name
    summary, train_seconds = None, None
    if not args.score_only:
        start = time.time()
        summary = train(args, data_dir, val_ids)
        train_seconds = time.time() - start
    checkpoint = args.checkpoint or run_dir / "checkpoints" / "last.ckpt"
    model, info = load_model_from_checkpoint(checkpoint)
    model.eval()

    start = time.time()
    model_rows = []
    for path in full_paths[VAL_SPLIT]:
        full_case = load_case(path)
        pred = predict_full_resolution(model, info, data_dir / path.name, args, full_case)
        model_rows.append(score(pred, full_case, args.gamma_subsample))
        print(f"  {full_case.case_id}: dose score {model_rows[-1]['dose_score']:.2f} Gy, "
              f"DVH score {model_rows[-1]['dvh_score']:.2f} Gy", flush=True)
    predict_seconds = time.time() - start

    # The same predictions on some training patients: how far the validation scores are from fitting.
    train_rows = []
    for path in full_paths[TRAIN_SPLIT][:args.score_train]:
        full_case = load_case(path)
        train_rows.append(score(predict_full_resolution(model, info, data_dir / path.name, args, full_case),
                                full_case, args.gamma_subsample))

    mean_dose = mean_training_dose(full_paths[TRAIN_SPLIT])
    trivial_rows = []
    for path in full_paths[VAL_SPLIT]:
        full_case = load_case(path)
        keep = full_case.extras["possible_dose_mask"] > 0
        trivial_rows.append(score(np.where(keep, mean_dose, 0.0).astype(np.float32), full_case,
                                  args.gamma_subsample))

    # The resolution floor: the reference dose itself sent through the 64^3 round trip.
    roundtrip_rows = []
    if args.resolution == "half":
        for path in full_paths[VAL_SPLIT]:
            full_case = load_case(path)
            keep = full_case.extras["possible_dose_mask"] > 0
            dose = upsample_dose(downsample_volume(full_case.dose), full_case.shape)
            roundtrip_rows.append(score(np.where(keep, dose, 0.0).astype(np.float32), full_case,
                                        args.gamma_subsample))

    history = load_checkpoint(checkpoint)["history"]
    label = f"{args.model} ({args.resolution} res, epoch {info['epoch']})"
    results = {
        "command": command,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "checkpoint": str(checkpoint), "checkpoint_epoch": info["epoch"], "global_step": info["global_step"],
        "used_ema": info["used_ema"],
        "training_seconds": train_seconds, "training_summary": summary,
        "training_seconds_all_sessions": history["elapsed_sec"], "epoch_times_sec": history["epoch_times_sec"],
        "prediction_seconds": predict_seconds, "machine": machine_info(),
        "train_ids": train_ids, "val_ids": val_ids,
        "summary": {label: summarise(model_rows), "mean training dose (trivial)": summarise(trivial_rows)},
        "per_patient": {"model": model_rows, "mean_training_dose": trivial_rows, "model_on_training_patients": train_rows},
        "on_training_patients": summarise(train_rows) if train_rows else None,
        "reference_dose_half_res_roundtrip": summarise(roundtrip_rows) if roundtrip_rows else None,
        "published_reference": {"OpenKBP winner (200 train pts, GPU)": PUBLISHED_BEST},
    }
    out = args.work_dir / args.results_file
    atomic_write_json(out, results)
    print_table(results)
    print(f"results written to {out}")
    return results


if __name__ == "__main__":
    main()
