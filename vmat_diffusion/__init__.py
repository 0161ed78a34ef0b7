"""vmat_diffusion: 3-D radiotherapy dose prediction from CT and contours, in plain PyTorch."""
__version__ = "0.1.0"

from .case import Case, CaseFormatError, load_case, save_case
from .conventions import dose_to_unit, mask_to_sdf, normalize_ct, unit_to_dose
from .constraints import HEAD_NECK, PROSTATE, SITES, constraint_vector
