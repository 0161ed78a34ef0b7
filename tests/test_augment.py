"""Augmentation: the left-right flip acts on X and swaps sided structures; translations use edge fill."""
import numpy as np
import pytest
import torch

from vmat_diffusion.augment import augment, flip_lr, translate
from vmat_diffusion.conventions import LR_AXIS
from vmat_diffusion.structures import HEAD_NECK_STRUCTURES, PROSTATE_STRUCTURES

P = (12, 10, 8)   # X, Y, Z
PROSTATE = list(PROSTATE_STRUCTURES)


def random_patch(n_structures=len(PROSTATE), seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"ct": torch.rand((1,) + P, generator=g), "masks_sdf": torch.rand((n_structures,) + P, generator=g),
            "dose": 70 * torch.rand((1,) + P, generator=g), "center": (30, 31, 32)}


def blob_patch(structures, channel, x, y, z):
    """Every SDF channel 'outside' (+1) except one voxel inside ``channel``; CT/dose mark the same voxel."""
    patch = {"ct": torch.zeros((1,) + P), "masks_sdf": torch.ones((len(structures),) + P),
             "dose": torch.zeros((1,) + P), "center": (0, 0, 0)}
    patch["masks_sdf"][channel, x, y, z] = -1.0
    patch["ct"][0, x, y, z] = 1.0
    patch["dose"][0, x, y, z] = 70.0
    return patch


def inside(sdf_channel):
    return [tuple(i) for i in torch.nonzero(sdf_channel < 0).tolist()]


def test_lr_axis_is_x():
    assert LR_AXIS == 0


def test_right_femur_ends_left_in_the_left_channel():
    right, left = PROSTATE.index("Femur_R"), PROSTATE.index("Femur_L")
    x, y, z = 2, 7, 1                      # small X = patient's right
    flipped = flip_lr(blob_patch(PROSTATE, right, x, y, z), PROSTATE)
    mirrored = (P[0] - 1 - x, y, z)        # large X = patient's left; Y and Z unchanged
    assert inside(flipped["masks_sdf"][left]) == [mirrored]
    assert inside(flipped["masks_sdf"][right]) == []
    assert tuple(torch.nonzero(flipped["ct"][0]).tolist()[0]) == mirrored
    assert tuple(torch.nonzero(flipped["dose"][0]).tolist()[0]) == mirrored
    assert flipped["flipped"] is True


def test_unpaired_channels_keep_their_index():
    for name in ("PTV70", "Rectum", "Bowel"):
        c = PROSTATE.index(name)
        flipped = flip_lr(blob_patch(PROSTATE, c, 1, 2, 3), PROSTATE)
        assert inside(flipped["masks_sdf"][c]) == [(P[0] - 2, 2, 3)]


def test_flip_leaves_y_and_z_alone():
    patch = random_patch()
    flipped = flip_lr(patch, PROSTATE)
    expected_ct = patch["ct"].numpy()[:, ::-1, :, :]
    np.testing.assert_array_equal(flipped["ct"].numpy(), expected_ct)
    np.testing.assert_array_equal(flipped["dose"].numpy(), patch["dose"].numpy()[:, ::-1])
    c = PROSTATE.index("Bladder")
    np.testing.assert_array_equal(flipped["masks_sdf"][c].numpy(), patch["masks_sdf"][c].numpy()[::-1])


def test_flip_is_an_involution():
    patch = random_patch()
    twice = flip_lr(flip_lr(patch, PROSTATE), PROSTATE)
    for key in ("ct", "masks_sdf", "dose"):
        assert torch.equal(twice[key], patch[key])
    assert twice["flipped"] is False and twice["center"] == patch["center"]


def test_head_and_neck_parotids_are_swapped():
    names = list(HEAD_NECK_STRUCTURES)
    right, left = names.index("RightParotid"), names.index("LeftParotid")
    flipped = flip_lr(blob_patch(names, right, 0, 4, 5), names)
    assert inside(flipped["masks_sdf"][left]) == [(P[0] - 1, 4, 5)]
    assert inside(flipped["masks_sdf"][right]) == []
    cord = names.index("SpinalCord")
    assert inside(flip_lr(blob_patch(names, cord, 3, 4, 5), names)["masks_sdf"][cord]) == [(P[0] - 4, 4, 5)]


def edge_shifted(array, shift):
    """Reference translation of a (C, X, Y, Z) array: content moves by +shift, edges replicated."""
    pad = max(abs(s) for s in shift)
    padded = np.pad(array, [(0, 0)] + [(pad, pad)] * 3, mode="edge")
    index = tuple(slice(pad - s, pad - s + n) for s, n in zip(shift, array.shape[1:]))
    return padded[(slice(None), *index)]


@pytest.mark.parametrize("shift", [(2, -3, 1), (0, 0, -5), (-11, 9, 7), (20, -30, 0)])
def test_translate_with_edge_fill(shift):
    patch = random_patch()
    moved = translate(patch, shift)
    for key in ("ct", "masks_sdf", "dose"):
        np.testing.assert_array_equal(moved[key].numpy(), edge_shifted(patch[key].numpy(), shift))
    assert moved["shift"] == shift and moved["center"] == patch["center"]


def test_augment_translation_is_one_vector_for_all_volumes():
    patch = random_patch()
    seen = set()
    for seed in range(30):
        out = augment(patch, PROSTATE, np.random.default_rng(seed), flip_p=0.0, translate_p=1.0, max_shift=3)
        assert all(-3 <= s <= 3 for s in out["shift"])
        seen.update(out["shift"])
        for key in ("ct", "masks_sdf", "dose"):
            np.testing.assert_array_equal(out[key].numpy(), edge_shifted(patch[key].numpy(), out["shift"]))
    assert seen == set(range(-3, 4))


def test_zero_probabilities_are_the_identity():
    patch = random_patch()
    out = augment(patch, PROSTATE, np.random.default_rng(0), flip_p=0.0, translate_p=0.0)
    for key in ("ct", "masks_sdf", "dose"):
        assert torch.equal(out[key], patch[key])
    assert out["flipped"] is False and out["shift"] == (0, 0, 0) and out["center"] == patch["center"]
    assert out is not patch and "flipped" not in patch     # a new dict; the input is untouched


def test_certain_flip_equals_flip_lr():
    patch = random_patch()
    out = augment(patch, PROSTATE, np.random.default_rng(1), flip_p=1.0, translate_p=0.0)
    reference = flip_lr(patch, PROSTATE)
    for key in ("ct", "masks_sdf", "dose"):
        assert torch.equal(out[key], reference[key])


def test_probabilities_and_seeding():
    patch = random_patch()
    rng = np.random.default_rng(2)
    outs = [augment(patch, PROSTATE, rng) for _ in range(400)]
    assert abs(np.mean([o["flipped"] for o in outs]) - 0.5) < 0.08
    assert abs(np.mean([o["shift"] != (0, 0, 0) for o in outs]) - 0.5) < 0.08
    assert max(max(abs(s) for s in o["shift"]) for o in outs) == 16
    a = augment(patch, PROSTATE, np.random.default_rng(5), flip_p=0.5, translate_p=1.0)
    b = augment(patch, PROSTATE, np.random.default_rng(5), flip_p=0.5, translate_p=1.0)
    assert a["shift"] == b["shift"] and a["flipped"] == b["flipped"] and torch.equal(a["dose"], b["dose"])


def test_bad_input():
    patch = random_patch()
    with pytest.raises(ValueError, match="channels"):
        flip_lr(patch, PROSTATE[:-1])
    with pytest.raises(ValueError, match="flip_p"):
        augment(patch, PROSTATE, 0, flip_p=1.5)
    with pytest.raises(ValueError, match="max_shift"):
        augment(patch, PROSTATE, 0, max_shift=-1)
    with pytest.raises(ValueError, match="dose"):
        flip_lr({**patch, "dose": torch.zeros(P)}, PROSTATE)


def test_other_volumes_move_with_the_dose():
    structures = ["PTV70", "Femur_L", "Femur_R"]
    g = torch.Generator().manual_seed(0)
    patch = {"ct": torch.rand(1, 6, 5, 4, generator=g), "masks_sdf": torch.rand(3, 6, 5, 4, generator=g),
             "dose": torch.rand(1, 6, 5, 4, generator=g), "label": "keep me", "small": torch.rand(1, 2, 2, 2)}
    patch["possible_dose_mask"] = (patch["dose"] > 0.5).float()
    flipped = flip_lr(patch, structures)
    np.testing.assert_array_equal(flipped["possible_dose_mask"].numpy(), (flipped["dose"] > 0.5).float().numpy())
    moved = translate(patch, (2, -1, 1))
    np.testing.assert_array_equal(moved["possible_dose_mask"].numpy(), (moved["dose"] > 0.5).float().numpy())
    assert moved["label"] == "keep me" and moved["small"] is patch["small"]
