#!/usr/bin/env python3
"""Predict dose with a trained checkpoint (baseline or diffusion): the same program as ``vmat-infer``.

    python bin/inference_dose_ddpm.py --checkpoint best.ckpt --input_dir cases/ --output_dir pred/ --compute_metrics

See ``python bin/inference_dose_ddpm.py --help`` and ``vmat_diffusion/cli/infer.py``.
"""
import sys

from _cli_main import cli_main  # bin/ is on sys.path when a script here runs

main = cli_main("infer", "inference_dose_ddpm.py")

if __name__ == "__main__":
    sys.exit(main())
