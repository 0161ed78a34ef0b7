#!/usr/bin/env python3
"""Predict dose with a trained checkpoint (baseline or diffusion): the same program as ``vmat-infer``.

    python bin/inference_dose_ddpm.py --checkpoint best.ckpt --input_dir cases/ --output_dir pred/ --compute_metrics

See ``python bin/inference_dose_ddpm.py --help`` and ``vmat_diffusion/cli/infer.py``.
"""
import sys
from pathlib import Path

try:
    from vmat_diffusion.cli.infer import main
except ModuleNotFoundError as missing:
    if missing.name != "vmat_diffusion":  # a dependency is missing: say so, not a second traceback
        raise
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a source checkout, not installed
    from vmat_diffusion.cli.infer import main

if __name__ == "__main__":
    sys.exit(main())
