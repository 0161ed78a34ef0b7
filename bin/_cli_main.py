"""The ``main`` of a ``vmat_diffusion.cli`` module for the scripts in bin/: from the installed
package, else from the source checkout this folder is in; one clear error when a dependency is
missing instead of two tracebacks."""
import importlib
import sys
from pathlib import Path


def cli_main(module: str, script: str):
    """``vmat_diffusion.cli.<module>.main``; ``script`` names the calling script in errors."""
    name = f"vmat_diffusion.cli.{module}"
    try:
        return importlib.import_module(name).main
    except ModuleNotFoundError as missing:
        if missing.name != "vmat_diffusion":
            sys.exit(f"{script}: error: {missing.name} is not installed; install the package's dependencies")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a source checkout, not installed
    try:
        return importlib.import_module(name).main
    except ModuleNotFoundError as missing:
        sys.exit(f"{script}: error: {missing.name} is not installed; install the package with its "
                 "dependencies first (pip install -e . in the repository)")
