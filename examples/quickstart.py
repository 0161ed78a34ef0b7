"""Quickstart: phantoms -> training -> whole-volume prediction -> MAE, with the library API.

    python examples/quickstart.py                 # a few minutes on a 2-core CPU
    python examples/quickstart.py --epochs 3      # shorter

The same steps as ``vmat-demo``, written out so each call can be copied into a notebook.
"""
import argparse
import shutil
from pathlib import Path

import numpy as np

from vmat_diffusion.case import load_case
from vmat_diffusion.inference import predict_case
from vmat_diffusion.metrics import mae_gy
from vmat_diffusion.phantom import write_phantoms
from vmat_diffusion.training import TrainConfig, Trainer, load_model_from_checkpoint


def main(out: str = "quickstart_out", epochs: int = 8) -> None:
    out = Path(out)
    # A second run of this script replaces the first (the Trainer refuses a fresh run into a run folder
    # that holds checkpoints; to continue a run instead, pass TrainConfig(resume=".../last.ckpt")).
    shutil.rmtree(out / "runs" / "quickstart", ignore_errors=True)

    # 1. Ten synthetic prostate phantoms (CT, 8 structures, a VMAT-like dose) as case files.
    write_phantoms(out / "phantoms", 10, shape=(64, 64, 48), spacing_mm=(6.0, 6.0, 6.0))

    # 2. Train a small baseline U-Net (dose / Rx regression) on 32^3 patches. The Trainer splits the
    #    cases (8 train, 1 validation, 1 test), validates on whole volumes every epoch and writes
    #    checkpoints, epoch_metrics.csv and TensorBoard logs to out/runs/quickstart.
    config = TrainConfig(data_dir=str(out / "phantoms"), log_dir=str(out / "runs"), exp_name="quickstart",
                         epochs=epochs, patch_size=32, base_channels=8, levels=3, lr=3e-3, min_lr=1e-4,
                         warmup_epochs=0.5, num_workers=0, patience=0, gamma_subsample=2)
    trainer = Trainer(config)
    summary = trainer.fit()
    print(f"best validation MAE {summary['best_val_mae_gy']:.2f} Gy at epoch {summary['best_epoch']}")

    # 3. Load the best checkpoint (weights_only loading) and predict the held-out test case.
    model, info = load_model_from_checkpoint(summary["best_checkpoints"][0])
    case = load_case(trainer.split.test[0].path)
    prediction = predict_case(model, info, case, patch_size=32, overlap=8, batch_size=2)

    # 4. Score it inside the body, next to predicting the mean training dose everywhere.
    body = case.extras["possible_dose_mask"] > 0
    train_doses = [load_case(c.path) for c in trainer.split.train]
    mean_dose = np.mean([c.dose[c.extras["possible_dose_mask"] > 0].mean() for c in train_doses])
    trivial = np.where(body, mean_dose, 0.0).astype(np.float32)
    print(f"{case.case_id}: model MAE {mae_gy(prediction.dose_gy, case.dose, body):.2f} Gy, "
          f"mean-dose MAE {mae_gy(trivial, case.dose, body):.2f} Gy")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="quickstart_out")
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    main(args.out, args.epochs)
