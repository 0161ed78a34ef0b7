"""Dose scores, the OpenKBP DVH score and the clinical goals of the constraint table."""
import numpy as np
import pytest
import torch

from vmat_diffusion.case import Case
from vmat_diffusion.constraints import HEAD_NECK, PROSTATE, constraint_vector
from vmat_diffusion.conventions import mask_to_sdf
from vmat_diffusion.metrics import (compare_goals, dose_score, dvh_score, dvh_score_details, dvh_table,
                                    evaluate_goals, mae_gy, masks_from_case)
from vmat_diffusion.phantom import make_phantom
from vmat_diffusion.structures import HEAD_NECK_STRUCTURES, PROSTATE_STRUCTURES


# ----------------------------------------------------------------------------- MAE, dose score
def test_mae_on_simple_arrays_and_inside_mask():
    ref = np.zeros((2, 2, 2), dtype=np.float32)
    pred = np.arange(8, dtype=np.float32).reshape(2, 2, 2) - 2.0   # errors 2, 1, 0, 1, 2, 3, 4, 5
    assert mae_gy(pred, ref) == pytest.approx(18 / 8)
    mask = np.zeros((2, 2, 2), dtype=bool)
    mask[0, 0, :] = True                                            # errors 2 and 1
    assert mae_gy(pred, ref, mask) == pytest.approx(1.5)
    assert mae_gy(pred, ref, mask_to_sdf(mask, (1, 1, 1))) == pytest.approx(1.5)  # an SDF works too
    assert mae_gy(torch.from_numpy(pred), torch.from_numpy(ref), torch.from_numpy(mask)) == pytest.approx(1.5)


def test_dose_score_is_mae_inside_possible_dose_mask():
    rng = np.random.default_rng(0)
    ref = rng.uniform(0, 70, (8, 8, 8)).astype(np.float32)
    pred = ref + rng.normal(0, 2, ref.shape).astype(np.float32)
    possible = rng.random(ref.shape) < 0.5
    expected = np.abs(pred - ref)[possible].mean()
    assert dose_score(pred, ref, possible) == pytest.approx(expected, rel=1e-6)
    assert dose_score(pred, ref, possible) == mae_gy(pred, ref, possible)
    assert dose_score(pred, ref, possible.astype(np.float32)) == pytest.approx(expected, rel=1e-6)  # 0/1 floats
    assert dose_score(pred, ref, possible.astype(np.uint8)) == pytest.approx(expected, rel=1e-6)
    # OpenKBP's formula: prediction zeroed outside the mask, reference already zero there
    ref_openkbp, pred_openkbp = ref * possible, pred * possible
    openkbp = np.sum(np.abs(ref_openkbp - pred_openkbp)) / np.sum(possible)
    assert dose_score(pred, ref, possible) == pytest.approx(openkbp, rel=1e-6)


def test_score_inputs_are_checked():
    ref = np.zeros((3, 3, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="pred: shape"):
        mae_gy(np.zeros((3, 3, 2)), ref)
    with pytest.raises(ValueError, match="empty mask"):
        mae_gy(ref, ref, np.zeros((3, 3, 3), dtype=bool))
    with pytest.raises(ValueError, match="possible_dose_mask: expected a boolean or 0/1"):
        dose_score(ref, ref, np.full((3, 3, 3), -0.5, dtype=np.float32))
    with pytest.raises(ValueError, match="possible_dose_mask: shape"):
        dose_score(ref, ref, np.ones((3, 3, 2), dtype=bool))


# ----------------------------------------------------------------------------- DVH score
SPACING = (5.0, 5.0, 2.0)  # 50 mm^3: 0.1 cc = 2 voxels


def two_structure_case():
    """A PTV of 10 voxels (ref 1..10 Gy, pred twice that) and a 4-voxel OAR (ref 0, 2, 4, 10; pred 1)."""
    ref = np.zeros((4, 4, 4), dtype=np.float32)
    ptv = np.zeros_like(ref, dtype=bool)
    ptv[0, :, :].ravel()[:10] = True
    ref[ptv] = np.arange(1, 11)
    pred = 2 * ref
    oar = np.zeros_like(ptv)
    oar[3, 0, :] = True
    ref[oar] = [0, 2, 4, 10]
    pred[oar] = 1.0
    return pred, ref, {"PTV70": ptv, "Rectum": oar}


def test_dvh_score_equals_hand_computed_mean_abs_difference():
    pred, ref, masks = two_structure_case()
    # PTV (linear percentiles of 1..10 and of 2..20): D99 1.09 vs 2.18, D95 1.45 vs 2.90, D1 9.91 vs 19.82
    # OAR: D0.1cc = percentile 100 - 2/4*100 = 50 -> 3 vs 1; Dmean 4 vs 1
    expected = (1.09 + 1.45 + 9.91 + 2.0 + 3.0) / 5
    assert dvh_score(pred, ref, masks, SPACING) == pytest.approx(expected)
    details = dvh_score_details(pred, ref, masks, SPACING)
    assert [(r["structure"], r["metric"]) for r in details] == [
        ("PTV70", "D99"), ("PTV70", "D95"), ("PTV70", "D1"), ("Rectum", "D0.1cc"), ("Rectum", "Dmean")]
    assert details[4]["reference_gy"] == pytest.approx(4.0)
    assert details[4]["predicted_gy"] == pytest.approx(1.0)
    assert details[4]["difference_gy"] == pytest.approx(-3.0)


def test_dvh_score_skips_absent_structures():
    pred, ref, masks = two_structure_case()
    empty = np.zeros_like(masks["PTV70"])
    with_absent = dict(masks, Bladder=empty, PTV56=mask_to_sdf(empty, SPACING))
    assert dvh_score(pred, ref, with_absent, SPACING) == dvh_score(pred, ref, masks, SPACING)
    assert len(dvh_score_details(pred, ref, with_absent, SPACING)) == 5
    with pytest.raises(ValueError, match="no structure"):
        dvh_score(pred, ref, {"Bladder": empty}, SPACING)


def test_dvh_score_targets_override_and_sdf_masks():
    pred, ref, masks = two_structure_case()
    sdf_masks = {name: mask_to_sdf(m, SPACING) for name, m in masks.items()}
    assert dvh_score(pred, ref, sdf_masks, SPACING) == dvh_score(pred, ref, masks, SPACING)
    rows = dvh_score_details(pred, ref, masks, SPACING, targets=["PTV70", "Rectum"])
    assert [r["metric"] for r in rows if r["structure"] == "Rectum"] == ["D99", "D95", "D1"]
    rows = dvh_score_details(pred, ref, masks, SPACING, targets=[])
    assert [r["metric"] for r in rows if r["structure"] == "PTV70"] == ["D0.1cc", "Dmean"]


def test_dvh_score_targets_given_as_one_name():
    pred, ref, masks = two_structure_case()
    rows = dvh_score_details(pred, ref, masks, SPACING, targets="PTV70")   # one name, not its letters
    assert rows == dvh_score_details(pred, ref, masks, SPACING, targets=["PTV70"])
    assert [r["metric"] for r in rows if r["structure"] == "PTV70"] == ["D99", "D95", "D1"]


def test_float_01_masks_score_as_boolean_masks():
    """0/1 float masks (as OpenKBP's own loader makes them) are masks, not SDFs with nothing inside."""
    case = make_phantom("f01", shape=(32, 32, 32), spacing_mm=(8.0, 8.0, 8.0), seed=2)
    pred, ref, spacing = case.dose * 1.05, case.dose, case.spacing_mm
    masks = masks_from_case(case)
    floats = {name: mask.astype(np.float64) for name, mask in masks.items()}
    possible = case.extras["possible_dose_mask"] != 0
    goals = evaluate_goals(pred, masks, spacing)
    assert goals and evaluate_goals(pred, floats, spacing) == goals
    assert dvh_table(pred, floats, spacing) == dvh_table(pred, masks, spacing)
    details = dvh_score_details(pred, ref, masks, spacing, possible_dose_mask=possible)
    assert len(details) == 2 * 3 + 6 * 2    # PTV70, PTV56: D99, D95, D1; six OARs: D0.1cc, Dmean
    assert dvh_score_details(pred, ref, floats, spacing, possible_dose_mask=possible) == details
    assert mae_gy(pred, ref, floats["PTV70"]) == mae_gy(pred, ref, masks["PTV70"])
    assert mae_gy(pred, ref, possible.astype(np.float32)) == mae_gy(pred, ref, possible)
    all_ones = np.ones(ref.shape)
    with pytest.raises(ValueError, match=r"masks\['Bowel'\]: every value is 1.0, which is ambiguous.*boolean"):
        evaluate_goals(pred, dict(floats, Bowel=all_ones), spacing)
    with pytest.raises(ValueError, match="mask: every value is 1.0, which is ambiguous"):
        mae_gy(pred, ref, all_ones)


def openkbp_transcription(pred, ref, masks, spacing, possible, targets):
    """The challenge's per-patient computation (flattened arrays, NaN for absent ROIs, nanmean).

    Its loader reads the CSVs into float64 arrays, hence the casts.
    """
    pred = (pred.astype(np.float64) * possible).flatten()
    ref = ref.astype(np.float64).flatten()
    voxels_in_tenth_cc = np.maximum(1, np.round(100 / np.prod(spacing)))
    diffs = []
    for roi, mask in masks.items():
        flat = mask.flatten()
        if not flat.any():
            diffs += [np.nan, np.nan] if roi not in targets else [np.nan] * 3
            continue
        values = []
        for dose in (ref, pred):
            roi_dose = dose[flat]
            if roi in targets:
                values.append([np.percentile(roi_dose, 1), np.percentile(roi_dose, 5), np.percentile(roi_dose, 99)])
            else:
                q = 100 - voxels_in_tenth_cc / len(roi_dose) * 100
                values.append([np.percentile(roi_dose, q), roi_dose.mean()])
        diffs += list(np.abs(np.subtract(*values)))
    return np.nanmean(diffs)


def test_dvh_score_matches_openkbp_computation_with_possible_dose_mask():
    rng = np.random.default_rng(3)
    shape, spacing = (16, 14, 12), (3.906, 3.906, 2.5)
    possible = np.zeros(shape, dtype=bool)
    possible[2:14, 2:12, :] = True
    ref = (rng.gamma(5.0, 10.0, shape) * possible).astype(np.float32)   # zero outside, as in OpenKBP data
    pred = (ref + rng.normal(0, 3, shape)).astype(np.float32)           # non-zero outside the mask
    masks = {name: rng.random(shape) < 0.1 for name in ("Brainstem", "SpinalCord", "PTV56", "PTV70")}
    masks["SpinalCord"][:, :, :3] = True                                 # reaches outside the possible-dose mask
    masks["Larynx"] = np.zeros(shape, dtype=bool)                        # absent
    expected = openkbp_transcription(pred, ref, masks, spacing, possible, {"PTV56", "PTV70"})
    assert dvh_score(pred, ref, masks, spacing, possible_dose_mask=possible) == pytest.approx(expected, rel=1e-9)
    assert dvh_score(pred, ref, masks, spacing) != pytest.approx(expected, rel=1e-6)  # the mask matters here


def test_dvh_table_has_present_structures():
    pred, ref, masks = two_structure_case()
    table = dvh_table(ref, dict(masks, Bladder=np.zeros_like(masks["PTV70"])), SPACING, v_doses_gy=(5,))
    assert list(table) == ["PTV70", "Rectum"]
    assert table["PTV70"]["V5Gy_percent"] == pytest.approx(60.0)
    assert table["Rectum"]["Dmax"] == pytest.approx(10.0)


# ----------------------------------------------------------------------------- clinical goals
GOAL_SPACING = (4.0, 4.0, 4.0)  # 0.064 cc per voxel


def prostate_case():
    """(10, 10, 10) volume; structure i of PROSTATE_STRUCTURES is the slab x == i (100 voxels)."""
    shape = (10, 10, 10)
    masks = {}
    for i, name in enumerate(PROSTATE_STRUCTURES):
        m = np.zeros(shape, dtype=bool)
        m[i] = True
        masks[name] = m
    dose = np.zeros(shape, dtype=np.float32)
    dose[masks["PTV70"]] = 70.0
    dose[masks["PTV56"]] = 56.0
    dose[masks["Prostate"]] = 70.0
    dose[3] = 40.0
    dose[3, :6] = 55.0   # Rectum: 60 % at 55 Gy -> V50 = 60 % (fails < 50 %), V60 = 0, Dmax 55
    dose[4] = 20.0
    dose[4, :4] = 66.0   # Bladder: V65 = 40 % (passes < 50 %)
    dose[5, :2] = 52.0   # Femur_L: V50 = 20 % (fails < 10 %)
    dose[6] = 30.0       # Femur_R: V50 = 0 % (passes)
    dose[7] = 50.0       # Bowel: V45 = 100 voxels = 6.4 cc (passes < 195 cc)
    return dose, masks


def rows_by_key(rows):
    return {(r["goal"], r["structure"]): r for r in rows}


def test_evaluate_goals_pass_fail_on_prostate_dose():
    dose, masks = prostate_case()
    rows = evaluate_goals(dose, masks, GOAL_SPACING)
    by = rows_by_key(rows)
    rectum = by[("Rectum V50Gy<50%", "Rectum")]
    assert rectum["metric"] == "V50Gy" and rectum["unit"] == "%"
    assert rectum["value"] == pytest.approx(60.0) and rectum["limit"] == 50.0 and rectum["passed"] is False
    assert by[("Rectum V60Gy<35%", "Rectum")]["passed"] is True
    assert by[("Rectum Dmax<75Gy", "Rectum")]["value"] == pytest.approx(55.0)
    assert by[("Rectum Dmax<75Gy", "Rectum")]["passed"] is True
    assert by[("Bladder V65Gy<50%", "Bladder")]["value"] == pytest.approx(40.0)
    assert by[("Bladder V65Gy<50%", "Bladder")]["passed"] is True
    femur_rows = [r for r in rows if r["goal"] == "Femoral heads V50Gy<10%"]
    assert [r["structure"] for r in femur_rows] == ["Femur_L", "Femur_R"]      # one goal, both femurs
    assert [r["passed"] for r in femur_rows] == [False, True]
    assert femur_rows[0]["value"] == pytest.approx(20.0)
    bowel = by[("Bowel V45Gy<195cc", "Bowel")]
    assert bowel["unit"] == "cc" and bowel["value"] == pytest.approx(6.4) and bowel["passed"] is True
    assert not any(r["goal"] == "Cord Dmax<45Gy" for r in rows)                # SpinalCord not contoured


def test_goal_rows_and_constraint_vector_come_from_one_table():
    dose, masks = prostate_case()
    rows = evaluate_goals(dose, masks, GOAL_SPACING)
    vector = constraint_vector(PROSTATE, masks, rx_dose_gy=70.0)
    n_targets = len(PROSTATE.targets)
    assert len(vector) - n_targets == len(PROSTATE.goals)
    goal_index = {g.name: i for i, g in enumerate(PROSTATE.goals)}
    for row in rows:
        goal = PROSTATE.goals[goal_index[row["goal"]]]
        assert vector[n_targets + goal_index[row["goal"]]] == pytest.approx(row["limit"] / goal.vector_scale)
    applicable = [g.name for g in PROSTATE.goals if any(s in masks for s in g.structures)]
    assert sorted(set(r["goal"] for r in rows)) == sorted(applicable)
    assert len(rows) == sum(sum(s in masks for s in g.structures) for g in PROSTATE.goals)
    # with the cord contoured every goal of the table (every goal entry of the vector) is evaluated
    cord = np.zeros(dose.shape, dtype=bool)
    cord[9] = True
    rows = evaluate_goals(dose, dict(masks, SpinalCord=cord), GOAL_SPACING, site=PROSTATE)
    assert len(set(r["goal"] for r in rows)) == len(vector) - n_targets
    assert rows_by_key(rows)[("Cord Dmax<45Gy", "SpinalCord")]["passed"] is True


def test_evaluate_goals_from_case_and_skips_absent():
    dose, masks = prostate_case()
    masks["Bowel"] = np.zeros_like(masks["Bowel"])
    sdf = np.stack([mask_to_sdf(masks[n], GOAL_SPACING) for n in PROSTATE_STRUCTURES])
    case = Case(ct=np.zeros(dose.shape, np.float32), dose=dose, masks_sdf=sdf,
                constraints=constraint_vector(PROSTATE, [n for n in masks if masks[n].any()], 70.0),
                metadata={"case_id": "goal_test", "structures": list(PROSTATE_STRUCTURES),
                          "spacing_mm": list(GOAL_SPACING), "rx_dose_gy": 70.0}).validate()
    assert {n: m.any() for n, m in masks_from_case(case).items()} == {n: m.any() for n, m in masks.items()}
    from_case = evaluate_goals(dose, case)
    assert from_case == evaluate_goals(dose, masks, GOAL_SPACING, site="prostate")
    assert not any(r["structure"] == "Bowel" for r in from_case)
    assert evaluate_goals(torch.from_numpy(dose), case) == from_case


def test_compare_goals_flags_agreement():
    ref, masks = prostate_case()
    pred = ref.copy()
    pred[3] = 40.0       # Rectum V50 now 0 %: passes where the reference fails
    rows = compare_goals(pred, ref, masks, GOAL_SPACING)
    by = rows_by_key(rows)
    rectum = by[("Rectum V50Gy<50%", "Rectum")]
    assert rectum["reference_passed"] is False and rectum["predicted_passed"] is True
    assert rectum["reference_value"] == pytest.approx(60.0) and rectum["predicted_value"] == 0.0
    assert rectum["agree"] is False
    assert sum(not r["agree"] for r in rows) == 1
    assert len(rows) == len(evaluate_goals(ref, masks, GOAL_SPACING))


def test_goal_inputs_are_checked():
    dose, masks = prostate_case()
    with pytest.raises(ValueError, match="spacing_mm: required"):
        evaluate_goals(dose, masks)
    with pytest.raises(ValueError, match="site"):
        evaluate_goals(dose, masks, GOAL_SPACING, site="lung")
    with pytest.raises(TypeError, match="case_or_masks"):
        evaluate_goals(dose, [masks["Rectum"]], GOAL_SPACING)


def slab_masks(names, shape=(10, 10, 10)):
    """Structure i of ``names`` is the slab x == i."""
    masks = {}
    for i, name in enumerate(names):
        masks[name] = np.zeros(shape, dtype=bool)
        masks[name][i] = True
    return masks


def test_goal_site_from_a_subset_of_a_site_in_any_order():
    dose = np.full((10, 10, 10), 30.0, dtype=np.float32)
    masks = slab_masks([n for n in reversed(HEAD_NECK_STRUCTURES) if n != "Larynx"])
    rows = evaluate_goals(dose, masks, GOAL_SPACING)
    assert [r["goal"] for r in rows] == [g.name for g in HEAD_NECK.goals if g.structures != ("Larynx",)]
    assert rows == evaluate_goals(dose, masks, GOAL_SPACING, site="head_neck")
    assert len(compare_goals(dose, dose, masks, GOAL_SPACING)) == len(rows)


def test_goal_site_from_case_metadata():
    """PTV70 and SpinalCord appear in both tables (prostate's cord goal), so only the metadata can tell."""
    masks = slab_masks(["PTV70", "SpinalCord"])
    dose = np.full((10, 10, 10), 30.0, dtype=np.float32)

    def case(**extra_metadata):
        return Case(ct=np.zeros(dose.shape, np.float32), dose=dose,
                    masks_sdf=np.stack([mask_to_sdf(m, GOAL_SPACING) for m in masks.values()]),
                    constraints=np.zeros(3, np.float32), metadata=dict(
                        case_id="site", structures=list(masks), spacing_mm=list(GOAL_SPACING), rx_dose_gy=70.0,
                        **extra_metadata)).validate()

    assert [r["goal"] for r in evaluate_goals(dose, case(site="head_neck"))] == ["SpinalCord Dmax<45Gy"]
    assert [r["goal"] for r in evaluate_goals(dose, case(site="prostate"))] == ["Cord Dmax<45Gy"]
    with pytest.raises(ValueError, match=r"^structures \['PTV70', 'SpinalCord'\] fit more than one site \(prostate, "
                                         r"head_neck\).*pass site="):
        evaluate_goals(dose, case())
    with pytest.raises(ValueError, match=r"^the case's metadata 'site' 'lung' is not one of \['prostate', 'head_neck'\], "
                                         r"and structures \['PTV70', 'SpinalCord'\] fit more than one site"):
        evaluate_goals(dose, case(site="lung"))


def test_unknown_structures_raise_naming_them_and_the_sites():
    dose = np.full((10, 10, 10), 30.0, dtype=np.float32)
    masks = slab_masks(["PTV70", "Lung_L"])
    for score in (lambda: evaluate_goals(dose, masks, GOAL_SPACING),
                  lambda: compare_goals(dose, dose, masks, GOAL_SPACING)):
        with pytest.raises(ValueError, match=r"structures \['PTV70', 'Lung_L'\] fit no site \(prostate lacks "
                                             r"\['Lung_L'\]; head_neck lacks \['Lung_L'\]\); known sites: "
                                             r"\['prostate', 'head_neck'\].*pass site="):
            score()


# ----------------------------------------------------------------------------- real OpenKBP patient
def read_sparse_csv(path, shape=(128, 128, 128), values=True):
    """An OpenKBP sparse CSV (header ",data", rows "flat_index,value") -> dense C-order volume."""
    rows = np.loadtxt(path, delimiter=",", skiprows=1, usecols=(0, 1) if values else (0,), ndmin=2)
    volume = np.zeros(int(np.prod(shape)), dtype=np.float64 if values else bool)
    volume[rows[:, 0].astype(np.int64)] = rows[:, 1] if values else True
    return volume.reshape(shape)


def test_dvh_score_matches_openkbp_on_a_real_patient(openkbp_dir):
    folder = openkbp_dir / "train-pats" / "pt_40"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    spacing = tuple(np.loadtxt(folder / "voxel_dimensions.csv"))
    ref = read_sparse_csv(folder / "dose.csv")
    possible = read_sparse_csv(folder / "possible_dose_mask.csv", values=False)
    masks = {p.stem: read_sparse_csv(p, values=False) for p in sorted(folder.glob("*.csv"))
             if p.stem not in ("ct", "dose", "possible_dose_mask", "voxel_dimensions")}
    rng = np.random.default_rng(0)
    pred = ref * rng.uniform(0.9, 1.1, ref.shape) + 0.5   # non-zero outside the possible-dose mask too
    targets = {name for name in masks if name.startswith("PTV")}
    expected = openkbp_transcription(pred, ref, masks, spacing, possible, targets)
    assert dvh_score(pred, ref, masks, spacing, possible_dose_mask=possible) == pytest.approx(expected, rel=1e-12)
    assert dvh_score(ref, ref, masks, spacing) == 0.0
    openkbp_dose_score = np.sum(np.abs(ref - pred * possible)) / np.sum(possible)
    assert dose_score(pred, ref, possible) == pytest.approx(openkbp_dose_score, rel=1e-12)
