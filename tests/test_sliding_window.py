"""Tests of sliding-window inference and whole-volume diffusion sampling (tiny volumes)."""
import math

import pytest
import torch
import torch.nn.functional as F

from vmat_diffusion.schedule import NoiseSchedule
from vmat_diffusion.sliding_window import (
    gaussian_importance_map,
    predict_full_volume,
    sliding_window_inference,
    window_starts,
)
from vmat_diffusion.unet import SimpleUNet3D

# (spatial shape, patch_size, overlap): isotropic, anisotropic, shorter than the patch on one
# axis, shorter on every axis, exactly one patch.
GEOMETRIES = [
    ((20, 24, 28), 8, 2),
    ((20, 24, 28), (8, 12, 16), (2, 3, 4)),
    ((20, 24, 7), (8, 12, 16), 4),
    ((5, 6, 7), 8, 3),
    ((16, 16, 16), 16, 4),
]


def random_volume(batch, channels, spatial, seed=0):
    return torch.randn((batch, channels) + tuple(spatial), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ window grid and weights
@pytest.mark.parametrize("size, patch, overlap", [(28, 8, 2), (20, 8, 2), (100, 16, 5), (17, 16, 0), (31, 10, 9)])
def test_window_starts_cover_the_axis_from_0_to_the_border(size, patch, overlap):
    starts = window_starts(size, patch, overlap)
    assert starts[0] == 0
    assert starts[-1] == size - patch
    assert len(starts) == math.ceil((size - patch) / (patch - overlap)) + 1
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert all(0 < gap <= patch - overlap for gap in gaps)  # overlap at least as requested
    assert max(gaps) - min(gaps) <= 1  # evenly spaced


@pytest.mark.parametrize("size", [1, 7, 16])
def test_window_starts_of_a_short_axis_is_one_window(size):
    assert window_starts(size, 16, 4) == [0]


@pytest.mark.parametrize("overlap", [16, 20, -1])
def test_window_starts_rejects_bad_overlap(overlap):
    with pytest.raises(ValueError, match="overlap"):
        window_starts(40, 16, overlap)


def test_gaussian_importance_map_shape_peak_floor_and_symmetry():
    weights = gaussian_importance_map((8, 12, 16), sigma_scale=0.125, floor=1e-3)
    assert weights.shape == (8, 12, 16) and weights.dtype == torch.float32
    assert weights.max().item() == pytest.approx(1.0, abs=1e-6)
    # separable: the outer product of its central lines
    lines = weights[:, 6, 8] / weights[4, 6, 8], weights[4, :, 8] / weights[4, 6, 8], weights[4, 6, :]
    outer = lines[0][:, None, None] * lines[1][None, :, None] * lines[2][None, None, :]
    torch.testing.assert_close(weights, outer, rtol=1e-6, atol=0)
    narrow = gaussian_importance_map((8, 12, 16), sigma_scale=0.05, floor=1e-3)
    assert narrow.min().item() == pytest.approx(1e-9)  # each axis's profile is clamped at the floor
    assert narrow[4, 6, 0].item() == pytest.approx(1e-3, rel=0.2)  # a face's centre: one axis at the floor
    for dim in range(3):
        assert torch.equal(weights, weights.flip(dim))
    assert weights[4, 6, 8] > weights[0, 6, 8] > weights[0, 0, 8]
    wide = gaussian_importance_map(8, sigma_scale=10.0, floor=1e-3)
    assert wide.min().item() > 0.99  # large sigma -> nearly uniform weights


def test_gaussian_importance_map_rejects_bad_sigma():
    with pytest.raises(ValueError, match="sigma_scale"):
        gaussian_importance_map(8, sigma_scale=0.0)


def reference_blend(volume, predictor, patch, overlap, sigma_scale=0.125):
    """Textbook blending: sum of Gaussian-weighted window outputs over the summed weights."""
    weights = gaussian_importance_map(patch, sigma_scale)
    starts = [window_starts(size, p, o) for size, p, o in zip(volume.shape[2:], patch, overlap)]
    numerator = torch.zeros(volume.shape, dtype=torch.float64)
    denominator = torch.zeros(volume.shape[2:], dtype=torch.float64)
    for x in starts[0]:
        for y in starts[1]:
            for z in starts[2]:
                box = (slice(x, x + patch[0]), slice(y, y + patch[1]), slice(z, z + patch[2]))
                numerator[(slice(None), slice(None)) + box] += predictor(volume[(slice(None), slice(None)) + box]) * weights
                denominator[box] += weights
    return numerator / denominator


def test_blend_is_the_gaussian_weighted_mean_of_the_windows():
    # Each window returns its own constant plus a function of its position in the window, so
    # every overlap mixes different values and only the right weights give the reference.
    volume = random_volume(1, 1, (22, 19, 26), seed=3)
    patch, overlap = (10, 8, 12), (3, 2, 5)
    local = torch.linspace(-1, 1, 10)[:, None, None] * torch.linspace(0, 2, 8)[None, :, None] * torch.ones(12)

    def predictor_factory():
        calls = []

        def predictor(windows):
            calls.append(len(calls))
            return windows * 0.5 + 10.0 * len(calls) + local
        return predictor

    result = sliding_window_inference(volume, predictor_factory(), patch_size=patch, overlap=overlap,
                                      sigma_scale=0.2)
    expected = reference_blend(volume, predictor_factory(), patch, overlap, sigma_scale=0.2)
    torch.testing.assert_close(result, expected.to(torch.float32), rtol=2e-6, atol=2e-5)
    # the windows really differ: a plain mean would be off by whole units somewhere
    plain = reference_blend(volume, predictor_factory(), patch, overlap, sigma_scale=1e3)
    assert (plain - expected).abs().max() > 1.0


def test_window_edges_count_least_even_where_all_weights_are_small():
    # A convolution zero-pads at every window edge, so window edges are wrong by up to ~1 here;
    # blending must keep them out. A 3-D Gaussian clamped at 1e-3 (MONAI's map) is flat below
    # 1e-3, i.e. on most of a window's corner regions, and lets edges in at full weight there:
    # measured max error 0.41 for this case, against 0.021 with per-axis floors.
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(1, 1, 5, padding=2, bias=False)
    torch.nn.init.uniform_(conv.weight, 0.0, 0.02)
    volume = torch.rand(1, 1, 44, 40, 36, generator=torch.Generator().manual_seed(0)) + 1.0
    with torch.no_grad():
        whole = conv(volume)  # what the windows approximate (it pads only at the volume's border)
        blended = sliding_window_inference(volume, conv, patch_size=16, overlap=6)
    assert (blended - whole).abs().max() < 0.05


# ------------------------------------------------------------------ exact identities
@pytest.mark.parametrize("spatial, patch, overlap", GEOMETRIES)
@pytest.mark.parametrize("batch_size", [1, 3])
def test_plus_one_predictor_gives_input_plus_one(spatial, patch, overlap, batch_size):
    volume = random_volume(2, 2, spatial)
    result = sliding_window_inference(volume, lambda w: w + 1, patch_size=patch, overlap=overlap,
                                      batch_size=batch_size)
    assert result.shape == volume.shape and result.dtype == torch.float32
    torch.testing.assert_close(result, volume + 1, rtol=0, atol=2e-6)


@pytest.mark.parametrize("spatial, patch, overlap", GEOMETRIES)
def test_linear_and_pointwise_predictors_are_reproduced_exactly(spatial, patch, overlap):
    volume = random_volume(1, 1, spatial, seed=1)
    doubled = sliding_window_inference(volume, lambda w: 2 * w, patch_size=patch, overlap=overlap, batch_size=2)
    torch.testing.assert_close(doubled, 2 * volume, rtol=1e-6, atol=1e-6)
    sine = sliding_window_inference(volume, torch.sin, patch_size=patch, overlap=overlap)
    torch.testing.assert_close(sine, torch.sin(volume), rtol=1e-6, atol=1e-6)


def test_constant_predictor_with_other_channel_count_gives_ones_everywhere():
    volume = random_volume(2, 2, (20, 24, 28))
    result = sliding_window_inference(
        volume, lambda w: torch.ones(w.shape[0], 3, *w.shape[2:]), patch_size=(8, 12, 16), overlap=4, batch_size=3
    )
    assert result.shape == (2, 3, 20, 24, 28)
    torch.testing.assert_close(result, torch.ones_like(result), rtol=0, atol=1e-6)


@pytest.mark.parametrize("spatial, patch, overlap", GEOMETRIES)
def test_every_voxel_is_seen_by_at_least_one_window(spatial, patch, overlap):
    n_voxels = math.prod(spatial)
    voxel_ids = torch.arange(n_voxels, dtype=torch.float32).reshape(1, 1, *spatial)
    seen = torch.zeros(n_voxels, dtype=torch.long)

    def record(windows):
        seen.index_add_(0, windows.flatten().long().unique(), torch.ones_like(windows.flatten().long().unique()))
        return windows

    sliding_window_inference(voxel_ids, record, patch_size=patch, overlap=overlap)
    assert seen.min().item() >= 1


def test_short_axis_is_replicate_padded_and_centred():
    volume = random_volume(1, 1, (8, 8, 5))
    windows = []
    sliding_window_inference(volume, lambda w: windows.append(w.clone()) or w, patch_size=8, overlap=2)
    (window,) = windows
    # 3 voxels missing along Z: 1 before, 2 after, copies of the edge slices
    torch.testing.assert_close(window[0, :, :, :, 1:6], volume[0])
    torch.testing.assert_close(window[0, :, :, :, 0], volume[0, :, :, :, 0])
    torch.testing.assert_close(window[0, :, :, :, 6], volume[0, :, :, :, -1])
    torch.testing.assert_close(window[0, :, :, :, 7], volume[0, :, :, :, -1])


def test_volume_args_pass_each_windows_own_rows():
    volume = random_volume(3, 1, (12, 12, 12))
    offsets = torch.tensor([10.0, 20.0, 30.0])
    result = sliding_window_inference(volume, lambda w, off: w + off[:, None, None, None, None],
                                      patch_size=8, overlap=2, batch_size=4, volume_args=(offsets,))
    torch.testing.assert_close(result, volume + offsets[:, None, None, None, None], rtol=1e-6, atol=1e-6)


# (12, 14, 5) / 8: every window padded along Z (a copy); batch 3: stacked copies.
@pytest.mark.parametrize("spatial,batch_size", [((12, 14, 5), 1), ((12, 14, 5), 3), ((12, 12, 12), 3)])
def test_in_place_predictor_on_copied_windows_changes_nothing(spatial, batch_size):
    volume = random_volume(1, 2, spatial)
    original = volume.clone()
    result = sliding_window_inference(volume, lambda w: w.mul_(3), patch_size=8, overlap=2, batch_size=batch_size)
    assert torch.equal(volume, original)
    expected = sliding_window_inference(volume, lambda w: w * 3, patch_size=8, overlap=2, batch_size=batch_size)
    assert torch.equal(result, expected)


def test_in_place_predictor_on_a_view_of_the_volume_is_an_error():
    # (12, 12, 12) / 8, batch 1: unpadded windows are views of the volume (no copy)
    volume = random_volume(1, 2, (12, 12, 12))
    with pytest.raises(ValueError, match="predictor: it modified its input window in place"):
        sliding_window_inference(volume, lambda w: w.mul_(3), patch_size=8, overlap=2)
    with torch.inference_mode():  # no version counter there: windows are copied instead
        frozen = random_volume(1, 2, (12, 12, 12))
        result = sliding_window_inference(frozen, lambda w: w.mul_(3), patch_size=8, overlap=2)
        assert torch.equal(frozen, random_volume(1, 2, (12, 12, 12)))
        torch.testing.assert_close(result, frozen * 3)


# ------------------------------------------------------------------ precision
def test_bf16_predictor_is_accumulated_in_float32():
    volume = random_volume(1, 1, (20, 24, 28))
    conv = torch.nn.Conv3d(1, 1, 3, padding=1)

    def predictor(windows):
        return conv(windows)

    with torch.no_grad():
        reference = sliding_window_inference(volume, predictor, patch_size=8, overlap=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low_precision = sliding_window_inference(volume, predictor, patch_size=8, overlap=2)
    assert low_precision.dtype == torch.float32
    torch.testing.assert_close(low_precision, reference, rtol=0.05, atol=0.05)
    # accumulation itself adds no bf16 rounding: blending bf16 outputs equals blending them as float32
    rounded = sliding_window_inference(volume, lambda w: (w + 1).to(torch.bfloat16), patch_size=8, overlap=2)
    exact = sliding_window_inference(volume, lambda w: (w + 1).to(torch.bfloat16).float(), patch_size=8, overlap=2)
    assert rounded.dtype == torch.float32
    assert torch.equal(rounded, exact)
    torch.testing.assert_close(rounded, (volume + 1).to(torch.bfloat16).float(), rtol=0, atol=1e-5)


def test_accumulate_device_override_gives_the_same_result():
    volume = random_volume(1, 1, (12, 12, 12))
    on_cpu = sliding_window_inference(volume, torch.tanh, patch_size=8, overlap=2, accumulate_device="cpu")
    assert on_cpu.device == volume.device
    torch.testing.assert_close(on_cpu, torch.tanh(volume), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ argument checks
def test_overlap_not_smaller_than_patch_is_rejected():
    with pytest.raises(ValueError, match="overlap"):
        sliding_window_inference(random_volume(1, 1, (12, 12, 12)), lambda w: w, patch_size=8, overlap=8)
    with pytest.raises(ValueError, match="overlap"):
        sliding_window_inference(random_volume(1, 1, (12, 12, 12)), lambda w: w, patch_size=(8, 8, 4), overlap=4)


def test_wrong_volume_ndim_is_rejected_naming_the_shape():
    with pytest.raises(ValueError, match=r"\(1, 12, 12, 12\)"):
        sliding_window_inference(torch.zeros(1, 12, 12, 12), lambda w: w, patch_size=8, overlap=2)


def test_predictor_with_wrong_output_shape_is_rejected():
    with pytest.raises(ValueError, match="predictor"):
        sliding_window_inference(random_volume(1, 1, (12, 12, 12)), lambda w: w[..., :4], patch_size=8, overlap=2)


def test_empty_batch_of_volumes_is_rejected_naming_b():
    with pytest.raises(ValueError, match=r"volume must hold at least one volume \(B >= 1"):
        sliding_window_inference(torch.zeros(0, 1, 12, 12, 12), lambda w: w, patch_size=8, overlap=2)


def test_bad_batch_size_and_volume_args_are_rejected():
    volume = random_volume(2, 1, (12, 12, 12))
    with pytest.raises(ValueError, match="batch_size"):
        sliding_window_inference(volume, lambda w: w, patch_size=8, overlap=2, batch_size=0)
    with pytest.raises(ValueError, match="volume_args"):
        sliding_window_inference(volume, lambda w, c: w, patch_size=8, overlap=2, volume_args=(torch.zeros(3, 4),))


# ------------------------------------------------------------------ predict_full_volume
SCHEDULE = NoiseSchedule(timesteps=1000)


def tiny_unet(seed=0, condition_channels=2, constraint_dim=4):
    """An untrained 2-level U-Net whose (normally zero-initialised) output layer is randomised."""
    torch.manual_seed(seed)
    model = SimpleUNet3D(in_channels=1 + condition_channels, base_channels=8, levels=2, constraint_dim=constraint_dim,
                         time_dim=8, embed_dim=8, groups=4)
    torch.nn.init.normal_(model.backbone.output.weight, std=0.3)
    return model.eval()


class CallCounter:
    """Wraps a model and counts forward calls and windows."""

    def __init__(self, model):
        self.model, self.calls, self.windows = model, 0, 0

    def __call__(self, x, t, constraints):
        self.calls += 1
        self.windows += x.shape[0]
        return self.model(x, t, constraints)


def tiny_inputs(spatial=(12, 16, 10), batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    condition = torch.rand((batch, 2) + spatial, generator=generator)
    constraints = torch.rand((batch, 4), generator=generator)
    return condition, constraints


@pytest.mark.parametrize("mode", ["synchronous", "per_window"])
@pytest.mark.parametrize("spatial", [(12, 16, 10), (12, 16, 6)])
def test_predict_full_volume_runs_in_both_modes(mode, spatial):
    condition, constraints = tiny_inputs(spatial)
    x0 = predict_full_volume(tiny_unet(), condition, constraints, SCHEDULE, patch_size=8, overlap=4, ddim_steps=3,
                             mode=mode, batch_size=3, generator=torch.Generator().manual_seed(0))
    assert x0.shape == (2, 1) + spatial and x0.dtype == torch.float32
    assert torch.isfinite(x0).all()
    assert x0.min() >= -1 and x0.max() <= 1
    assert x0.std() > 0.01  # the perturbed output layer really predicts something


def test_both_modes_make_the_same_number_of_model_calls():
    condition, constraints = tiny_inputs()
    counts = {}
    for mode in ("synchronous", "per_window"):
        counter = CallCounter(tiny_unet())
        predict_full_volume(counter, condition, constraints, SCHEDULE, patch_size=8, overlap=4, ddim_steps=4,
                            mode=mode, batch_size=3, generator=torch.Generator().manual_seed(0))
        counts[mode] = (counter.calls, counter.windows)
    n_windows = 2 * 3 * 2  # window_starts(12, 8, 4) = [0, 4], (16) -> [0, 4, 8], (10) -> [0, 2]
    assert counts["synchronous"] == counts["per_window"] == (math.ceil(2 * n_windows / 3) * 4, 2 * n_windows * 4)


@pytest.mark.parametrize("mode, eta", [("synchronous", 0.0), ("synchronous", 1.0), ("per_window", 0.5)])
def test_predict_full_volume_is_deterministic_with_a_generator(mode, eta):
    condition, constraints = tiny_inputs(batch=1)
    model = tiny_unet()

    def run(seed):
        return predict_full_volume(model, condition, constraints, SCHEDULE, patch_size=8, overlap=4, ddim_steps=3,
                                   mode=mode, eta=eta, generator=torch.Generator().manual_seed(seed))

    first, again, other = run(0), run(0), run(1)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


@pytest.mark.parametrize("mode, eta", [("synchronous", 0.0), ("synchronous", 0.5), ("per_window", 0.0)])
def test_a_seeded_sample_does_not_depend_on_batch_size(mode, eta):
    # (per_window with eta > 0 draws each step's noise per batch of windows: documented exception)
    condition, constraints = tiny_inputs()
    model = tiny_unet()
    results = [
        predict_full_volume(model, condition, constraints, SCHEDULE, patch_size=8, overlap=4, ddim_steps=3,
                            mode=mode, eta=eta, batch_size=batch_size, generator=torch.Generator().manual_seed(0))
        for batch_size in (1, 5)
    ]
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-5)


class TargetOracle:
    """Predicts the exact noise of x_t around a known x0 (condition channel 0): DDIM must return x0."""

    def __call__(self, x, t, constraints):
        return SCHEDULE.predict_eps(x[:, :1], x[:, 1:2], t)


@pytest.mark.parametrize("mode", ["synchronous", "per_window"])
def test_perfect_noise_predictor_recovers_its_target(mode):
    spatial = (12, 16, 6)
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, n) for n in spatial], indexing="ij"))
    target = 0.8 * torch.sin(2 * grid[0] + grid[1] - grid[2])[None, None]
    x0 = predict_full_volume(TargetOracle(), target, torch.zeros(1, 4), SCHEDULE, patch_size=8, overlap=4,
                             ddim_steps=5, mode=mode, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x0, target, rtol=0, atol=1e-4)


class SignOracle:
    """Denoiser for a bimodal toy distribution: x0 = s * f, s = +1 or -1 for the whole volume.

    ``f`` (positive, smooth) is condition channel 0. Each window estimates s as the posterior
    mean given its window-average of x_t * f (a tempered likelihood, so the decision forms in the
    later steps as a real denoiser's does). Windows run on their own noise choose their sign
    independently and blend into seams; windows sharing one x_t settle on a common sign.
    """

    confidence = 100.0

    def __call__(self, x, t, constraints):
        x_t, f = x[:, :1], x[:, 1:2]
        alpha_bar = SCHEDULE.alpha_bar(t).float().view(-1, 1, 1, 1, 1)
        evidence = (x_t * f).mean(dim=(1, 2, 3, 4), keepdim=True)
        sign = torch.tanh(self.confidence * alpha_bar.sqrt() * evidence / (1 - alpha_bar))
        return SCHEDULE.predict_eps(x_t, sign * f, t)


def seam_strength(x0, f, patch, overlap):
    """Mean |jump| of x0 / f between neighbouring voxels inside the windows' overlap zones."""
    ratio = x0 / f
    jumps = []
    for axis in range(3):
        size = ratio.shape[2 + axis]
        starts = window_starts(size, patch, overlap)
        in_overlap = torch.zeros(size - 1, dtype=torch.bool)
        for start, next_start in zip(starts, starts[1:]):
            in_overlap[next_start:start + patch - 1] = True
        steps = ratio.diff(dim=2 + axis).abs().movedim(2 + axis, 0)
        jumps.append(steps[in_overlap].mean())
    return torch.stack(jumps).mean().item()


def test_synchronous_mode_has_smaller_seams_than_per_window():
    spatial, patch, overlap = (24, 24, 24), 12, 4
    grid = torch.stack(torch.meshgrid(*[torch.linspace(0, 1, n) for n in spatial], indexing="ij"))
    f = (0.5 + 0.3 * torch.sin(3 * grid[0] + 2 * grid[1] + grid[2]))[None, None]
    seams = {}
    for mode in ("synchronous", "per_window"):
        seams[mode] = [
            seam_strength(
                predict_full_volume(SignOracle(), f, torch.zeros(1, 4), SCHEDULE, patch_size=patch, overlap=overlap,
                                    ddim_steps=10, mode=mode, batch_size=8,
                                    generator=torch.Generator().manual_seed(seed)),
                f, patch, overlap)
            for seed in range(4)
        ]
    assert all(s < p for s, p in zip(seams["synchronous"], seams["per_window"])), seams
    assert sum(seams["synchronous"]) < 0.25 * sum(seams["per_window"]), seams


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_volume_with_cpu_accumulator_and_cpu_generator():
    volume = random_volume(1, 1, (20, 24, 7)).cuda()
    result = sliding_window_inference(volume, lambda w: w + 1, patch_size=8, overlap=2, accumulate_device="cpu")
    assert result.device == volume.device
    torch.testing.assert_close(result, volume + 1, rtol=0, atol=2e-6)
    condition, constraints = tiny_inputs()
    model = tiny_unet().cuda()
    for mode in ("synchronous", "per_window"):
        x0 = predict_full_volume(model, condition.cuda(), constraints.cuda(), SCHEDULE.cuda(), patch_size=8,
                                 overlap=4, ddim_steps=2, mode=mode, generator=torch.Generator().manual_seed(0))
        assert x0.device == condition.cuda().device and x0.shape == (2, 1, 12, 16, 10)


def test_predict_full_volume_rejects_bad_arguments():
    condition, constraints = tiny_inputs()
    with pytest.raises(ValueError, match="mode"):
        predict_full_volume(tiny_unet(), condition, constraints, SCHEDULE, patch_size=8, overlap=4, mode="tiled")
    with pytest.raises(ValueError, match="constraints"):
        predict_full_volume(tiny_unet(), condition, constraints[:1], SCHEDULE, patch_size=8, overlap=4)
    with pytest.raises(ValueError, match="condition"):
        predict_full_volume(tiny_unet(), condition[0], constraints, SCHEDULE, patch_size=8, overlap=4)
    with pytest.raises(ValueError, match=r"condition must hold at least one volume \(B >= 1"):
        predict_full_volume(tiny_unet(), condition[:0], constraints[:0], SCHEDULE, patch_size=8, overlap=4)
    with pytest.raises(ValueError, match=r"eta must be a number in \[0, 1\]"):
        predict_full_volume(tiny_unet(), condition, constraints, SCHEDULE, patch_size=8, overlap=4, eta=1.5)


@pytest.mark.parametrize("mode", ["synchronous", "per_window"])
def test_in_place_noise_model_never_gives_a_silently_wrong_sample(mode):
    # (12, 12, 12) / 8: unpadded windows, which synchronous mode slices from its [x_t, condition] buffer
    condition, constraints = tiny_inputs((12, 12, 12), batch=1)
    original = condition.clone()
    model = tiny_unet()

    def run(noise_model):
        return predict_full_volume(noise_model, condition, constraints, SCHEDULE, patch_size=8, overlap=4,
                                   ddim_steps=2, mode=mode, generator=torch.Generator().manual_seed(0))

    def in_place(x, t, c):
        return model(x.mul_(1.5), t, c)

    if mode == "synchronous":  # its windows are views of the [x_t, condition] buffer: an error, not a wrong sample
        with pytest.raises(ValueError, match="modified its input window in place"):
            run(in_place)
    else:
        assert torch.equal(run(in_place), run(lambda x, t, c: model(x * 1.5, t, c)))
    assert torch.equal(condition, original)
