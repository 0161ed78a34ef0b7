#!/usr/bin/env python
"""Train a dose-prediction model: the training guide's script name for ``vmat-train``.

    python bin/train_dose_ddpm.py --data_dir cases/ --epochs 200 [--model ddpm]

All flags: ``python bin/train_dose_ddpm.py --help`` (same as ``vmat-train --help``).
"""
import sys

from vmat_diffusion.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
