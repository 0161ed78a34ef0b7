"""``vmat-demo``: the whole pipeline on synthetic phantoms, on a CPU, in a few minutes.

    vmat-demo                      # 10 phantoms, 8 epochs (a few minutes on 2 CPU cores)
    vmat-demo --quick              # smaller and shorter: a smoke test (under a minute or two)
    vmat-demo --out my_demo --epochs 12

Steps: write phantoms (``phantom.write_phantoms``) -> train a small ``BaselineUNet3D`` with the
package's ``Trainer`` (split, patches, augmentation, validation, checkpoints, logs) -> load the
best checkpoint -> predict the held-out test phantom with sliding windows -> print its MAE in Gy
next to the MAE of a trivial prediction (the mean training dose everywhere inside the body).
Everything is written under ``--out`` (phantoms/, runs/demo/ with TensorBoard events).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import List, Optional

import numpy as np

PROG = "vmat-demo"

FULL = dict(n_phantoms=10, shape=(64, 64, 48), spacing_mm=(6.0, 6.0, 6.0), epochs=8, base_channels=8, levels=3,
            patch_size=32)
QUICK = dict(n_phantoms=6, shape=(48, 48, 32), spacing_mm=(8.0, 8.0, 8.0), epochs=3, base_channels=8, levels=3,
             patch_size=32)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Train and test a small dose-prediction U-Net on phantoms.")
    p.add_argument("--out", default="vmat_demo", help="output folder (phantoms/, runs/)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 8, or 3 with --quick)")
    p.add_argument("--quick", action="store_true", help="fewer, smaller phantoms and fewer epochs")
    p.add_argument("--seed", type=int, default=0, help="seed of the phantoms and the training")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    return p


def body_mask(case) -> np.ndarray:
    mask = case.extras.get("possible_dose_mask")
    return np.asarray(mask) > 0 if mask is not None else np.ones(case.shape, dtype=bool)


def clear_previous_demo(out: Path) -> None:
    """Remove an earlier demo's phantoms and run under ``out``, so a new demo (maybe --quick, with
    fewer and smaller phantoms) trains on its own phantoms only and starts a fresh run."""
    old_run = out / "runs" / "demo"
    previous = sorted((out / "phantoms").glob("phantom_*.npz")) + ([old_run] if old_run.exists() else [])
    if previous:
        print(f"      replacing the previous demo in {out} (its phantoms and runs/demo)", flush=True)
    for path in previous:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def run_demo(out, epochs: Optional[int] = None, quick: bool = False, seed: int = 0, device: str = "auto") -> dict:
    """Run the demo; returns {"model_mae_gy", "trivial_mae_gy", "gamma_pct", "test_case", "run_dir", ...}."""
    from ..case import load_case
    from ..inference import predict_case
    from ..metrics import mae_gy
    from ..phantom import write_phantoms
    from ..training.checkpoint import load_model_from_checkpoint
    from ..training.config import TrainConfig
    from ..training.loop import Trainer, subsampled_gamma

    settings = QUICK if quick else FULL
    epochs = settings["epochs"] if epochs is None else epochs
    out = Path(out)
    start = time.time()

    clear_previous_demo(out)
    print(f"[1/4] writing {settings['n_phantoms']} phantoms {settings['shape']} at {settings['spacing_mm']} mm "
          f"to {out / 'phantoms'}", flush=True)
    write_phantoms(out / "phantoms", settings["n_phantoms"], shape=settings["shape"],
                   spacing_mm=settings["spacing_mm"], seed=seed)

    print(f"[2/4] training a small BaselineUNet3D for {epochs} epochs", flush=True)
    config = TrainConfig(
        data_dir=str(out / "phantoms"), log_dir=str(out / "runs"), exp_name="demo", model="baseline",
        epochs=epochs, patch_size=settings["patch_size"], patches_per_volume=4, batch_size=2,
        base_channels=settings["base_channels"], levels=settings["levels"], lr=3e-3, min_lr=1e-4,
        warmup_epochs=0.5, num_workers=0, patience=0, gamma_subsample=2, seed=seed, device=device)
    trainer = Trainer(config)
    summary = trainer.fit()

    print("[3/4] predicting the held-out test phantom with the best checkpoint", flush=True)
    best = summary["best_checkpoints"][0] if summary["best_checkpoints"] else summary["last_checkpoint"]
    model, info = load_model_from_checkpoint(best)
    test_case = load_case(trainer.split.test[0].path)
    prediction = predict_case(model, info, test_case, patch_size=config.patch_size, overlap=config.overlap,
                              batch_size=2, device=trainer.device, precision="fp32")
    mask = body_mask(test_case)
    train_cases = [load_case(c.path) for c in trainer.split.train]
    mean_training_dose = float(np.mean([case.dose[body_mask(case)].mean() for case in train_cases]))
    trivial = np.where(mask, mean_training_dose, 0.0).astype(np.float32)
    import torch
    result = {
        "test_case": test_case.case_id,
        "model_mae_gy": mae_gy(prediction.dose_gy, test_case.dose, mask),
        "trivial_mae_gy": mae_gy(trivial, test_case.dose, mask),
        "gamma_pct": subsampled_gamma(torch.from_numpy(test_case.dose), torch.from_numpy(prediction.dose_gy),
                                      test_case.spacing_mm, factor=1),
        "best_checkpoint": best,
        "run_dir": str(trainer.run_dir),
        "minutes": (time.time() - start) / 60.0,
    }
    print(f"[4/4] held-out phantom {result['test_case']} (MAE inside the body):\n"
          f"      model                                  {result['model_mae_gy']:6.2f} Gy\n"
          f"      trivial: mean training dose {mean_training_dose:5.1f} Gy    {result['trivial_mae_gy']:6.2f} Gy\n"
          + (f"      gamma 3%/3mm pass rate of the model    {result['gamma_pct']:6.1f} %\n"
             if result["gamma_pct"] is not None else "")
          + f"      outputs: {result['run_dir']} (tensorboard --logdir {out / 'runs'}); "
            f"{result['minutes']:.1f} min in all", flush=True)
    return result


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        print(f"{PROG}: error: --epochs must be a positive integer, got {args.epochs}", file=sys.stderr)
        return 2
    try:
        run_demo(args.out, epochs=args.epochs, quick=args.quick, seed=args.seed, device=args.device)
    except (OSError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
