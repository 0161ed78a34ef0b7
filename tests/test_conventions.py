"""Axis/value conventions, structure pairing and the constraint table."""
import numpy as np
import pytest
import torch
from scipy import ndimage

from vmat_diffusion import conventions as cv
from vmat_diffusion.constraints import HEAD_NECK, PROSTATE, UnknownSiteError, constraint_vector, site_for_structures
from vmat_diffusion.structures import (HEAD_NECK_STRUCTURES, PROSTATE_STRUCTURES, lateral_partner,
                                       left_right_pairs, lr_channel_permutation)


def test_axis_convention_is_written_once():
    assert cv.AXIS_NAMES == ("X", "Y", "Z")
    assert cv.AXIS_DIRECTIONS[cv.LR_AXIS] == "right->left"
    assert cv.AXIS_DIRECTIONS == ("right->left", "anterior->posterior", "superior->inferior")


def test_normalize_ct_range_and_air():
    hu = np.array([-2000, -1000, 0, 1000, 3000, 5000], np.float32)
    out = cv.normalize_ct(hu)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0, 0, 0.25, 0.5, 1, 1])
    assert cv.normalize_ct(np.array([-1000.0]))[0] == cv.CT_AIR


def test_mask_to_sdf_sign_scale_and_anisotropy():
    mask = np.zeros((21, 21, 21), bool)
    mask[8:13, 8:13, 8:13] = True
    spacing = (1.0, 2.0, 3.0)
    sdf = cv.mask_to_sdf(mask, spacing, clip_mm=50.0)
    assert sdf.dtype == np.float32
    assert (sdf[mask] < 0).all() and (sdf[~mask] > 0).all()
    # one voxel outside along each axis is exactly one spacing away
    assert sdf[13, 10, 10] * 50 == pytest.approx(1.0)
    assert sdf[10, 13, 10] * 50 == pytest.approx(2.0)
    assert sdf[10, 10, 13] * 50 == pytest.approx(3.0)
    expected = ndimage.distance_transform_edt(~mask, sampling=spacing)[0, 0, 0]
    assert sdf[0, 0, 0] * 50 == pytest.approx(expected, rel=1e-6)
    assert np.array_equal(cv.sdf_to_mask(sdf), mask)


def test_sdf_clip_and_absent_structure():
    mask = np.zeros((40, 4, 4), bool)
    mask[0] = True
    sdf = cv.mask_to_sdf(mask, (5.0, 1.0, 1.0), clip_mm=50.0)
    assert sdf.max() == 1.0 == cv.SDF_OUTSIDE
    absent = cv.mask_to_sdf(np.zeros((4, 4, 4), bool), (1, 1, 1))
    assert (absent == cv.SDF_ABSENT).all() and cv.SDF_ABSENT > cv.SDF_OUTSIDE


def test_dose_unit_round_trip_numpy_and_torch():
    dose = np.array([0.0, 42.0, 84.0])
    unit = cv.dose_to_unit(dose, 70.0)
    np.testing.assert_allclose(unit, [-1.0, 0.0, 1.0])
    np.testing.assert_allclose(cv.unit_to_dose(unit, 70.0), dose)
    t = torch.tensor(dose)
    assert torch.allclose(cv.unit_to_dose(cv.dose_to_unit(t, 70.0), 70.0), t)


@pytest.mark.parametrize("name,partner", [
    ("Femur_L", "Femur_R"), ("Femur_R", "Femur_L"), ("LeftParotid", "RightParotid"),
    ("RightParotid", "LeftParotid"), ("Parotid_Lt", "Parotid_Rt"), ("L_Lens", "R_Lens"),
    ("OpticNerveLeft", "OpticNerveRight"), ("PTV70", None), ("Bladder", None), ("Larynx", None),
])
def test_lateral_partner(name, partner):
    assert lateral_partner(name) == partner


def test_left_right_permutation_for_both_sites():
    assert left_right_pairs(PROSTATE_STRUCTURES) == [(5, 6)]
    perm = lr_channel_permutation(PROSTATE_STRUCTURES)
    assert perm == [0, 1, 2, 3, 4, 6, 5, 7]
    assert lr_channel_permutation(HEAD_NECK_STRUCTURES)[2:4] == [3, 2]
    assert lr_channel_permutation(["Femur_L", "Bladder"]) == [0, 1]  # no partner present: unchanged


def test_prostate_constraint_vector_matches_table():
    vec = constraint_vector(PROSTATE, ["PTV70", "PTV56", "Rectum"], 70.0)
    assert vec.dtype == np.float32 and vec.shape == (13,) == (PROSTATE.constraint_dim,)
    np.testing.assert_allclose(vec, [1.0, 0.8, 0.0, 0.5, 0.35, 0.2, 75 / 70, 0.5, 0.35, 0.25, 0.1,
                                     195 / 500, 45 / 70], rtol=1e-6)


def test_head_neck_constraint_vector_and_site_lookup():
    vec = constraint_vector(HEAD_NECK, ["PTV70", "PTV56"], 70.0)
    assert vec.shape == (HEAD_NECK.constraint_dim,)
    np.testing.assert_allclose(vec[:3], [1.0, 0.0, 0.8])
    assert site_for_structures(HEAD_NECK_STRUCTURES) is HEAD_NECK
    assert site_for_structures(PROSTATE_STRUCTURES) is PROSTATE


def test_site_lookup_by_containment_and_its_errors():
    assert site_for_structures(["Mandible", "PTV70", "Brainstem"]) is HEAD_NECK       # subset, any order
    assert site_for_structures(list(PROSTATE_STRUCTURES) + ["SpinalCord"]) is PROSTATE  # its cord goal
    with pytest.raises(UnknownSiteError, match=r"\['Rectum', 'Larynx'\] fit no site \(prostate lacks \['Larynx'\]; "
                                               r"head_neck lacks \['Rectum'\]\); known sites"):
        site_for_structures(["Rectum", "Larynx"])
    with pytest.raises(ValueError, match=r"\['PTV70'\] fit more than one site \(prostate, head_neck\).*site="):
        site_for_structures(["PTV70"])
