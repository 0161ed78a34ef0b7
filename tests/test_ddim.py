"""Tests of the DDIM sampler (vmat_diffusion.ddim)."""
import itertools

import pytest
import torch

from vmat_diffusion.ddim import DDIMSampler, ddim_timesteps
from vmat_diffusion.schedule import NoiseSchedule


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule(1000, "cosine")


class OracleModel(torch.nn.Module):
    """Returns the exact noise of a known x0: eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab)."""

    def __init__(self, schedule, x0):
        super().__init__()
        self.schedule, self.x0, self.calls = schedule, x0, []

    def forward(self, inputs, t, constraints):
        self.calls.append((inputs.shape, t.clone(), constraints))
        return self.schedule.predict_eps(inputs[:, :1], self.x0, t)


class TinyNoiseModel(torch.nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv3d(in_channels, 1, 3, padding=1)

    def forward(self, inputs, t, constraints):
        return self.conv(inputs) * (1 + t.float().reshape(-1, 1, 1, 1, 1) / 1000)


def test_trailing_timesteps_default(schedule):
    sampler = DDIMSampler(schedule)
    ts = sampler.timesteps
    assert ts.dtype == torch.long and len(ts) == 50 == len(sampler)
    assert ts[0] == 999 and ts[-1] == 19
    assert torch.all(ts[1:] < ts[:-1])


@pytest.mark.parametrize(
    "T,steps,spacing", list(itertools.product([1000, 37, 10], [1, 3, 7, 10], ["trailing", "leading", "linspace"]))
)
def test_timesteps_descending_unique_in_range(T, steps, spacing):
    ts = ddim_timesteps(T, steps, spacing)
    assert len(ts) == steps and len(set(ts.tolist())) == steps
    assert all(a > b for a, b in zip(ts, ts[1:]))
    assert 0 <= ts.min() and ts.max() <= T - 1
    if spacing != "leading":
        assert ts[0] == T - 1


def test_other_spacings_for_comparison(schedule):
    assert DDIMSampler(schedule, spacing="leading").timesteps[0] == 980
    linspace = DDIMSampler(schedule, spacing="linspace").timesteps
    assert linspace[0] == 999 and linspace[-1] == 0


def test_pairs_end_with_minus_one(schedule):
    pairs = list(DDIMSampler(schedule, steps=4).pairs())
    assert pairs == [(999, 749), (749, 499), (499, 249), (249, -1)]


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_perfect_noise_oracle_recovers_x0(schedule, eta):
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 1, 4, 4, 4, generator=gen) * 1.6 - 0.8
    condition = torch.randn(2, 3, 4, 4, 4, generator=gen)
    constraints = torch.randn(2, 5)
    model = OracleModel(schedule, x0)
    sampler = DDIMSampler(schedule, steps=20, eta=eta, clip_x0=None)
    out = sampler.sample(model, condition, constraints, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-3)
    assert len(model.calls) == 20
    shape, t, passed = model.calls[0]
    assert shape == (2, 4, 4, 4, 4) and t.dtype == torch.long and t.tolist() == [999, 999]
    assert passed is constraints


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_sampling_is_deterministic_for_a_seeded_generator(schedule, eta):
    model = TinyNoiseModel(4).eval()
    condition = torch.randn(1, 3, 4, 4, 4)
    sampler = DDIMSampler(schedule, steps=8, eta=eta)

    def run(seed):
        return sampler.sample(model, condition, None, generator=torch.Generator().manual_seed(seed))

    a, b, c = run(5), run(5), run(6)
    assert a.shape == (1, 1, 4, 4, 4) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert a.min() >= -1 and a.max() <= 1


def test_eta_changes_the_sample(schedule):
    model = TinyNoiseModel(4).eval()
    condition = torch.randn(1, 3, 4, 4, 4)
    a, b = (
        DDIMSampler(schedule, steps=8, eta=eta).sample(model, condition, None, torch.Generator().manual_seed(5))
        for eta in (0.0, 1.0)
    )
    assert not torch.allclose(a, b)


def test_eta_one_full_steps_is_ddpm_posterior():
    schedule = NoiseSchedule(100, "cosine")
    sampler = DDIMSampler(schedule, steps=100, eta=1.0, clip_x0=None)
    ab = schedule.alphas_cumprod
    pairs = list(sampler.pairs())
    assert pairs[:2] == [(99, 98), (98, 97)] and pairs[-1] == (0, -1)
    for t, t_prev in pairs[:-1]:
        beta_tilde = (1 - ab[t - 1]) / (1 - ab[t]) * schedule.betas[t]
        assert sampler.sigma(t, t_prev) ** 2 == pytest.approx(beta_tilde.item(), rel=1e-9)
    assert sampler.sigma(0, -1) == 0.0

    # empirical check of one update: mean = DDPM posterior mean, variance = beta_tilde
    t = 60
    gen = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000,), 0.3)
    eps = torch.full((200_000,), -0.5)
    x_t = schedule.add_noise(x0, eps, t)
    x_prev = sampler.step(eps, t, t - 1, x_t, generator=gen)
    alpha, beta = 1 - schedule.betas[t].item(), schedule.betas[t].item()
    a_t, a_p = ab[t].item(), ab[t - 1].item()
    posterior_mean = (a_p**0.5 * beta / (1 - a_t)) * 0.3 + (alpha**0.5 * (1 - a_p) / (1 - a_t)) * x_t[0].item()
    beta_tilde = (1 - a_p) / (1 - a_t) * beta
    assert x_prev.mean().item() == pytest.approx(posterior_mean, abs=4 * (beta_tilde / 200_000) ** 0.5)
    assert x_prev.var().item() == pytest.approx(beta_tilde, rel=0.02)


def test_clipping_rederives_noise(schedule):
    sampler = DDIMSampler(schedule, steps=10, eta=0.0, clip_x0=(-1.0, 1.0))
    t, t_prev = 500, 400
    a_t, a_p = schedule.alpha_bar(t).item(), schedule.alpha_bar(t_prev).item()
    x0_true = torch.tensor([1.8, -2.5, 0.2])
    eps = torch.tensor([0.3, -1.0, 0.9])
    x_t = a_t**0.5 * x0_true + (1 - a_t) ** 0.5 * eps
    x0_clipped = torch.tensor([1.0, -1.0, 0.2])
    eps_rederived = (x_t - a_t**0.5 * x0_clipped) / (1 - a_t) ** 0.5
    expected = a_p**0.5 * x0_clipped + (1 - a_p) ** 0.5 * eps_rederived
    torch.testing.assert_close(sampler.step(eps, t, t_prev, x_t), expected, rtol=1e-5, atol=1e-5)
    without_rederivation = a_p**0.5 * x0_clipped + (1 - a_p) ** 0.5 * eps
    assert not torch.allclose(expected, without_rederivation, atol=1e-3)
    # the last step returns the clipped x0 itself; 0-d tensor timesteps are accepted
    torch.testing.assert_close(sampler.step(eps, torch.tensor(t), torch.tensor(-1), x_t), x0_clipped)
    unclipped = DDIMSampler(schedule, clip_x0=None).step(eps, t, -1, x_t)
    torch.testing.assert_close(unclipped, x0_true, rtol=1e-4, atol=1e-4)


def test_shape_override_and_model_under_autocast(schedule):
    class TwoChannelModel(torch.nn.Module):
        def forward(self, inputs, t, constraints):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return torch.nn.functional.conv3d(inputs, torch.ones(2, inputs.shape[1], 1, 1, 1) * 0.01)

    condition = torch.randn(1, 3, 4, 4, 4)
    out = DDIMSampler(schedule, steps=3).sample(TwoChannelModel(), condition, None, shape=(1, 2, 4, 4, 4))
    assert out.shape == (1, 2, 4, 4, 4) and out.dtype == torch.float32
    with pytest.raises(ValueError, match="shape must be"):
        DDIMSampler(schedule, steps=3).sample(TwoChannelModel(), condition, None, shape=(1, 2, 4, 4, 8))


def test_progress_bar_runs(schedule, capsys):
    model = TinyNoiseModel(4)
    DDIMSampler(schedule, steps=3).sample(model, torch.randn(1, 3, 2, 2, 2), None, progress=True)
    assert "DDIM" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs",
    [dict(steps=0), dict(steps=1001), dict(eta=-0.1), dict(spacing="middle"), dict(clip_x0=(1.0, -1.0))],
)
def test_bad_arguments(schedule, kwargs):
    with pytest.raises(ValueError):
        DDIMSampler(schedule, **kwargs)


@pytest.mark.parametrize("eta", [1.5, 1.0 + 1e-9, -0.1, float("nan"), float("inf"), "x", None])
def test_eta_outside_0_1_is_rejected_naming_eta(schedule, eta):
    # eta > 1 would give sigma^2 > 1 - alpha_bar_prev: more noise than the timestep holds
    with pytest.raises(ValueError, match="eta must be a number in \\[0, 1\\]"):
        DDIMSampler(schedule, eta=eta)


@pytest.mark.parametrize("eta", [0, 0.0, 0.5, 1, 1.0])
def test_eta_in_0_1_is_accepted(schedule, eta):
    assert DDIMSampler(schedule, eta=eta).eta == float(eta)


def test_samples_with_an_untrained_simple_unet(schedule):
    from vmat_diffusion.unet import SimpleUNet3D

    torch.manual_seed(0)
    model = SimpleUNet3D(in_channels=4, base_channels=8, levels=2, constraint_dim=3).eval()
    condition = torch.randn(2, 3, 4, 4, 4)
    sampler = DDIMSampler(schedule, steps=4)
    out = sampler.sample(model, condition, torch.randn(2, 3), generator=torch.Generator().manual_seed(0))
    # the untrained model predicts zero noise, so x0 = x_T / sqrt(alpha_bar_999), clipped: almost all at +-1
    assert out.shape == (2, 1, 4, 4, 4)
    assert (out.abs() == 1).float().mean() > 0.9


def test_step_reads_alpha_bar_as_the_schedule_gives_it_and_rejects_a_timestep_outside(schedule):
    sampler = DDIMSampler(schedule, steps=5)
    x_t, eps = torch.randn(2, 1, 4, 4, 4), torch.randn(2, 1, 4, 4, 4)
    for t, t_prev in sampler.pairs():
        a_t, a_p = schedule.alpha_bar(t).item(), schedule.alpha_bar(t_prev).item()
        x0 = ((x_t - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5).clamp(-1, 1)
        eps_clipped = (x_t - a_t ** 0.5 * x0) / (1 - a_t) ** 0.5
        expected = a_p ** 0.5 * x0 + (1 - a_p) ** 0.5 * eps_clipped
        torch.testing.assert_close(sampler.step(eps, t, t_prev, x_t), expected)
    for t, t_prev in ((schedule.timesteps, 0), (5, -2)):
        with pytest.raises(ValueError, match=rf"t must lie in \[-1, {schedule.timesteps - 1}\]"):
            sampler.step(eps, t, t_prev, x_t)
