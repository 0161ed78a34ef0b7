"""Patch sampler: shapes, dose-biased centres, padding at borders, memory-mapped sources."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vmat_diffusion.case import Case
from vmat_diffusion.conventions import CT_AIR, SDF_ABSENT, SDF_OUTSIDE
from vmat_diffusion.patches import PatchSampler, dose_biased_centers, extract_patch

SHAPE = (40, 36, 30)
RX = 70.0


def make_case(dose=None, case_id="c0", seed=0):
    """A random case: 3 structures, the last one absent (SDF_ABSENT everywhere)."""
    rng = np.random.default_rng(seed)
    sdf = rng.uniform(-1, 1, (3,) + SHAPE).astype(np.float32)
    sdf[2] = SDF_ABSENT
    if dose is None:
        dose = rng.uniform(0, 75, SHAPE).astype(np.float32)
    return Case(ct=rng.uniform(0.1, 0.9, SHAPE).astype(np.float32), dose=dose.astype(np.float32),
                masks_sdf=sdf, constraints=np.zeros(13, np.float32),
                metadata={"case_id": case_id, "structures": ["PTV70", "Rectum", "Bowel"],
                          "spacing_mm": [4.0, 4.0, 4.0], "rx_dose_gy": RX})


def tiny_hot_case(hot_slices=(slice(20, 22), slice(10, 12), slice(5, 7)), case_id="hot"):
    """Dose above 10 % of Rx only in a small box (8 voxels of 43200)."""
    dose = np.zeros(SHAPE, np.float32)
    dose[hot_slices] = 60.0
    return make_case(dose=dose, case_id=case_id)


def padded_reference(array, center, size, fill):
    """Reference patch: pad the whole array by the patch size, then slice."""
    pad = max(size) + max(abs(c) for c in center)
    widths = [(0, 0)] * (array.ndim - 3) + [(pad, pad)] * 3
    padded = np.pad(array, widths, constant_values=fill)
    index = tuple(slice(c - p // 2 + pad, c - p // 2 + pad + p) for c, p in zip(center, size))
    return padded[(Ellipsis, *index)]


def test_patch_shapes_and_dtypes():
    case = make_case()
    sampler = PatchSampler(patch_size=16, patches_per_volume=3, rng=0)
    patches = sampler.sample(case)
    assert len(patches) == 3
    for patch in patches:
        assert patch["ct"].shape == (1, 16, 16, 16) and patch["ct"].dtype == torch.float32
        assert patch["masks_sdf"].shape == (3, 16, 16, 16) and patch["masks_sdf"].dtype == torch.float32
        assert patch["dose"].shape == (1, 16, 16, 16) and patch["dose"].dtype == torch.float32
        assert len(patch["center"]) == 3 and all(isinstance(c, int) for c in patch["center"])
        assert all(0 <= c < n for c, n in zip(patch["center"], SHAPE))
    anisotropic = PatchSampler(patch_size=(16, 12, 8), patches_per_volume=1, rng=0).sample(case)[0]
    assert anisotropic["masks_sdf"].shape == (3, 16, 12, 8)


def test_patch_content_matches_the_case():
    case = make_case()
    for patch in PatchSampler(patch_size=(10, 12, 8), patches_per_volume=5, rng=1).sample(case):
        c = patch["center"]
        for key, fill in (("ct", CT_AIR), ("dose", 0.0)):
            ref = padded_reference(getattr(case, key), c, (10, 12, 8), fill)
            np.testing.assert_array_equal(patch[key][0].numpy(), ref)


def test_fully_biased_centres_have_dose():
    case = make_case()
    sampler = PatchSampler(patch_size=8, patches_per_volume=50, dose_biased_fraction=1.0, dose_threshold=0.5, rng=2)
    for patch in sampler.sample(case):
        assert case.dose[patch["center"]] > 0.5 * RX
        assert patch["dose_biased"] is True


def test_half_biased_fraction():
    case = tiny_hot_case()
    hot = case.dose > 0.1 * RX
    sampler = PatchSampler(patch_size=8, patches_per_volume=100, dose_biased_fraction=0.5, rng=3)
    patches = [p for _ in range(20) for p in sampler.sample(case)]
    in_hot = np.array([hot[p["center"]] for p in patches])
    flags = np.array([p["dose_biased"] for p in patches])
    assert abs(in_hot.mean() - 0.5) < 0.05          # 2000 draws: sd 0.011
    np.testing.assert_array_equal(in_hot, flags)    # uniform centres (almost) never hit 8 of 43200 voxels
    unbiased = PatchSampler(patch_size=8, patches_per_volume=200, dose_biased_fraction=0.0, rng=3).sample(case)
    assert sum(hot[p["center"]] for p in unbiased) <= 2


def test_uniform_centres_cover_the_volume():
    case = make_case()
    sampler = PatchSampler(patch_size=8, patches_per_volume=2000, dose_biased_fraction=0.0, rng=4)
    centers = np.array([p["center"] for p in sampler.sample(case)])
    assert centers.min(axis=0).tolist() == [0, 0, 0]
    assert centers.max(axis=0).tolist() == [n - 1 for n in SHAPE]
    np.testing.assert_allclose(centers.mean(axis=0), [(n - 1) / 2 for n in SHAPE], atol=1.5)


def test_no_qualifying_voxel_falls_back_to_uniform():
    case = make_case(dose=np.zeros(SHAPE, np.float32))
    patches = PatchSampler(patch_size=8, patches_per_volume=20, dose_biased_fraction=1.0, rng=5).sample(case)
    assert len({p["center"] for p in patches}) > 10
    assert not any(p["dose_biased"] for p in patches)


def test_corner_patch_is_padded():
    case = tiny_hot_case(hot_slices=(slice(0, 1), slice(0, 1), slice(0, 1)))
    patch = PatchSampler(patch_size=10, patches_per_volume=1, dose_biased_fraction=1.0, rng=6).sample(case)[0]
    assert patch["center"] == (0, 0, 0)
    # The patch covers [-5, 5) per axis: indices 0..4 are padding, 5..9 hold voxels 0..4.
    inside = (slice(5, 10),) * 3
    ct, sdf, dose = patch["ct"].numpy(), patch["masks_sdf"].numpy(), patch["dose"].numpy()
    np.testing.assert_array_equal(ct[(0, *inside)], case.ct[:5, :5, :5])
    np.testing.assert_array_equal(sdf[(slice(None), *inside)], case.masks_sdf[:, :5, :5, :5])
    np.testing.assert_array_equal(dose[(0, *inside)], case.dose[:5, :5, :5])
    outside = np.ones((10, 10, 10), bool)
    outside[inside] = False
    assert np.all(ct[0][outside] == CT_AIR) and np.all(dose[0][outside] == 0.0)
    assert np.all(sdf[0][outside] == SDF_OUTSIDE) and np.all(sdf[1][outside] == SDF_OUTSIDE)
    assert np.all(sdf[2] == SDF_ABSENT)   # an absent structure stays "absent" in the padding


@pytest.mark.parametrize("center", [(20, 18, 15), (0, 0, 0), (39, 35, 29), (-3, 40, 12), (100, 100, 100), (5, -50, 29)])
@pytest.mark.parametrize("size", [7, (8, 5, 12)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_extract_patch_equals_padded_slicing(center, size, threads):
    array = np.random.default_rng(0).normal(size=(5,) + SHAPE).astype(np.float32)
    size3 = (size,) * 3 if isinstance(size, int) else size
    np.testing.assert_array_equal(extract_patch(array, center, size, 9.0, threads=threads),
                                  padded_reference(array, center, size3, 9.0))
    np.testing.assert_array_equal(extract_patch(array[1], center, size, -1.0, threads=threads),
                                  padded_reference(array[1], center, size3, -1.0))


def test_extract_patch_interior_is_a_slice_and_a_copy():
    array = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    patch = extract_patch(array, (10, 11, 12), 6, 0.0)
    np.testing.assert_array_equal(patch, array[7:13, 8:14, 9:15])
    patch[0, 0, 0] = -1
    assert array[7, 8, 9] != -1
    per_channel = extract_patch(np.zeros((2,) + SHAPE, np.float32), (0, 0, 0), 4, [1.0, 2.0])
    assert per_channel[0, 0, 0, 0] == 1.0 and per_channel[1, 0, 0, 0] == 2.0 and per_channel[1, 3, 3, 3] == 0.0


def test_extract_patch_bad_input():
    with pytest.raises(ValueError, match="center"):
        extract_patch(np.zeros(SHAPE), (1, 2), 4, 0.0)
    with pytest.raises(ValueError, match="size"):
        extract_patch(np.zeros(SHAPE), (1, 2, 3), 0, 0.0)
    with pytest.raises(ValueError, match="array"):
        extract_patch(np.zeros((4, 4)), (1, 2, 3), 2, 0.0)


def test_dose_biased_centers():
    dose = np.zeros(SHAPE, np.float32)
    dose[3, 4, 5] = 8.0
    dose[6, 7, 8] = 6.0
    np.testing.assert_array_equal(dose_biased_centers(dose, 70.0, 0.1), [[3, 4, 5]])
    assert dose_biased_centers(dose, 70.0, 0.05).shape == (2, 3)
    assert dose_biased_centers(np.zeros(SHAPE), 70.0, 0.1).shape == (0, 3)


def test_seeded_and_fresh_every_call():
    case = make_case()
    a = PatchSampler(patch_size=8, patches_per_volume=4, rng=7)
    b = PatchSampler(patch_size=8, patches_per_volume=4, rng=np.random.default_rng(7))
    first_a, first_b = a.sample(case), b.sample(case)
    for pa, pb in zip(first_a, first_b):
        assert pa["center"] == pb["center"] and torch.equal(pa["ct"], pb["ct"])
    second = a.sample(case)
    assert [p["center"] for p in second] != [p["center"] for p in first_a]


def test_centres_are_cached_per_case():
    sampler = PatchSampler(patch_size=8, max_cached_cases=1, rng=0)
    case = make_case(case_id="a")
    first = sampler.high_dose_centers(case)
    assert sampler.high_dose_centers(case) is first
    sampler.high_dose_centers(make_case(case_id="b"))
    assert sampler.high_dose_centers(case) is not first    # evicted (least recently used)


def test_precomputed_centres_are_used():
    case = make_case()
    case.precomputed_centers = lambda threshold: np.array([[5, 6, 7]]) if threshold == 0.2 else None
    sampler = PatchSampler(patch_size=8, patches_per_volume=10, dose_biased_fraction=1.0, dose_threshold=0.2, rng=0)
    assert all(p["center"] == (5, 6, 7) for p in sampler.sample(case))


class SpyArray:
    """Wraps an array and records the size of every read, to prove no whole-volume reads."""

    def __init__(self, array):
        self.array, self.read_sizes = array, []
        self.shape, self.ndim, self.dtype = array.shape, array.ndim, array.dtype

    def __getitem__(self, key):
        out = self.array[key]
        self.read_sizes.append(np.size(out))
        return out


def test_memmap_case_reads_only_patches(tmp_path):
    case = make_case()
    arrays = {}
    for key in ("ct", "dose", "masks_sdf"):
        np.save(tmp_path / f"{key}.npy", getattr(case, key))
        arrays[key] = np.load(tmp_path / f"{key}.npy", mmap_mode="r")
    assert isinstance(arrays["ct"], np.memmap)
    mapped = SimpleNamespace(ct=SpyArray(arrays["ct"]), masks_sdf=SpyArray(arrays["masks_sdf"]),
                             dose=arrays["dose"], case_id="c0", rx_dose_gy=RX, metadata=case.metadata)
    from_memmap = PatchSampler(patch_size=12, patches_per_volume=6, rng=8).sample(mapped)
    from_memory = PatchSampler(patch_size=12, patches_per_volume=6, rng=8).sample(case)
    for pm, pc in zip(from_memmap, from_memory):
        assert pm["center"] == pc["center"]
        for key in ("ct", "masks_sdf", "dose"):
            assert torch.equal(pm[key], pc[key])
    assert max(mapped.ct.read_sizes) <= 12 ** 3
    assert max(mapped.masks_sdf.read_sizes) <= 3 * 12 ** 3


def test_case_without_dose_is_refused():
    case = make_case()
    case.dose = None
    with pytest.raises(ValueError, match="no dose"):
        PatchSampler(patch_size=8).sample(case)


@pytest.mark.parametrize("kwargs", [
    {"patch_size": 0}, {"patch_size": (8, 8)}, {"patches_per_volume": 0}, {"dose_biased_fraction": 1.5},
    {"dose_threshold": -0.1}, {"read_threads": 0},
])
def test_bad_sampler_arguments(kwargs):
    with pytest.raises(ValueError):
        PatchSampler(**kwargs)
    with pytest.raises(TypeError, match="rng"):
        PatchSampler(rng="seed")


def test_extras_are_cut_out_with_zero_outside_and_named_when_missing():
    case = make_case()
    mask = np.zeros(SHAPE, np.uint8)
    mask[5:30, 4:20, 3:25] = 1
    case.extras["possible_dose_mask"] = mask
    sampler = PatchSampler(patch_size=12, patches_per_volume=1, rng=0, extras=("possible_dose_mask",))
    patch = sampler._extract(case, (2, 30, 10), biased=False)
    expected = padded_reference(mask.astype(np.float32), (2, 30, 10), (12, 12, 12), 0.0)
    assert patch["possible_dose_mask"].shape == (1, 12, 12, 12)
    np.testing.assert_array_equal(patch["possible_dose_mask"][0].numpy(), expected)
    assert sampler.sample(case)[0]["possible_dose_mask"].dtype == torch.float32
    with pytest.raises(ValueError, match="case c1: extra 'body' must be a volume of the CT's shape"):
        PatchSampler(patch_size=8, extras=("body",)).sample(make_case(case_id="c1"))
    with pytest.raises(ValueError, match="extras must not be named like the patch entries"):
        PatchSampler(extras=("dose",))
