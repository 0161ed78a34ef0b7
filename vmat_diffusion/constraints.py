"""The constraint table: prescription levels and clinical goals per site.

One table serves twice: ``constraint_vector`` turns it into the model's conditioning vector,
and the evaluation module checks the same goals on a reference and a predicted dose.

Prostate vector (13 entries)::

    [0..2]  prescription ratio to Rx of PTV70, PTV56, PTV50.4 (0 when the target is absent)
    [3]  Rectum V50Gy < 50 %      -> 0.50      [8]  Bladder V70Gy < 35 %       -> 0.35
    [4]  Rectum V60Gy < 35 %      -> 0.35      [9]  Bladder V75Gy < 25 %       -> 0.25
    [5]  Rectum V70Gy < 20 %      -> 0.20      [10] Femoral heads V50Gy < 10 % -> 0.10
    [6]  Rectum Dmax < 75 Gy      -> 75/70     [11] Bowel V45Gy < 195 cc       -> 195/500
    [7]  Bladder V65Gy < 50 %     -> 0.50      [12] Cord Dmax < 45 Gy          -> 45/70
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Tuple

import numpy as np

from .structures import HEAD_NECK_STRUCTURES, PROSTATE_STRUCTURES


@dataclass(frozen=True)
class Target:
    """A prescription level: the structure that receives ``dose_gy``."""
    structure: str
    dose_gy: float


@dataclass(frozen=True)
class Goal:
    """One clinical goal, ``metric(structure) < limit``.

    metric: ``"V"`` (volume receiving at least ``dose_gy``; ``unit`` "%" of the structure or
    "cc"), ``"Dmax"`` or ``"Dmean"`` (``unit`` "Gy"). The goal applies to each listed structure
    that is present (e.g. both femoral heads). Its conditioning-vector entry is
    ``limit / vector_scale``.
    """
    name: str
    structures: Tuple[str, ...]
    metric: str
    limit: float
    unit: str
    vector_scale: float
    dose_gy: Optional[float] = None


@dataclass(frozen=True)
class SiteProtocol:
    name: str
    structures: Tuple[str, ...]
    targets: Tuple[Target, ...]
    goals: Tuple[Goal, ...]

    @property
    def constraint_dim(self) -> int:
        return len(self.targets) + len(self.goals)

    @property
    def known_structures(self) -> Tuple[str, ...]:
        """``structures``, then the other structures its targets and goals name (e.g. prostate's cord)."""
        names = list(self.structures)
        for name in [t.structure for t in self.targets] + [s for g in self.goals for s in g.structures]:
            if name not in names:
                names.append(name)
        return tuple(names)


PROSTATE = SiteProtocol(
    name="prostate",
    structures=PROSTATE_STRUCTURES,
    targets=(Target("PTV70", 70.0), Target("PTV56", 56.0), Target("PTV50.4", 50.4)),
    goals=(
        Goal("Rectum V50Gy<50%", ("Rectum",), "V", 50.0, "%", 100.0, dose_gy=50.0),
        Goal("Rectum V60Gy<35%", ("Rectum",), "V", 35.0, "%", 100.0, dose_gy=60.0),
        Goal("Rectum V70Gy<20%", ("Rectum",), "V", 20.0, "%", 100.0, dose_gy=70.0),
        Goal("Rectum Dmax<75Gy", ("Rectum",), "Dmax", 75.0, "Gy", 70.0),
        Goal("Bladder V65Gy<50%", ("Bladder",), "V", 50.0, "%", 100.0, dose_gy=65.0),
        Goal("Bladder V70Gy<35%", ("Bladder",), "V", 35.0, "%", 100.0, dose_gy=70.0),
        Goal("Bladder V75Gy<25%", ("Bladder",), "V", 25.0, "%", 100.0, dose_gy=75.0),
        Goal("Femoral heads V50Gy<10%", ("Femur_L", "Femur_R"), "V", 10.0, "%", 100.0, dose_gy=50.0),
        Goal("Bowel V45Gy<195cc", ("Bowel",), "V", 195.0, "cc", 500.0, dose_gy=45.0),
        Goal("Cord Dmax<45Gy", ("SpinalCord",), "Dmax", 45.0, "Gy", 70.0),
    ),
)

# Common head-and-neck (RTOG-style) goals; vector has 3 + 7 = 10 entries.
HEAD_NECK = SiteProtocol(
    name="head_neck",
    structures=HEAD_NECK_STRUCTURES,
    targets=(Target("PTV70", 70.0), Target("PTV63", 63.0), Target("PTV56", 56.0)),
    goals=(
        Goal("Brainstem Dmax<54Gy", ("Brainstem",), "Dmax", 54.0, "Gy", 70.0),
        Goal("SpinalCord Dmax<45Gy", ("SpinalCord",), "Dmax", 45.0, "Gy", 70.0),
        Goal("RightParotid Dmean<26Gy", ("RightParotid",), "Dmean", 26.0, "Gy", 70.0),
        Goal("LeftParotid Dmean<26Gy", ("LeftParotid",), "Dmean", 26.0, "Gy", 70.0),
        Goal("Esophagus Dmean<45Gy", ("Esophagus",), "Dmean", 45.0, "Gy", 70.0),
        Goal("Larynx Dmean<45Gy", ("Larynx",), "Dmean", 45.0, "Gy", 70.0),
        Goal("Mandible Dmax<73Gy", ("Mandible",), "Dmax", 73.0, "Gy", 70.0),
    ),
)

SITES: Dict[str, SiteProtocol] = {"prostate": PROSTATE, "head_neck": HEAD_NECK}


class UnknownSiteError(ValueError):
    """No site, or more than one, fits a list of structure names (``site_for_structures``).

    ``reason``: why, without the ``advice`` on what to pass (for a note such as vmat-infer's)."""

    def __init__(self, reason: str, advice: str = ""):
        self.reason, self.advice = reason, advice
        super().__init__(reason + advice)


def site_for_structures(structures: Iterable[str]) -> SiteProtocol:
    """The one site of ``SITES`` whose ``known_structures`` hold every name in ``structures``.

    Order is irrelevant and a subset is fine (a case without a larynx is still head and neck).
    Raises UnknownSiteError (a ValueError) listing the names and the known sites when no site,
    or more than one, holds them all: then name the site (``site=`` / metadata ``site``).
    """
    names = list(dict.fromkeys(structures))
    fits = [site for site in SITES.values() if set(names) <= set(site.known_structures)]
    if len(fits) == 1:
        return fits[0]
    if fits:
        problem = f"fit more than one site ({', '.join(site.name for site in fits)})"
    else:
        problem = "fit no site (" + "; ".join(
            f"{site.name} lacks {[n for n in names if n not in site.known_structures]}" for site in SITES.values()) + ")"
    raise UnknownSiteError(f"structures {names} {problem}",
                           f"; known sites: {list(SITES)} (constraints.SITES); pass site= one of them or a SiteProtocol")


def constraint_vector(site: SiteProtocol, present: Iterable[str], rx_dose_gy: float) -> np.ndarray:
    """Conditioning vector (site.constraint_dim,) float32.

    present: names of the structures contoured in this case (non-empty masks); targets that
    are absent get 0, every goal entry is ``limit / vector_scale``.
    """
    present = set(present)
    ratios = [t.dose_gy / rx_dose_gy if t.structure in present else 0.0 for t in site.targets]
    goals = [g.limit / g.vector_scale for g in site.goals]
    return np.asarray(ratios + goals, dtype=np.float32)
