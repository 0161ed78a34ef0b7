#!/usr/bin/env python3
"""Train a dose-prediction model: the training guide's script name for ``vmat-train``.

    python bin/train_dose_ddpm.py --data_dir cases/ --epochs 200 [--model ddpm]

All flags: ``python bin/train_dose_ddpm.py --help`` (same as ``vmat-train --help``).
"""
import sys
from pathlib import Path

try:
    from vmat_diffusion.cli.train import main
except ImportError:  # run from a source checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from vmat_diffusion.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
