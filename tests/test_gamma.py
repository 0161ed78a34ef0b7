"""Gamma index: known answers, masks, inputs, and agreement with pymedphys.gamma."""
import numpy as np
import pytest
import torch
from scipy import ndimage

from vmat_diffusion.gamma import (dilate_mask, gamma_index, gamma_pass_rate, gamma_search_shells,
                                  pass_rate_from_gamma, search_distances, shell_offsets_mm)

PTV_CROP = (40, 40, 32)  # voxels around the PTV70 centre of a real OpenKBP dose


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One numba (pymedphys) and one torch thread: the test machine's cores are shared.
    numba first: starting its OpenMP layer resets the thread count torch reads."""
    try:
        import numba
    except ImportError:
        numba = None
    numba_threads = numba.get_num_threads() if numba is not None else None
    if numba is not None:
        numba.set_num_threads(1)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    if numba is not None:
        numba.set_num_threads(numba_threads)
    torch.set_num_threads(torch_threads)


# --------------------------------------------------------------------------- doses


def smooth_dose_pair(shape, spacing_mm, seed):
    """Reference: a 70 Gy sphere with a sigmoid fall-off over a smooth random bath; evaluated: the
    reference shifted (< 2 mm), scaled (+-4 %) and with smooth noise. float32 Gy."""
    rng = np.random.default_rng(seed)
    axes = [np.arange(n) * s for n, s in zip(shape, spacing_mm)]
    grid = np.meshgrid(*axes, indexing="ij")
    centre = [rng.uniform(0.3, 0.7) * n * s for n, s in zip(shape, spacing_mm)]
    radius = np.sqrt(sum((x - c) ** 2 for x, c in zip(grid, centre)))
    bath = np.abs(ndimage.gaussian_filter(rng.standard_normal(shape), 3.0))
    reference = 70.0 / (1.0 + np.exp((radius - rng.uniform(10, 25)) / rng.uniform(1, 4))) + bath * rng.uniform(20, 200)
    shift = rng.uniform(-2.0, 2.0, 3) / np.asarray(spacing_mm)
    evaluated = (ndimage.shift(reference, shift, order=1, mode="nearest") * rng.uniform(0.96, 1.04)
                 + ndimage.gaussian_filter(rng.standard_normal(shape), 2.0) * rng.uniform(5, 40))
    return reference.astype(np.float32), np.clip(evaluated, 0.0, None).astype(np.float32)


def z_ramp(shape, spacing_mm, gy_per_mm, shift_mm=0.0, low_gy=10.0):
    """Dose rising linearly along axis 2 (exact under trilinear interpolation), moved by shift_mm."""
    z = np.arange(shape[2]) * spacing_mm[2]
    profile = low_gy + gy_per_mm * (z - shift_mm)
    return np.broadcast_to(profile, shape).astype(np.float32).copy()


def pymedphys_gamma(reference, evaluated, spacing_mm, origin_mm=100.0, **options):
    """pymedphys.gamma on the same grid; axes start at origin_mm (see test_axes_from_zero...)."""
    pymedphys = pytest.importorskip("pymedphys", reason="pymedphys is needed for the agreement tests")
    axes = tuple(origin_mm + np.arange(n) * s for n, s in zip(reference.shape, spacing_mm))
    return pymedphys.gamma(axes, reference, axes, evaluated, options.pop("dose_percent", 3.0),
                           options.pop("distance_mm", 3.0),
                           lower_percent_dose_cutoff=options.pop("cutoff_percent", 10.0),
                           max_gamma=options.pop("max_gamma", 1.1),
                           interp_fraction=options.pop("interp_fraction", 10),
                           local_gamma=options.pop("local", False), **options)


def pass_rate(gamma):
    values = gamma[~np.isnan(gamma)]
    return 100.0 * np.count_nonzero(values <= 1.0) / values.size


def assert_agrees(ours, theirs, max_pp=0.1, atol=1e-4):
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
    assert abs(pass_rate(ours) - pass_rate(theirs)) <= max_pp
    both = ~np.isnan(theirs)
    np.testing.assert_allclose(ours[both], theirs[both], atol=atol, rtol=0)


# --------------------------------------------------------------------------- search geometry


def test_search_radii_follow_pymedphys_float_accumulation():
    radii = [r for r, _ in search_distances(3.0, 10, 1.1)]
    assert radii[:4] == [0.0, 0.3, 0.6, 0.8999999999999999]
    assert radii[-3:] == [2.9999999999999996, 3.0, 3.3]  # 10 x 0.3 < 3, then 3.0 is searched too
    assert max(r for r, _ in search_distances(3.0, 10, 0.5)) <= 1.5  # max_gamma < 1: DTA never reached


def test_shell_points_equal_pymedphys_shells():
    createshells = pytest.importorskip("pymedphys._utilities.createshells", reason="needs pymedphys")
    for radius, step in [(0.0, 0.3), (0.3, 0.3), (1.2, 0.3), (3.3, 0.3), (2.0, 0.25)]:
        theirs = np.stack(createshells.calculate_coordinates_shell_3d(radius, step), axis=1)
        np.testing.assert_array_equal(shell_offsets_mm(radius, step), theirs)
    shells = gamma_search_shells(3.0, 10, 1.1)
    assert len(shells) == 13 and shells[0].offsets_mm.shape == (1, 3)
    for shell in shells:
        np.testing.assert_allclose(np.linalg.norm(shell.offsets_mm, axis=1), shell.distance_mm, atol=1e-12)


# --------------------------------------------------------------------------- known answers


def test_identical_doses_pass_everywhere_with_gamma_zero():
    reference, _ = smooth_dose_pair((20, 18, 16), (2.0, 2.5, 3.0), seed=0)
    gamma = gamma_index(reference, reference, (2.0, 2.5, 3.0))
    above = reference >= 0.1 * reference.max()
    np.testing.assert_array_equal(~np.isnan(gamma), above)
    assert np.all(gamma[above] == 0.0)
    assert gamma_pass_rate(reference, reference, (2.0, 2.5, 3.0)) == 100.0


def test_global_scale_fails_where_the_dose_difference_is_too_large():
    spacing = (3.0, 3.0, 3.0)
    reference = np.full((16, 16, 16), 60.0, dtype=np.float32)
    reference[:, :, :8] = 20.0  # a 20 Gy and a 60 Gy plateau; 3 % of the 60 Gy maximum is 1.8 Gy
    gamma = gamma_index(reference, 1.05 * reference, spacing)  # +3 Gy and +1 Gy
    high, low = gamma[:, :, 10:], gamma[:, :, :6]  # away from the step between the plateaus
    np.testing.assert_allclose(high, 1.1)  # 3 / 1.8 = 1.67, reported as max_gamma
    np.testing.assert_allclose(low, 1.0 / 1.8, rtol=1e-5)
    gamma = gamma_index(reference, 1.02 * reference, spacing)
    np.testing.assert_allclose(gamma[:, :, 10:], 1.2 / 1.8, rtol=1e-5)
    assert pass_rate_from_gamma(gamma) == 100.0


def test_shift_within_dta_passes_and_beyond_fails_in_a_steep_gradient():
    shape, spacing = (8, 8, 40), (2.0, 2.0, 1.0)
    reference = z_ramp(shape, spacing, gy_per_mm=1.5)  # 10 -> 68.5 Gy, 1.5 Gy/mm (2.2 %/mm)
    inner = slice(6, 34)  # voxels whose search sphere stays inside the grid along z
    gamma = gamma_index(reference, z_ramp(shape, spacing, 1.5, shift_mm=2.0), spacing)
    # The dose difference alone is 3 Gy (gamma 1.46). For a ramp of slope k (gamma units per mm)
    # moved by s, the continuous minimum is s k / sqrt(1 + (3 mm k)^2), a little below s / 3 mm;
    # the discrete search points (0.3 mm apart) land within 0.02 of it.
    k = 1.5 / (0.03 * reference.max())
    continuous = 2.0 * k / np.sqrt(1.0 + (3.0 * k) ** 2)
    assert np.all(gamma[:, :, inner] >= continuous - 1e-6)
    assert np.all(gamma[:, :, inner] <= min(continuous + 0.02, 2.0 / 3.0))
    gamma = gamma_index(reference, z_ramp(shape, spacing, 1.5, shift_mm=5.0), spacing)
    np.testing.assert_allclose(gamma[:, :, inner], 1.1)
    assert pass_rate_from_gamma(gamma[:, :, inner]) == 0.0


def test_voxels_below_the_cutoff_are_nan():
    reference, evaluated = smooth_dose_pair((18, 18, 18), (3.0, 3.0, 3.0), seed=1)
    for cutoff in (10.0, 50.0):
        gamma = gamma_index(reference, evaluated, 3.0, cutoff_percent=cutoff)
        np.testing.assert_array_equal(np.isnan(gamma), reference < cutoff / 100 * reference.max())
    gamma = gamma_index(reference, evaluated, 3.0, cutoff_percent=50.0, global_normalisation=2 * reference.max())
    np.testing.assert_array_equal(np.isnan(gamma), reference < reference.max())


def test_mask_restricts_evaluation_and_pass_rate():
    spacing = (2.0, 2.0, 3.0)
    reference, evaluated = smooth_dose_pair((22, 20, 16), spacing, seed=2)
    full = gamma_index(reference, evaluated, spacing)
    mask = np.zeros(reference.shape, dtype=bool)
    mask[5:15, 4:12, 3:13] = True
    masked = gamma_index(reference, evaluated, spacing, mask=mask)
    inside = mask & ~np.isnan(full)
    np.testing.assert_array_equal(~np.isnan(masked), inside)
    np.testing.assert_allclose(masked[inside], full[inside], atol=2e-5)  # float32 rounding only
    expected = 100.0 * np.count_nonzero(masked[inside] <= 1) / np.count_nonzero(inside)
    assert gamma_pass_rate(reference, evaluated, spacing, mask=mask) == pytest.approx(expected)
    assert pass_rate_from_gamma(full, mask=mask) == pytest.approx(expected, abs=100.0 / np.count_nonzero(inside))
    assert np.isnan(gamma_pass_rate(reference, evaluated, spacing, mask=np.zeros_like(mask)))


def test_dilate_mask_is_an_anisotropic_ellipsoid():
    mask = np.zeros((21, 21, 21), dtype=bool)
    mask[10, 10, 10] = True
    spacing = (1.0, 2.0, 2.5)
    grown = dilate_mask(mask, spacing, 5.0)
    index = np.indices(mask.shape) - 10
    distance = np.sqrt(sum((i * s) ** 2 for i, s in zip(index, spacing)))
    np.testing.assert_array_equal(grown, distance <= 5.0)
    assert np.array_equal(dilate_mask(mask, spacing, 0.0), mask)
    as_tensor = dilate_mask(torch.from_numpy(mask), spacing, 5.0)
    assert isinstance(as_tensor, torch.Tensor) and torch.equal(as_tensor, torch.from_numpy(grown))
    import vmat_diffusion  # the README's evaluation section uses it from the package
    assert vmat_diffusion.dilate_mask is dilate_mask and vmat_diffusion.pass_rate_from_gamma is pass_rate_from_gamma


# --------------------------------------------------------------------------- options and inputs


def test_torch_input_gives_the_same_tensor_result():
    reference, evaluated = smooth_dose_pair((16, 18, 14), (2.5, 2.0, 3.0), seed=3)
    expected = gamma_index(reference, evaluated, (2.5, 2.0, 3.0))
    result = gamma_index(torch.from_numpy(reference).double(), torch.from_numpy(evaluated), (2.5, 2.0, 3.0))
    assert isinstance(result, torch.Tensor) and result.dtype == torch.float32
    np.testing.assert_array_equal(result.numpy(), expected)
    assert expected.dtype == np.float32 and expected.shape == reference.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_tensors_give_the_cpu_result():
    reference, evaluated = smooth_dose_pair((20, 18, 16), (2.5, 2.0, 3.0), seed=5)
    expected = gamma_index(reference, evaluated, (2.5, 2.0, 3.0), local=True)
    result = gamma_index(torch.from_numpy(reference).cuda(), torch.from_numpy(evaluated).cuda(), (2.5, 2.0, 3.0),
                         local=True)
    assert result.is_cuda
    np.testing.assert_allclose(result.cpu().numpy(), expected, atol=2e-5)


@pytest.mark.parametrize("spacing, options", [
    ((2.5, 2.0, 3.0), {}),                                       # shells inside the 27 voxels
    ((1.0, 1.5, 1.0), {"local": True}),                          # shells in bigger boxes, per-voxel tolerance
    ((2.0, 2.0, 2.0), {"random_subset": 200, "chunk_size": 5000, "skip_once_passed": True}),
])
def test_the_device_path_on_the_cpu_gives_the_numpy_assisted_result(spacing, options, monkeypatch):
    # On CUDA the steps numpy does on the CPU (cutoff, flatnonzero, index arithmetic, gathers) run
    # as torch ops; run that path here, so a GPU is not the first place it ever runs.
    from vmat_diffusion import gamma as gamma_module
    reference, evaluated = smooth_dose_pair((18, 16, 14), spacing, seed=6)
    mask = np.zeros(reference.shape, dtype=bool)
    mask[2:-3, 1:, :-2] = True
    expected = gamma_index(reference, evaluated, spacing, mask=mask, **options)
    monkeypatch.setattr(gamma_module, "_numpy_helps", lambda tensor: False)
    result = gamma_index(torch.from_numpy(reference), torch.from_numpy(evaluated), spacing,
                         mask=torch.from_numpy(mask), **options)
    assert np.isnan(expected).sum() < expected.size
    np.testing.assert_array_equal(result.numpy(), expected)
    assert gamma_pass_rate(reference, evaluated, spacing, mask=mask, **options) == pytest.approx(
        pass_rate_from_gamma(expected))


def test_small_chunks_skip_once_passed_and_random_subset_are_consistent():
    spacing = (2.0, 2.0, 2.0)
    reference, evaluated = smooth_dose_pair((20, 20, 20), spacing, seed=4)
    full = gamma_index(reference, evaluated, spacing)
    # other chunkings only change float32 rounding inside the matmuls
    np.testing.assert_allclose(gamma_index(reference, evaluated, spacing, chunk_size=20000), full, atol=2e-5)
    quick = gamma_index(reference, evaluated, spacing, skip_once_passed=True)
    evaluated_voxels = ~np.isnan(full)
    np.testing.assert_array_equal(np.isnan(quick), ~evaluated_voxels)
    np.testing.assert_array_equal(quick[evaluated_voxels] < 1, full[evaluated_voxels] < 1)
    assert np.all(quick[evaluated_voxels] >= full[evaluated_voxels] - 2e-5)
    subset = gamma_index(reference, evaluated, spacing, random_subset=300, seed=1)
    chosen = ~np.isnan(subset)
    assert chosen.sum() == 300 and np.all(evaluated_voxels[chosen])
    np.testing.assert_allclose(subset[chosen], full[chosen], atol=2e-5)
    again = gamma_index(reference, evaluated, spacing, random_subset=300, seed=1)
    np.testing.assert_array_equal(np.isnan(again), ~chosen)


def test_pass_rate_counts_gamma_equal_to_one_as_pass():
    gamma = np.array([[[0.5, 1.0, np.float32(np.nextafter(np.float32(1), np.float32(2))), np.nan]]], dtype=np.float32)
    assert pass_rate_from_gamma(gamma) == pytest.approx(200.0 / 3.0)


@pytest.mark.parametrize("kwargs, error", [
    (dict(evaluated=np.zeros((4, 4, 5), np.float32)), "evaluated must have"),
    (dict(spacing_mm=(1.0, 2.0)), "spacing_mm"),
    (dict(spacing_mm=0.0), "spacing_mm"),
    (dict(dose_percent=-3.0), "dose_percent"),
    (dict(max_gamma=float("inf")), "max_gamma"),
    (dict(mask=np.ones((4, 4, 4), np.uint8)), "mask must be boolean"),
    (dict(reference=np.full((4, 4, 4), np.nan, np.float32)), "reference contains NaN"),
    (dict(reference=np.zeros((4, 4), np.float32)), "3-D dose"),
    (dict(random_subset=-1), "random_subset"),
])
def test_bad_input_raises_one_clear_error(kwargs, error):
    arguments = dict(reference=np.ones((4, 4, 4), np.float32), evaluated=np.ones((4, 4, 4), np.float32),
                     spacing_mm=2.0)
    arguments.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=error):
        gamma_index(**arguments)


# --------------------------------------------------------------------------- agreement with pymedphys


@pytest.mark.parametrize("seed, shape, spacing, options", [
    (10, (20, 18, 16), (2.5, 3.0, 2.0), {}),
    (11, (18, 20, 17), (4.7, 1.5, 2.5), dict(dose_percent=2.0, distance_mm=2.0, cutoff_percent=20.0)),
    (12, (17, 17, 20), (3.9, 3.9, 3.0), dict(max_gamma=2.0, interp_fraction=5)),
    (13, (16, 19, 18), (2.0, 2.0, 2.0), dict(global_normalisation=60.0, cutoff_percent=0.0)),
])
def test_global_gamma_agrees_with_pymedphys(seed, shape, spacing, options):
    reference, evaluated = smooth_dose_pair(shape, spacing, seed)
    theirs = pymedphys_gamma(reference, evaluated, spacing, **dict(options))
    ours = gamma_index(reference, evaluated, spacing, **options)
    assert_agrees(ours, theirs)


def test_local_gamma_agrees_with_pymedphys():
    spacing = (3.0, 2.5, 2.5)
    reference, evaluated = smooth_dose_pair((16, 16, 16), spacing, seed=14)
    theirs = pymedphys_gamma(reference, evaluated, spacing, local=True, cutoff_percent=20.0)
    ours = gamma_index(reference, evaluated, spacing, local=True, cutoff_percent=20.0)
    assert 20.0 < pass_rate(theirs) < 99.0
    assert_agrees(ours, theirs, max_pp=1.0)


def test_axes_from_zero_only_change_voxels_on_the_low_faces():
    """pymedphys with axes starting at 0 drops search points that are off a low face by rounding
    noise only (e.g. x = 3 mm * cos(3 pi / 2) = -5.5e-16 mm); we keep them, as with any other origin."""
    spacing = (2.5, 3.0, 2.0)
    reference, evaluated = smooth_dose_pair((18, 18, 18), spacing, seed=15)
    theirs = pymedphys_gamma(reference, evaluated, spacing, origin_mm=0.0)
    ours = gamma_index(reference, evaluated, spacing)
    interior = np.zeros(reference.shape, dtype=bool)
    interior[1:, 1:, 1:] = True
    assert_agrees(np.where(interior, ours, np.nan), np.where(interior, theirs, np.nan))
    assert abs(pass_rate(ours) - pass_rate(theirs)) <= 0.1


def test_phantom_dose_agrees_with_pymedphys():
    phantom = pytest.importorskip("vmat_diffusion.phantom", reason="phantom module not available")
    spacing = (8.0, 8.0, 8.0)
    reference = phantom.make_phantom("gamma", shape=(48, 48, 32), spacing_mm=spacing, seed=3).dose.astype(np.float32)
    rng = np.random.default_rng(3)
    evaluated = (ndimage.shift(reference, (0.2, -0.15, 0.1), order=1, mode="nearest") * 1.01
                 + ndimage.gaussian_filter(rng.standard_normal(reference.shape), 1.5) * 2.0 * (reference > 3))
    evaluated = np.clip(evaluated, 0, None).astype(np.float32)
    theirs = pymedphys_gamma(reference, evaluated, spacing)
    ours = gamma_index(reference, evaluated, spacing)
    assert 50.0 < pass_rate(theirs) < 100.0
    assert_agrees(ours, theirs)


def read_openkbp_dose(folder):
    """(dose (128, 128, 128) Gy, PTV70 mask, voxel size mm) in the file's axis order."""
    try:
        from vmat_diffusion.openkbp import read_openkbp_patient
    except ImportError:
        def sparse(name):
            table = np.loadtxt(folder / name, delimiter=",", skiprows=1, ndmin=2)
            volume = np.zeros(128 ** 3, dtype=np.float32)
            volume[table[:, 0].astype(np.int64)] = np.nan_to_num(table[:, 1], nan=1.0)
            return volume.reshape(128, 128, 128)
        return sparse("dose.csv"), sparse("PTV70.csv") > 0, tuple(np.loadtxt(folder / "voxel_dimensions.csv"))
    patient = read_openkbp_patient(folder)
    return patient.dose, patient.structures["PTV70"], tuple(patient.voxel_dimensions_mm)


PAIRS = [("blurred", False), ("scaled 1.04", False), ("shifted 1 voxel", False), ("blurred", True)]  # (name, local)


@pytest.mark.parametrize("patient", ["train-pats/pt_16", "validation-pats/pt_239"])
def test_real_openkbp_doses_agree_with_pymedphys(openkbp_dir, patient):
    """A crop around the PTV; pymedphys on a random subset of its voxels (it is slow), ours on all."""
    pymedphys = pytest.importorskip("pymedphys", reason="pymedphys is needed for the agreement tests")
    dose, ptv, spacing = read_openkbp_dose(openkbp_dir / patient)
    centre = np.round(np.argwhere(ptv).mean(axis=0)).astype(int)
    low = np.clip(centre - np.array(PTV_CROP) // 2, 0, np.array(dose.shape) - PTV_CROP)
    reference = np.ascontiguousarray(dose[tuple(slice(a, a + n) for a, n in zip(low, PTV_CROP))])
    axes = tuple(100.0 + np.arange(n) * s for n, s in zip(reference.shape, spacing))
    make = {
        "blurred": lambda: ndimage.gaussian_filter(reference, 1.0),
        "scaled 1.04": lambda: 1.04 * reference,
        "shifted 1 voxel": lambda: np.roll(reference, 1, axis=0),
    }
    for name, local in PAIRS:
        evaluated = make[name]().astype(np.float32)
        np.random.seed(0)  # pymedphys draws its random subset with the global numpy generator
        theirs = pymedphys.gamma(axes, reference, axes, evaluated, 3.0, 3.0, lower_percent_dose_cutoff=10.0,
                                 max_gamma=1.1, interp_fraction=10, random_subset=1500, local_gamma=local)
        chosen = ~np.isnan(theirs)
        ours = gamma_index(reference, evaluated, spacing, local=local)
        assert chosen.sum() == 1500 and np.all(~np.isnan(ours[chosen])), name
        assert 50.0 < pass_rate(theirs[chosen]) < 100.0, name
        assert abs(pass_rate(ours[chosen]) - pass_rate(theirs[chosen])) <= (1.0 if local else 0.1), name
        np.testing.assert_allclose(ours[chosen], theirs[chosen], atol=1e-4, rtol=0, err_msg=name)


def test_map_values_round_up_so_the_pass_test_is_the_float64_one():
    from vmat_diffusion.gamma import _round_up_to_float32
    values = torch.tensor([0.0, 1e-300, 0.5, 1.0 - 1e-12, 1.0, 1.0 + 1e-12, 1.1], dtype=torch.float64)
    rounded = _round_up_to_float32(values)
    assert rounded.dtype == torch.float32
    assert (rounded.double() >= values).all()
    assert ((rounded <= 1.0) == (values <= 1.0)).all()  # 1 + 1e-12 fails although float32(1 + 1e-12) == 1
    assert rounded[0] == 0.0 and rounded[2] == 0.5 and rounded[4] == 1.0  # exact values stay
    assert rounded[5] == torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))


@pytest.mark.parametrize("columns", [100, 5000])  # below and above ROW_GATHER_MIN_COLUMNS
def test_gathers_of_the_search_read_the_right_voxels(columns):
    """Both CPU gather paths (one numpy take; row by row from shifted views) give
    flat[first[:, None] + second[None, :]], with negative offsets and into a given ``out``."""
    from vmat_diffusion.gamma import ROW_GATHER_MIN_COLUMNS, _take
    assert 100 < ROW_GATHER_MIN_COLUMNS <= 5000
    generator = torch.Generator().manual_seed(columns)
    flat = torch.rand(20000, generator=generator)
    first = torch.tensor([-211, -1, 0, 5, 230], dtype=torch.int64)
    second = torch.randint(211, 20000 - 230, (columns,), generator=generator)
    expected = flat[first[:, None] + second[None, :]]
    assert torch.equal(_take(flat, first, second), expected)
    out = torch.full((6, columns), -1.0)
    _take(flat, first, second, out=out[:5])
    assert torch.equal(out[:5], expected) and bool((out[5] == -1.0).all())
    assert _take(flat, first[:0], second).shape == (0, columns)


def test_a_vanishing_dose_tolerance_gives_max_gamma_not_an_error():
    ones = np.ones((8, 8, 8), dtype=np.float32)
    gamma = gamma_index(ones, 1.5 * ones, 2.0, global_normalisation=1e-170, cutoff_percent=0.0)
    assert np.all(gamma == np.float32(1.1))
