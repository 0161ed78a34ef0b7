"""Tests of the noise schedule (vmat_diffusion.schedule)."""
import math

import numpy as np
import pytest
import torch

from vmat_diffusion.schedule import NoiseSchedule


def closed_form_cosine_betas(T, s=0.008, cap=0.999):
    f = lambda t: math.cos(((t / T) + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    alpha_bar = [f(t) / f(0) for t in range(T + 1)]
    return np.array([min(1 - alpha_bar[t + 1] / alpha_bar[t], cap) for t in range(T)])


def test_cosine_matches_closed_form_including_cap():
    T = 1000
    schedule = NoiseSchedule(T, "cosine")
    expected_betas = closed_form_cosine_betas(T)
    np.testing.assert_allclose(schedule.betas.numpy(), expected_betas, rtol=1e-10, atol=1e-15)
    assert schedule.betas[-1].item() == pytest.approx(0.999)  # the cap is active at the end
    # alpha-bar is f(t+1)/f(0) wherever no cap was hit, and the product of (1 - beta) everywhere
    f = lambda t: math.cos(((t / T) + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    uncapped = np.array([f(t + 1) / f(0) for t in range(T - 1)])
    np.testing.assert_allclose(schedule.alphas_cumprod[:-1].numpy(), uncapped, rtol=1e-9)
    np.testing.assert_allclose(schedule.alphas_cumprod.numpy(), np.cumprod(1 - expected_betas), rtol=1e-10)


def test_linear_schedule_is_ddpm_scaled():
    schedule = NoiseSchedule(1000, "linear")
    assert schedule.betas[0].item() == pytest.approx(1e-4)
    assert schedule.betas[-1].item() == pytest.approx(0.02)
    short = NoiseSchedule(100, "linear")
    assert short.betas[0].item() == pytest.approx(1e-3)
    assert short.betas[-1].item() == pytest.approx(0.2)


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_alpha_bar_monotonic_and_in_range(name):
    ab = NoiseSchedule(1000, name).alphas_cumprod
    assert torch.all(ab[1:] < ab[:-1])
    assert 0 < ab[-1] < ab[0] < 1


def test_buffers_stay_float64_under_casts():
    schedule = NoiseSchedule(1000)
    reference = schedule.alphas_cumprod.clone()
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), schedule)
    model.half()
    model.to(torch.bfloat16)
    model.float()
    assert model[0].weight.dtype == torch.float32
    for buffer in (schedule.betas, schedule.alphas_cumprod):
        assert buffer.dtype == torch.float64
    assert torch.equal(schedule.alphas_cumprod, reference)  # not rounded on the way
    assert schedule.alpha_bar(torch.tensor([0, 999])).dtype == torch.float64


def test_buffers_not_in_state_dict():
    assert NoiseSchedule(10).state_dict() == {}
    assert NoiseSchedule(**NoiseSchedule(10, "linear").config).schedule == "linear"


def test_add_noise_formula_and_float32_under_autocast():
    schedule = NoiseSchedule(1000)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 1, 4, 4, 4, generator=gen).bfloat16()
    noise = torch.randn(3, 1, 4, 4, 4, generator=gen)
    t = torch.tensor([0, 500, 999])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_t = schedule.add_noise(x0, noise, t)
    assert x_t.dtype == torch.float32
    ab = schedule.alphas_cumprod[t].reshape(3, 1, 1, 1, 1)
    expected = ab.sqrt() * x0.double() + (1 - ab).sqrt() * noise.double()
    torch.testing.assert_close(x_t.double(), expected, rtol=1e-6, atol=1e-6)


def test_predict_x0_and_eps_invert_add_noise():
    schedule = NoiseSchedule(1000)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(4, 1, 3, 3, 3, generator=gen) * 2 - 1
    eps = torch.randn(4, 1, 3, 3, 3, generator=gen)
    t = torch.tensor([1, 100, 400, 800])
    x_t = schedule.add_noise(x0, eps, t)
    torch.testing.assert_close(schedule.predict_x0(x_t, eps, t), x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(schedule.predict_eps(x_t, x0, t), eps, rtol=1e-4, atol=1e-4)


def test_alpha_bar_lookup():
    schedule = NoiseSchedule(50)
    assert schedule.alpha_bar(-1).item() == 1.0
    assert schedule.alpha_bar(7).item() == schedule.alphas_cumprod[7].item()
    with pytest.raises(ValueError, match="t must lie in"):
        schedule.alpha_bar(50)
    with pytest.raises(TypeError):
        schedule.alpha_bar(torch.tensor([0.5]))


def test_sample_timesteps_seeded_and_in_range():
    schedule = NoiseSchedule(20)
    a = schedule.sample_timesteps(500, generator=torch.Generator().manual_seed(3))
    b = schedule.sample_timesteps(500, generator=torch.Generator().manual_seed(3))
    assert a.dtype == torch.long and a.shape == (500,)
    assert torch.equal(a, b)
    assert a.min() == 0 and a.max() == 19


@pytest.mark.parametrize("kwargs", [dict(schedule="sigmoid"), dict(timesteps=0), dict(timesteps=-5)])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        NoiseSchedule(**kwargs)
