"""Scores of a predicted dose against a reference dose, and the clinical goals of a site.

* ``mae_gy``, ``dose_score``: voxel-wise mean absolute error in Gy.
* ``dvh_score``, ``dvh_score_details``: the OpenKBP DVH score.
* ``evaluate_goals``, ``compare_goals``: the goals of the constraint table
  (``vmat_diffusion.constraints``), the same table that builds the conditioning vector.
* ``dvh_table``: ``dvh.dvh_metrics`` of every present structure.

Structure masks are given as a mapping name -> mask (boolean, 0/1, or the scaled SDF of
``Case.masks_sdf``: inside = ``sdf < 0``; see ``dvh.as_bool_mask``); ``masks_from_case``
builds it from a ``Case``. Structures whose mask is empty are skipped. Doses are (X, Y, Z)
in Gy, numpy or torch.

The OpenKBP scores follow the challenge's evaluation code (``ababier/open-kbp``,
``provided_code/dose_evaluation_class.py``); see ``dose_score`` and ``dvh_score``.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional, Tuple, Union

import numpy as np

from .case import Case
from .constraints import SITES, Goal, SiteProtocol, UnknownSiteError, site_for_structures
from .dvh import as_bool_mask, as_numpy, dvh_metrics, volume_receiving

# OpenKBP's DVH metrics: organs at risk and targets.
OAR_METRICS: Tuple[str, ...] = ("D0.1cc", "Dmean")
TARGET_METRICS: Tuple[str, ...] = ("D99", "D95", "D1")

MaskMapping = Mapping[str, object]


def _same_shape(pred: np.ndarray, ref: np.ndarray) -> None:
    if pred.shape != ref.shape:
        raise ValueError(f"pred: shape {pred.shape} differs from ref shape {ref.shape}")


def _binary_mask(mask, shape, name: str) -> np.ndarray:
    """A 0/1 mask (bool, integer, or floats that are all 0 or 1) -> bool, checked against ``shape``."""
    m = as_numpy(mask, name)
    if m.dtype.kind == "f":
        if not np.isin(m, (0.0, 1.0)).all():
            raise ValueError(f"{name}: expected a boolean or 0/1 mask, got floats other than 0 and 1 "
                             "(for a structure SDF pass sdf < 0)")
        m = m != 0
    elif m.dtype != bool:
        m = as_bool_mask(m, name)
    if m.shape != tuple(shape):
        raise ValueError(f"{name}: shape {m.shape} differs from dose shape {tuple(shape)}")
    return m


def mae_gy(pred, ref, mask=None) -> float:
    """Mean absolute error (Gy) of two doses (X, Y, Z), over all voxels or inside ``mask``.

    mask: boolean, 0/1, or a structure SDF (inside = ``sdf < 0``; ``dvh.as_bool_mask``).
    Empty mask -> ValueError.
    """
    pred = as_numpy(pred, "pred").astype(np.float64)
    ref = as_numpy(ref, "ref").astype(np.float64)
    _same_shape(pred, ref)
    error = np.abs(pred - ref)
    if mask is None:
        return float(error.mean())
    inside = as_bool_mask(mask)
    if inside.shape != pred.shape:
        raise ValueError(f"mask: shape {inside.shape} differs from dose shape {pred.shape}")
    if not inside.any():
        raise ValueError("mask: empty mask, no voxel to average over")
    return float(error[inside].mean())


def dose_score(pred, ref, possible_dose_mask) -> float:
    """OpenKBP dose score of one patient: mean absolute error (Gy) inside the possible-dose mask.

    possible_dose_mask: boolean or 0/1 array (X, Y, Z). OpenKBP computes
    ``sum(|ref - pred|) / sum(possible_dose_mask)`` after setting the prediction to zero outside
    the mask (and its reference doses are zero there), which equals this masked mean. The
    challenge's score over many patients is the mean of these per-patient values.
    """
    pred = as_numpy(pred, "pred")
    inside = _binary_mask(possible_dose_mask, pred.shape, "possible_dose_mask")
    return mae_gy(pred, ref, inside)


def masks_from_case(case: Case) -> Dict[str, np.ndarray]:
    """Boolean (X, Y, Z) mask of every structure of ``case``, in channel order (empty when absent)."""
    return {name: case.mask(name) for name in case.structures}


def _present_masks(masks: MaskMapping, shape) -> Dict[str, np.ndarray]:
    """Boolean masks of the non-empty structures, shapes checked against the dose."""
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks: expected a mapping structure name -> mask, got {type(masks).__name__}")
    present = {}
    for name, mask in masks.items():
        inside = as_bool_mask(mask, f"masks[{name!r}]")
        if inside.shape != tuple(shape):
            raise ValueError(f"masks[{name!r}]: shape {inside.shape} differs from dose shape {tuple(shape)}")
        if inside.any():
            present[name] = inside
    return present


def is_default_target(name: str) -> bool:
    """OpenKBP's split of structures: targets are the PTVs (name starts with "PTV", any case)."""
    return name.upper().startswith("PTV")


def dvh_score_details(pred, ref, masks: MaskMapping, spacing_mm, targets: Optional[Iterable[str]] = None,
                      possible_dose_mask=None) -> List[dict]:
    """Per-structure, per-metric DVH differences behind ``dvh_score``.

    Targets get D99, D95, D1; every other structure (an OAR) gets D0.1cc and Dmean, each
    computed over the whole structure. targets: the name (a str) or names of the target
    structures (default: names starting with "PTV"). possible_dose_mask: when given, both
    doses are set to zero outside it first, as OpenKBP's pipeline does (structures such as the
    spinal cord reach outside that mask, so this changes their metrics).

    Returns one dict per (present structure, metric): ``structure``, ``metric``,
    ``reference_gy``, ``predicted_gy``, ``difference_gy`` (predicted - reference).
    """
    pred = as_numpy(pred, "pred").astype(np.float64)
    ref = as_numpy(ref, "ref").astype(np.float64)
    _same_shape(pred, ref)
    if possible_dose_mask is not None:
        inside = _binary_mask(possible_dose_mask, pred.shape, "possible_dose_mask")
        pred, ref = pred * inside, ref * inside
    target_names = None if targets is None else {targets} if isinstance(targets, str) else set(targets)
    rows = []
    for name, mask in _present_masks(masks, pred.shape).items():
        is_target = is_default_target(name) if target_names is None else name in target_names
        metric_names = TARGET_METRICS if is_target else OAR_METRICS
        ref_metrics = dvh_metrics(ref, mask, spacing_mm)
        pred_metrics = dvh_metrics(pred, mask, spacing_mm)
        for metric in metric_names:
            rows.append({"structure": name, "metric": metric, "reference_gy": ref_metrics[metric],
                         "predicted_gy": pred_metrics[metric],
                         "difference_gy": pred_metrics[metric] - ref_metrics[metric]})
    return rows


def dvh_score(pred, ref, masks: MaskMapping, spacing_mm, targets: Optional[Iterable[str]] = None,
              possible_dose_mask=None) -> float:
    """OpenKBP DVH score of one patient (Gy): mean |difference| over ``dvh_score_details``.

    This is OpenKBP's ``nanmean`` over all (structure, metric) pairs with absent structures
    left out. Note that the challenge's score over many patients pools all pairs of all
    patients (so a patient with more structures weighs more); pool the details rows of every
    patient to reproduce it. Raises ValueError when no structure is present.
    """
    rows = dvh_score_details(pred, ref, masks, spacing_mm, targets, possible_dose_mask)
    if not rows:
        raise ValueError("masks: no structure has a non-empty mask, nothing to score")
    return float(np.mean([abs(row["difference_gy"]) for row in rows]))


def dvh_table(dose, masks: MaskMapping, spacing_mm, v_doses_gy: Iterable[float] = ()) -> Dict[str, Dict[str, float]]:
    """``dvh.dvh_metrics`` of every present structure: {structure: {metric: value}}."""
    dose = as_numpy(dose, "dose")
    v_doses_gy = tuple(v_doses_gy)
    return {name: dvh_metrics(dose, mask, spacing_mm, v_doses_gy)
            for name, mask in _present_masks(masks, dose.shape).items()}


def _resolve_masks(case_or_masks, spacing_mm) -> Tuple[MaskMapping, Tuple[float, ...]]:
    if isinstance(case_or_masks, Case):
        return masks_from_case(case_or_masks), (case_or_masks.spacing_mm if spacing_mm is None else spacing_mm)
    if isinstance(case_or_masks, Mapping):
        if spacing_mm is None:
            raise ValueError("spacing_mm: required when case_or_masks is a mapping of masks")
        return case_or_masks, spacing_mm
    raise TypeError("case_or_masks: expected a Case or a mapping structure name -> mask, "
                    f"got {type(case_or_masks).__name__}")


def goal_site(case_or_masks: Union[Case, MaskMapping], site: Union[SiteProtocol, str, None] = None) -> SiteProtocol:
    """The site whose goals ``evaluate_goals`` checks.

    site: a ``SiteProtocol`` or a name in ``constraints.SITES``, used as given. None: for a
    ``Case`` its ``metadata["site"]`` when that names a site of ``SITES``; otherwise (and for a
    mapping of masks) ``constraints.site_for_structures`` of the structure names, which raises
    ``constraints.UnknownSiteError`` (a ValueError) when no site, or more than one, fits them.
    """
    if isinstance(site, SiteProtocol):
        return site
    if site is not None:
        if isinstance(site, str) and site in SITES:
            return SITES[site]
        raise ValueError(f"site: expected a SiteProtocol, None or one of {sorted(SITES)}, got {site!r}")
    if isinstance(case_or_masks, Case):
        named = case_or_masks.metadata.get("site")
        if isinstance(named, str) and named in SITES:
            return SITES[named]
        try:
            return site_for_structures(case_or_masks.structures)
        except UnknownSiteError as e:
            if named is None:
                raise
            raise UnknownSiteError(f"the case's metadata 'site' {named!r} is not one of {list(SITES)}, and "
                                   f"{e.reason}", e.advice) from None
    return site_for_structures(case_or_masks)  # a mapping's keys


def goal_metric_label(goal: Goal) -> str:
    """Short label of a goal's metric: ``"V50Gy"``, ``"Dmax"``, ``"Dmean"``."""
    return f"V{goal.dose_gy:g}Gy" if goal.metric == "V" else goal.metric


def goal_value(dose, mask, spacing_mm, goal: Goal) -> float:
    """The value of ``goal``'s metric on one structure, in ``goal.unit`` (%, cc or Gy)."""
    if goal.metric == "V":
        percent, cc = volume_receiving(dose, mask, spacing_mm, goal.dose_gy)
        if goal.unit == "%":
            return percent
        if goal.unit == "cc":
            return cc
        raise ValueError(f"goal {goal.name!r}: unit of a V goal must be '%' or 'cc', got {goal.unit!r}")
    if goal.metric in ("Dmax", "Dmean"):
        return dvh_metrics(dose, mask, spacing_mm)[goal.metric]
    raise ValueError(f"goal {goal.name!r}: unknown metric {goal.metric!r} (expected 'V', 'Dmax' or 'Dmean')")


def evaluate_goals(dose, case_or_masks: Union[Case, MaskMapping], spacing_mm=None,
                   site: Union[SiteProtocol, str, None] = None) -> List[dict]:
    """Check the site's clinical goals on one dose (X, Y, Z) in Gy.

    case_or_masks: a ``Case`` (its masks; ``spacing_mm`` defaults to the case's) or a mapping
    structure name -> mask (then ``spacing_mm`` is required). site: a ``SiteProtocol``, a name
    in ``constraints.SITES``, or None: the case's ``metadata["site"]``, else the one site whose
    structure list holds every structure name (``goal_site``; ValueError when none or several do).

    Returns one dict per (goal, present structure it applies to), in table order:
    ``goal`` (name), ``structure``, ``metric`` (label such as ``"V50Gy"``), ``value``,
    ``limit``, ``unit``, ``passed`` (value < limit). Absent structures are skipped.
    """
    dose = as_numpy(dose, "dose")
    masks, spacing_mm = _resolve_masks(case_or_masks, spacing_mm)
    site = goal_site(case_or_masks, site)
    present = _present_masks(masks, dose.shape)
    rows = []
    for goal in site.goals:
        for name in goal.structures:
            if name not in present:
                continue
            value = goal_value(dose, present[name], spacing_mm, goal)
            rows.append({"goal": goal.name, "structure": name, "metric": goal_metric_label(goal),
                         "value": value, "limit": goal.limit, "unit": goal.unit,
                         "passed": bool(value < goal.limit)})
    return rows


def compare_goals(pred, ref, case_or_masks: Union[Case, MaskMapping], spacing_mm=None,
                  site: Union[SiteProtocol, str, None] = None) -> List[dict]:
    """The site's goals on a reference and a predicted dose, side by side.

    Arguments as ``evaluate_goals``. One dict per (goal, present structure): ``goal``,
    ``structure``, ``metric``, ``limit``, ``unit``, ``reference_value``, ``reference_passed``,
    ``predicted_value``, ``predicted_passed``, ``agree`` (both pass or both fail).
    """
    pred, ref = as_numpy(pred, "pred"), as_numpy(ref, "ref")
    _same_shape(pred, ref)
    masks, spacing_mm = _resolve_masks(case_or_masks, spacing_mm)
    site = goal_site(case_or_masks, site)
    rows = []
    for r, p in zip(evaluate_goals(ref, masks, spacing_mm, site), evaluate_goals(pred, masks, spacing_mm, site)):
        rows.append({"goal": r["goal"], "structure": r["structure"], "metric": r["metric"],
                     "limit": r["limit"], "unit": r["unit"],
                     "reference_value": r["value"], "reference_passed": r["passed"],
                     "predicted_value": p["value"], "predicted_passed": p["passed"],
                     "agree": r["passed"] == p["passed"]})
    return rows
