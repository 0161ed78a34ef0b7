#!/usr/bin/env python3
"""Train a dose-prediction model: the training guide's script name for ``vmat-train``.

    python bin/train_dose_ddpm.py --data_dir cases/ --epochs 200 [--model ddpm]

All flags: ``python bin/train_dose_ddpm.py --help`` (same as ``vmat-train --help``).
"""
import sys
from pathlib import Path

try:
    from vmat_diffusion.cli.train import main
except ModuleNotFoundError as missing:
    if missing.name != "vmat_diffusion":  # a dependency is missing: say so, not a second traceback
        raise
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a source checkout, not installed
    from vmat_diffusion.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
