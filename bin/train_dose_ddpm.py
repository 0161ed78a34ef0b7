#!/usr/bin/env python3
"""Train a dose-prediction model: the training guide's script name for ``vmat-train``.

    python bin/train_dose_ddpm.py --data_dir cases/ --epochs 200 [--model ddpm]

All flags: ``python bin/train_dose_ddpm.py --help`` (same as ``vmat-train --help``).
"""
import sys

from _cli_main import cli_main  # bin/ is on sys.path when a script here runs

main = cli_main("train", "train_dose_ddpm.py")

if __name__ == "__main__":
    sys.exit(main())
