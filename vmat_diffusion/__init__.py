"""vmat_diffusion: 3-D radiotherapy dose prediction from CT and contours, in plain PyTorch.

Every piece works on its own::

    from vmat_diffusion import SimpleUNet3D, DDIMSampler, NoiseSchedule, sliding_window_inference

Axis convention (``vmat_diffusion.conventions``): X = patient right->left, Y = anterior->posterior,
Z = superior->inferior; dose in Gy; spacing in mm.
"""
__version__ = "0.1.0"

from .case import Case, CaseFormatError, load_case, save_case
from .conventions import dose_to_unit, mask_to_sdf, normalize_ct, unit_to_dose
from .constraints import HEAD_NECK, PROSTATE, SITES, Goal, SiteProtocol, Target, constraint_vector
from .structures import HEAD_NECK_STRUCTURES, PROSTATE_STRUCTURES
from .schedule import NoiseSchedule
from .ddim import DDIMSampler
from .unet import BaselineUNet3D, SimpleUNet3D
from .phantom import make_phantom, write_phantoms
from .patches import PatchSampler, extract_patch
from .augment import augment, flip_lr
from .sliding_window import (gaussian_importance_map, predict_full_volume, sliding_window_inference,
                             window_starts)
from .dvh import DVH, dose_at_cc, dose_at_percent, dvh, dvh_metrics, volume_receiving
from .metrics import (compare_goals, dose_score, dvh_score, dvh_score_details, dvh_table, evaluate_goals,
                      mae_gy, masks_from_case)
from .gamma import dilate_mask, gamma_index, gamma_pass_rate, pass_rate_from_gamma
from .host_memory import keep_freed_memory
from .openkbp import OpenKBPFormatError, import_openkbp, openkbp_to_case, read_openkbp_patient
from .store import CaseStore, StoreCase, build_store, open_cases
from .inference import Prediction, case_metrics, load_prediction, predict_case, save_prediction
from .training import TrainConfig, Trainer, load_model_from_checkpoint, train_step, validate
