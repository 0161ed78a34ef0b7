#!/usr/bin/env python3
"""Train a dose-prediction model: the training guide's script name for ``vmat-train``.

    python bin/train_dose_ddpm.py --data_dir cases/ --epochs 200 [--model ddpm]

All flags: ``python bin/train_dose_ddpm.py --help`` (same as ``vmat-train --help``).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when run as python -m bin.<script> or runpy
from _cli_main import cli_main  # noqa: E402

main = cli_main("train", "train_dose_ddpm.py")

if __name__ == "__main__":
    sys.exit(main())
