#!/usr/bin/env python3
"""Predict dose with a trained checkpoint (baseline or diffusion): the same program as ``vmat-infer``.

    python bin/inference_dose_ddpm.py --checkpoint best.ckpt --input_dir cases/ --output_dir pred/ --compute_metrics

See ``python bin/inference_dose_ddpm.py --help`` and ``vmat_diffusion/cli/infer.py``.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when run as python -m bin.<script> or runpy
from _cli_main import cli_main  # noqa: E402

main = cli_main("infer", "inference_dose_ddpm.py")

if __name__ == "__main__":
    sys.exit(main())
