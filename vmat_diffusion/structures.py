"""Structure lists (channel order) per treatment site and the left/right pairing rule."""
from __future__ import annotations

import re
from typing import Dict, List, Sequence, Tuple

PROSTATE_STRUCTURES: Tuple[str, ...] = (
    "PTV70", "PTV56", "Prostate", "Rectum", "Bladder", "Femur_L", "Femur_R", "Bowel",
)

# OpenKBP channel order, as the challenge organisers list them.
HEAD_NECK_STRUCTURES: Tuple[str, ...] = (
    "Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Esophagus",
    "Larynx", "Mandible", "PTV56", "PTV63", "PTV70",
)

SITE_STRUCTURES: Dict[str, Tuple[str, ...]] = {
    "prostate": PROSTATE_STRUCTURES,
    "head_neck": HEAD_NECK_STRUCTURES,
}

# Each pattern's groups are (prefix, side, suffix); the partner name swaps the side word.
_SIDE_SWAPS = {
    "L": "R", "R": "L", "Left": "Right", "Right": "Left", "LEFT": "RIGHT", "RIGHT": "LEFT",
    "left": "right", "right": "left", "Lt": "Rt", "Rt": "Lt",
}
_SIDE_PATTERNS = (
    re.compile(r"^(.*[_\- ])(L|R|Lt|Rt|Left|Right|LEFT|RIGHT|left|right)$"),   # Femur_L, Parotid Lt
    re.compile(r"^(L|R|Lt|Rt|Left|Right|LEFT|RIGHT|left|right)([_\- ].*)$"),   # L_Femur
    re.compile(r"^(Left|Right|LEFT|RIGHT|left|right)([A-Z].*)$"),               # LeftParotid
    re.compile(r"^(.*[a-z])(Left|Right|L|R)$"),                                  # FemurL, ParotidLeft
)


def lateral_partner(name: str) -> str | None:
    """The name of the other-side structure (``Femur_L`` -> ``Femur_R``), or None if unsided."""
    for i, pattern in enumerate(_SIDE_PATTERNS):
        m = pattern.match(name)
        if not m:
            continue
        if i in (0, 3):
            return m.group(1) + _SIDE_SWAPS[m.group(2)]
        return _SIDE_SWAPS[m.group(1)] + m.group(2)
    return None


def left_right_pairs(structures: Sequence[str]) -> List[Tuple[int, int]]:
    """Channel index pairs (i, j), i < j, of structures that are each other's lateral partner."""
    index = {name: i for i, name in enumerate(structures)}
    pairs = []
    for i, name in enumerate(structures):
        partner = lateral_partner(name)
        j = index.get(partner) if partner is not None else None
        if j is not None and i < j:
            pairs.append((i, j))
    return pairs


def lr_channel_permutation(structures: Sequence[str]) -> List[int]:
    """Channel order after a left-right flip: every lateral pair swapped, others unchanged."""
    perm = list(range(len(structures)))
    for i, j in left_right_pairs(structures):
        perm[i], perm[j] = j, i
    return perm
