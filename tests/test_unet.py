"""Tests of the 3-D U-Nets (vmat_diffusion.unet)."""
import re

import pytest
import torch

from vmat_diffusion.unet import BaselineUNet3D, SimpleUNet3D

TINY = dict(base_channels=8, levels=3, constraint_dim=5)


def tiny_simple(**kwargs):
    torch.manual_seed(0)
    return SimpleUNet3D(in_channels=3, **{**TINY, **kwargs})


def tiny_baseline(**kwargs):
    torch.manual_seed(0)
    return BaselineUNet3D(in_channels=2, **{**TINY, **kwargs})


def perturb_output_layer(model):
    torch.manual_seed(1)
    with torch.no_grad():
        model.backbone.output.weight.normal_(std=0.5)
        model.backbone.output.bias.normal_(std=0.5)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_output_shapes_and_zero_init():
    x = torch.randn(2, 3, 16, 8, 24)
    t = torch.tensor([3, 700])
    c = torch.randn(2, 5)
    simple_out = tiny_simple()(x, t, c)
    baseline_out = tiny_baseline(out_channels=2)(x[:, :2], c)
    assert simple_out.shape == (2, 1, 16, 8, 24) and baseline_out.shape == (2, 2, 16, 8, 24)
    assert torch.all(simple_out == 0) and torch.all(baseline_out == 0)


def test_constraints_change_the_output():
    x = torch.randn(2, 2, 8, 8, 8)
    c = torch.randn(2, 5)
    model = tiny_baseline()
    perturb_output_layer(model)
    out = model(x, c)
    assert not torch.allclose(out, model(x, c + 1.0), atol=1e-5)
    assert torch.equal(model(x, None), model(x, torch.zeros(2, 5)))


def test_timestep_changes_the_output_of_simple_unet():
    model = tiny_simple()
    perturb_output_layer(model)
    x = torch.randn(1, 3, 8, 8, 8)
    c = torch.randn(1, 5)
    assert not torch.allclose(model(x, torch.tensor([10]), c), model(x, torch.tensor([900]), c), atol=1e-5)
    assert torch.equal(model(x, 10, c), model(x, torch.tensor([10]), c))  # an int is broadcast over the batch


def test_constraints_matter_after_one_optimizer_step():
    model = tiny_baseline()
    x = torch.randn(2, 2, 8, 8, 8)
    c = torch.randn(2, 5)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(x, c).sub(1.0).square().mean().backward()
    optimizer.step()
    assert not torch.allclose(model(x, c), model(x, -c), atol=1e-6)


def test_bad_inputs_give_clear_errors():
    model = tiny_simple()
    with pytest.raises(ValueError, match=r"spatial size \(8, 8, 10\).*divisible by 2\*\*\(levels-1\) = 4"):
        model(torch.randn(1, 3, 8, 8, 10), torch.tensor([1]), None)
    with pytest.raises(ValueError, match="3 channels"):
        model(torch.randn(1, 4, 8, 8, 8), torch.tensor([1]), None)
    with pytest.raises(ValueError, match="constraints must be"):
        model(torch.randn(1, 3, 8, 8, 8), torch.tensor([1]), torch.randn(1, 4))
    with pytest.raises(ValueError, match="t must be"):
        model(torch.randn(2, 3, 8, 8, 8), torch.tensor([1, 2, 3]), None)
    with pytest.raises(ValueError, match="divisible by groups"):
        BaselineUNet3D(base_channels=12)


@pytest.mark.parametrize("build", [tiny_simple, tiny_baseline])
def test_config_round_trip(build):
    model = build()
    rebuilt = type(model)(**model.config)
    assert rebuilt.config == model.config
    rebuilt.load_state_dict(model.state_dict())  # same architecture, same parameter names and shapes
    assert n_params(rebuilt) == n_params(model)


def documented_counts(cls):
    found = re.findall(r"base_channels=(\d+) -> ([\d,]+)", cls.__doc__)
    return {int(base): int(count.replace(",", "")) for base, count in found}


@pytest.mark.parametrize("cls", [SimpleUNet3D, BaselineUNet3D])
def test_parameter_counts_match_docstring(cls):
    counts = documented_counts(cls)
    assert set(counts) == {32, 48}
    for base, count in counts.items():
        with torch.device("meta"):
            model = cls(base_channels=base)
        assert n_params(model) == count


def test_works_under_cpu_bfloat16_autocast():
    model = tiny_simple()
    perturb_output_layer(model)
    x = torch.randn(1, 3, 8, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, torch.tensor([5]), torch.randn(1, 5))
    assert out.shape == (1, 1, 8, 8, 8) and torch.isfinite(out).all()


@pytest.mark.parametrize("build", [tiny_simple, tiny_baseline])
@pytest.mark.parametrize("constraints", [True, False])
def test_model_cast_to_bfloat16_runs_in_bfloat16(build, constraints):
    # model.bfloat16(): the constraint and timestep embeddings' inputs must follow the weights' dtype
    model = build()
    perturb_output_layer(model)
    model = model.bfloat16()
    x = torch.randn(2, model.config["in_channels"], 8, 8, 8, dtype=torch.bfloat16)
    c = torch.randn(2, 5) if constraints else None  # float32 constraints are cast too
    out = model(x, torch.tensor([5, 900]), c) if isinstance(model, SimpleUNet3D) else model(x, c)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 1, 8, 8, 8) and torch.isfinite(out).all()


def test_gradient_checkpointing_gives_same_gradients():
    x = torch.randn(1, 2, 8, 8, 8)
    c = torch.randn(1, 5)
    grads = []
    for use_checkpoint in (False, True):
        model = tiny_baseline(use_checkpoint=use_checkpoint)
        perturb_output_layer(model)
        model(x, c).square().mean().backward()
        grads.append(model.backbone.encoder[0].conv1.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("build", [tiny_simple, tiny_baseline])
def test_a_few_adam_steps_reduce_mse(build):
    torch.manual_seed(2)
    model = build()
    in_channels = model.config["in_channels"]
    x = torch.randn(2, in_channels, 16, 16, 16)
    c = torch.randn(2, 5)
    target = torch.tanh(x[:, :1]) + 0.5

    def forward():
        return model(x, torch.tensor([10, 500]), c) if isinstance(model, SimpleUNet3D) else model(x, c)

    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(forward(), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
