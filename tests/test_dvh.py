"""DVH and DVH metrics: hand-computed values, OpenKBP's definitions, input forms."""
import numpy as np
import pytest
import torch

from vmat_diffusion.conventions import mask_to_sdf
from vmat_diffusion.dvh import (DVH, dose_at_cc, dose_at_percent, dvh, dvh_metrics, structure_doses,
                                v_key, voxel_volume_mm3, volume_receiving)

SPACING = (5.0, 5.0, 2.0)  # 50 mm^3 = 0.05 cc per voxel


def ten_voxel_case():
    """4x4x4 volume; a 10-voxel structure holding doses 1..10 Gy, 100 Gy everywhere else."""
    dose = np.full((4, 4, 4), 100.0, dtype=np.float32)
    mask = np.zeros((4, 4, 4), dtype=bool)
    flat = np.array([0, 3, 7, 12, 21, 22, 30, 41, 50, 63])
    mask.ravel()[flat] = True
    dose.ravel()[flat] = np.array([7, 2, 9, 1, 10, 4, 3, 8, 6, 5], dtype=np.float32)
    return dose, mask


def test_metrics_equal_hand_computed_values():
    dose, mask = ten_voxel_case()
    m = dvh_metrics(dose, mask, SPACING, v_doses_gy=(5, 50.4))
    # Linear-interpolation percentile of 1..10: position p/100 * 9 into the sorted doses.
    assert m["Dmean"] == pytest.approx(5.5)
    assert m["Dmax"] == pytest.approx(10.0)
    assert m["D99"] == pytest.approx(1.09)   # 1st percentile: position 0.09
    assert m["D98"] == pytest.approx(1.18)
    assert m["D95"] == pytest.approx(1.45)   # 5th percentile: position 0.45
    assert m["D2"] == pytest.approx(9.82)
    assert m["D1"] == pytest.approx(9.91)    # 99th percentile: position 8.91
    # 0.1 cc = 100 mm^3 = 2 voxels of 50 mm^3 -> percentile 100 - 2/10*100 = 80 -> position 7.2
    assert m["D0.1cc"] == pytest.approx(8.2)
    assert m["V5Gy_percent"] == pytest.approx(60.0)
    assert m["V5Gy_cc"] == pytest.approx(0.30)
    assert m["V50.4Gy_percent"] == 0.0 and m["V50.4Gy_cc"] == 0.0
    assert m["volume_cc"] == pytest.approx(0.5)
    assert v_key(5, "percent") == "V5Gy_percent" and v_key(50.4, "cc") == "V50.4Gy_cc"


@pytest.mark.parametrize("spacing, expected", [
    ((4.0, 5.0, 2.0), 8.2),    # 100/40 = 2.5 rounds half to even -> 2 voxels (np.round, as OpenKBP)
    ((2.0, 5.0, 2.0), 5.5),    # 100/20 = 5 voxels -> percentile 50 -> position 4.5
    ((10.0, 10.0, 2.0), 9.1),  # 100/200 = 0.5 rounds to 0 -> at least 1 voxel -> percentile 90
])
def test_d01cc_follows_openkbp_voxel_rule(spacing, expected):
    dose, mask = ten_voxel_case()
    doses = structure_doses(dose, mask)
    n = max(1, np.round(100 / voxel_volume_mm3(spacing)))
    openkbp = np.percentile(doses, 100 - n / doses.size * 100)  # the challenge's formula
    assert openkbp == pytest.approx(expected)
    assert dvh_metrics(dose, mask, spacing)["D0.1cc"] == pytest.approx(openkbp)
    assert dose_at_cc(dose, mask, spacing, 0.1) == pytest.approx(openkbp)


def test_dose_at_cc_edge_cases():
    dose, mask = ten_voxel_case()
    # 8 cc voxels: at least 1 voxel -> percentile 100 - 1/10*100 = 90 (OpenKBP's rule, not the maximum)
    assert dvh_metrics(dose, mask, (20.0, 20.0, 20.0))["D0.1cc"] == pytest.approx(9.1)
    # 0.5 cc asks for 10 voxels of 0.05 cc: the whole structure -> percentile 0 = minimum
    assert dose_at_cc(dose, mask, SPACING, 0.5) == pytest.approx(1.0)
    # more than the structure: OpenKBP's formula would give a negative percentile; clipped to 0
    assert dose_at_cc(dose, mask, SPACING, 5.0) == pytest.approx(1.0)


def test_percent_metrics_match_numpy_percentile_on_random_volume():
    rng = np.random.default_rng(0)
    dose = rng.gamma(4.0, 10.0, size=(12, 10, 8)).astype(np.float32)
    mask = rng.random((12, 10, 8)) < 0.3
    doses = dose[mask].astype(np.float64)
    m = dvh_metrics(dose, mask, (3.0, 3.0, 2.5))
    for name, q in {"D99": 1, "D98": 2, "D95": 5, "D2": 98, "D1": 99}.items():
        assert m[name] == pytest.approx(np.percentile(doses, q), rel=1e-12)
        assert dose_at_percent(dose, mask, 100 - q) == pytest.approx(m[name], rel=1e-12)
    n = max(1, np.round(100 / 22.5))
    assert m["D0.1cc"] == pytest.approx(np.percentile(doses, 100 - n / doses.size * 100), rel=1e-12)
    assert m["Dmean"] == pytest.approx(doses.mean(), rel=1e-12)


def test_volume_receiving_percent_and_cc():
    dose, mask = ten_voxel_case()
    assert volume_receiving(dose, mask, SPACING, 5.0) == pytest.approx((60.0, 0.30))
    assert volume_receiving(dose, mask, SPACING, 0.0) == pytest.approx((100.0, 0.50))
    assert volume_receiving(dose, mask, SPACING, 10.0) == pytest.approx((10.0, 0.05))  # ">=" includes 10
    assert volume_receiving(dose, mask, SPACING, 10.01) == pytest.approx((0.0, 0.0))


def test_dvh_is_cumulative_and_consistent_with_volume_receiving():
    rng = np.random.default_rng(1)
    dose = rng.uniform(0, 72, size=(10, 9, 8)).astype(np.float32)
    mask = rng.random((10, 9, 8)) < 0.4
    curve = dvh(dose, mask, (2.0, 2.0, 3.0), bin_width_gy=0.5)
    assert isinstance(curve, DVH)
    assert curve.volume_percent[0] == 100.0
    assert curve.volume_percent[-1] == 0.0
    assert curve.dose_gy[-1] > dose[mask].max() >= curve.dose_gy[-2]
    assert np.all(np.diff(curve.volume_percent) <= 0)
    np.testing.assert_allclose(np.diff(curve.dose_gy), 0.5)
    assert curve.total_cc == pytest.approx(mask.sum() * 0.012)
    for k in range(0, curve.dose_gy.size, 13):
        percent, cc = volume_receiving(dose, mask, (2.0, 2.0, 3.0), curve.dose_gy[k])
        assert curve.volume_percent[k] == percent
        assert curve.volume_cc[k] == pytest.approx(cc)
    dose_axis, volume = curve  # unpacks as (dose_gy, volume_percent)
    assert dose_axis is curve.dose_gy and volume is curve.volume_percent


def test_dvh_shared_axis_with_max_dose():
    dose, mask = ten_voxel_case()
    curve = dvh(dose, mask, SPACING, bin_width_gy=1.0, max_dose_gy=20.0)
    np.testing.assert_allclose(curve.dose_gy, np.arange(22.0))
    np.testing.assert_allclose(curve.volume_percent[:12], [100] * 2 + list(range(90, -10, -10)))
    fine = dvh(dose, mask, SPACING, 0.1, max_dose_gy=80.0)  # 80 / 0.1 is not exactly 800 in floating point
    assert fine.dose_gy.size == 802 and fine.dose_gy[-1] == pytest.approx(80.1)


def test_sdf_mask_equals_bool_mask():
    dose, mask = ten_voxel_case()
    sdf = mask_to_sdf(mask, SPACING)
    assert sdf.dtype == np.float32
    assert dvh_metrics(dose, sdf, SPACING, (5,)) == dvh_metrics(dose, mask, SPACING, (5,))
    np.testing.assert_array_equal(dvh(dose, sdf, SPACING).volume_percent, dvh(dose, mask, SPACING).volume_percent)
    assert dvh_metrics(dose, mask.astype(np.uint8), SPACING) == dvh_metrics(dose, mask, SPACING)


def test_torch_input_equals_numpy_input():
    dose, mask = ten_voxel_case()
    dose_t = torch.from_numpy(dose).requires_grad_(True)
    sdf_t = torch.from_numpy(mask_to_sdf(mask, SPACING))
    assert dvh_metrics(dose_t, torch.from_numpy(mask), SPACING, (5,)) == dvh_metrics(dose, mask, SPACING, (5,))
    assert dvh_metrics(dose_t, sdf_t, SPACING) == dvh_metrics(dose, mask, SPACING)
    assert volume_receiving(dose_t, sdf_t, SPACING, 5) == volume_receiving(dose, mask, SPACING, 5)
    np.testing.assert_array_equal(dvh(dose_t, sdf_t, SPACING).volume_cc, dvh(dose, mask, SPACING).volume_cc)


def test_bad_input_raises_clear_errors():
    dose, mask = ten_voxel_case()
    with pytest.raises(ValueError, match="empty mask"):
        dvh_metrics(dose, np.zeros_like(mask), SPACING)
    with pytest.raises(ValueError, match="empty mask.*SDF"):
        dvh(dose, np.full(mask.shape, 0.5, np.float32), SPACING)  # an SDF with no voxel inside
    resampled = mask.astype(np.float32)
    resampled[np.nonzero(mask)[0][:2], np.nonzero(mask)[1][:2], np.nonzero(mask)[2][:2]] = 0.5  # a border averaged
    for resampled_mask in (resampled, np.where(resampled == 0.5, -0.05, resampled)):  # linear, cubic overshoot
        with pytest.raises(ValueError, match=r"mask: many exact zeros among other values, a resampled 0/1 mask"):
            dvh(dose, resampled_mask, SPACING)
    with pytest.raises(ValueError, match="mask: every value is 1.0, which is ambiguous.*pass a boolean mask"):
        dvh(dose, np.ones(mask.shape, np.float32), SPACING)  # a 0/1 mask of all voxels, or an SDF far outside
    with pytest.raises(ValueError, match="mask: shape"):
        volume_receiving(dose, mask[:3], SPACING, 5)
    with pytest.raises(ValueError, match="spacing_mm"):
        dvh_metrics(dose, mask, (5.0, 5.0))
    with pytest.raises(ValueError, match="spacing_mm"):
        dvh_metrics(dose, mask, (5.0, -1.0, 2.0))
    with pytest.raises(ValueError, match="bin_width_gy"):
        dvh(dose, mask, SPACING, bin_width_gy=0)
    with pytest.raises(ValueError, match="percent"):
        dose_at_percent(dose, mask, 120)
    bad = dose.copy()
    bad[mask] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        dvh_metrics(bad, mask, SPACING)

    class Prediction:  # what predict_case returns: the dose is its .dose_gy
        dose_gy = dose
    with pytest.raises(TypeError, match=r"dose: expected a numpy array or torch tensor, got Prediction "
                                        r"\(its \.dose_gy is the dose array\)"):
        dvh_metrics(Prediction(), mask, SPACING)
