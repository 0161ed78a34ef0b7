"""Shared test fixtures."""
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
OPENKBP_ENV = "VMAT_OPENKBP_DIR"
OPENKBP_FALLBACK = REPO_ROOT.parent / "shared" / "data" / "openkbp"


def openkbp_root() -> Path:
    """Folder of the real OpenKBP patients: $VMAT_OPENKBP_DIR, else ../shared/data/openkbp."""
    return Path(os.environ.get(OPENKBP_ENV, OPENKBP_FALLBACK))


@pytest.fixture(scope="session")
def openkbp_dir() -> Path:
    """The OpenKBP folder (with train-pats/ and validation-pats/); skips when it is absent."""
    root = openkbp_root()
    if not (root / "train-pats").is_dir():
        pytest.skip(f"real OpenKBP data not found at {root} (set {OPENKBP_ENV} to its folder)")
    return root
