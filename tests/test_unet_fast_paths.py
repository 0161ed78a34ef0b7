"""The CPU fast paths of vmat_diffusion.unet (conv3d, upsample2x) give the same results as PyTorch's ops."""
import pytest
import torch
import torch.nn.functional as F

from vmat_diffusion import BaselineUNet3D, SimpleUNet3D, unet
from vmat_diffusion.unet import _HalvesConv3d, _use_halves, conv3d, group_norm_film, upsample2x


@pytest.mark.parametrize("in_channels, out_channels, size, kernel", [(16, 32, 16, 3), (4, 4, 6, 3), (8, 8, 2, 3),
                                                                      (32, 16, 8, 1)])
def test_conv3d_fast_paths_match_plain_convolution(in_channels, out_channels, size, kernel):
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(in_channels, out_channels, kernel, padding=kernel // 2)
    x = torch.randn(1, in_channels, size, size + 2, size + 4).contiguous(memory_format=torch.channels_last_3d)
    assert kernel == 1 or _use_halves(conv, x)
    fast_x, plain_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    fast = conv3d(conv, fast_x)
    grad = torch.randn_like(fast)
    fast.backward(grad)
    fast_grads = [p.grad.clone() for p in conv.parameters()]
    conv.zero_grad()
    plain = F.conv3d(plain_x, conv.weight, conv.bias, padding=kernel // 2)
    plain.backward(grad)
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast_x.grad, plain_x.grad, rtol=1e-4, atol=1e-5)
    for fast_grad, p in zip(fast_grads, conv.parameters()):
        torch.testing.assert_close(fast_grad, p.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pad", [0, 1])
def test_halves_convolution_gradcheck(pad):
    generator = torch.Generator().manual_seed(0)
    kernel = 2 * pad + 1
    x = torch.randn(1, 2, 4, 3, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(3, 2, kernel, kernel, kernel, dtype=torch.float64, generator=generator, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, generator=generator, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: _HalvesConv3d.apply(*a, pad), (x, weight, bias))


def test_halves_path_is_skipped_where_pytorch_is_fast():
    conv = torch.nn.Conv3d(8, 8, 3, padding=1)
    assert not _use_halves(conv, torch.randn(2, 8, 8, 8, 8))  # batch > 1
    assert not _use_halves(conv, torch.randn(1, 8, 7, 8, 8))  # odd X
    assert not _use_halves(conv, torch.randn(1, 8, 64, 64, 8))  # large enough for oneDNN
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _use_halves(conv, torch.randn(1, 8, 8, 8, 8))


@pytest.mark.parametrize("conv", [torch.nn.Conv3d(4, 6, 3, padding=0), torch.nn.Conv3d(4, 6, 3, padding=2),
                                  torch.nn.Conv3d(4, 6, 1, stride=2), torch.nn.Conv3d(4, 6, 1, padding=1),
                                  torch.nn.Conv3d(4, 6, 3, padding=1, stride=2)])
def test_conv3d_of_a_convolution_that_is_not_same_equals_conv(conv):
    # the halves and matmul paths hold only for "same" convolutions; anything else must be conv(x)
    torch.manual_seed(0)
    x = torch.randn(1, 4, 8, 6, 6).contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(conv3d(conv, x), conv(x), rtol=1e-5, atol=1e-5)


def _plain_group_norm_film(h, norm, scale, shift):
    """What ``group_norm_film`` computes, in plain ops: h (B, C, ...), scale and shift (B, C)."""
    return norm(h) * (1 + scale[:, :, None, None, None]) + shift[:, :, None, None, None]


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_film_equals_norm_then_film(batch, channels_last):
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(2, 6)
    with torch.no_grad():  # non-default affine: a wrong gamma or beta term must show
        norm.weight.normal_(1.0, 0.5)
        norm.bias.normal_(0.0, 0.5)
    h = torch.randn(batch, 6, 4, 6, 2)
    if channels_last:
        h = h.contiguous(memory_format=torch.channels_last_3d)
    scale, shift = torch.randn(batch, 6), torch.randn(batch, 6)
    expected = _plain_group_norm_film(h, norm, scale, shift)
    torch.testing.assert_close(group_norm_film(h, norm, scale, shift), expected, rtol=1e-5, atol=1e-5)


def _forward_backward(model, x, args):
    """Output, input gradient and parameter gradients of sum(model(x, *args) * fixed weights)."""
    model.zero_grad()
    x = x.clone().requires_grad_()
    y = model(x, *args)
    (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    return [y.detach(), x.grad] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize("cls", [BaselineUNet3D, SimpleUNet3D])
@pytest.mark.parametrize("batch", [1, 2])
def test_whole_model_with_fast_paths_equals_plain_ops(cls, batch, monkeypatch):
    torch.manual_seed(0)
    model = cls(in_channels=3, base_channels=4, levels=3, groups=2)
    with torch.no_grad():  # non-default GroupNorm affine and a non-zero output layer
        for module in model.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.normal_(1.0, 0.5)
                module.bias.normal_(0.0, 0.5)
        model.backbone.output.weight.normal_()
    x = torch.randn(batch, 3, 8, 8, 8)
    constraints = torch.randn(batch, 13)
    args = (constraints,) if cls is BaselineUNet3D else (torch.arange(batch) * 300 + 5, constraints)
    fast = _forward_backward(model, x, args)
    monkeypatch.setattr(unet, "conv3d", lambda conv, h: conv(h))
    monkeypatch.setattr(unet, "upsample2x",
                        lambda h: F.interpolate(h, scale_factor=2, mode="trilinear", align_corners=False))
    monkeypatch.setattr(unet, "group_norm_film", _plain_group_norm_film)
    plain = _forward_backward(model, x, args)
    for fast_value, plain_value in zip(fast, plain):
        torch.testing.assert_close(fast_value, plain_value, rtol=1e-4, atol=1e-4 * plain_value.abs().max().item())


def _has_channels_last_strides(h: torch.Tensor) -> bool:
    """The strides of h made channels-last (those that every op reads as channels-last; a
    size-1 batch with another stride passes is_contiguous(channels_last_3d) but not GroupNorm)."""
    return h.stride() == h.contiguous(memory_format=torch.channels_last_3d).stride()


def test_halves_output_has_channels_last_strides():
    conv = torch.nn.Conv3d(8, 16, 3, padding=1)
    x = torch.randn(1, 8, 8, 8, 8).contiguous(memory_format=torch.channels_last_3d)
    assert _use_halves(conv, x)
    y = conv3d(conv, x)
    assert _has_channels_last_strides(y)
    assert _has_channels_last_strides(torch.nn.GroupNorm(4, 16)(y))


@pytest.mark.parametrize("model", [BaselineUNet3D(base_channels=8, levels=3), SimpleUNet3D(base_channels=8, levels=3)])
def test_every_block_stays_channels_last_on_cpu(model):
    # One channels-first activation (it once came out of the halves path's join) sends every
    # later layer to slower convolution kernels: a 1.2x slower training step at the default width.
    outputs = []
    backbone = model.backbone
    for block in [*backbone.encoder, backbone.bottleneck, *backbone.decoder]:
        block.register_forward_hook(lambda module, inputs, output: outputs.append(_has_channels_last_strides(output)))
    x = torch.randn(1, model.backbone.in_channels, 16, 16, 16)
    if isinstance(model, SimpleUNet3D):
        model(x, torch.tensor([3]), None)
    else:
        model(x, None)
    assert len(outputs) == 2 * 3 and all(outputs), outputs


@pytest.mark.parametrize("shape", [(2, 3, 4, 5, 6), (1, 2, 1, 3, 2)])
def test_upsample2x_gradcheck(shape):
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(upsample2x, (x,))


def test_upsample2x_matches_trilinear_interpolation_on_a_channel_slice_of_channels_last_grads():
    torch.manual_seed(0)
    x = torch.randn(1, 6, 5, 8, 7).contiguous(memory_format=torch.channels_last_3d)
    # the decoder's upsampled tensor is concatenated with a skip: its gradient arrives as a
    # channel slice of a channels-last tensor
    grad = torch.randn(1, 10, 10, 16, 14).contiguous(memory_format=torch.channels_last_3d)[:, 2:8]
    ours_x, plain_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = upsample2x(ours_x)
    plain = F.interpolate(plain_x, scale_factor=2, mode="trilinear", align_corners=False)
    assert torch.equal(ours, plain)
    ours.backward(grad)
    plain.backward(grad)
    torch.testing.assert_close(ours_x.grad, plain_x.grad, rtol=1e-5, atol=1e-6)


def test_upsample2x_backward_is_ours_off_the_cpu_only_in_deterministic_mode():
    # PyTorch's CUDA trilinear backward adds with atomics; "meta" stands in for a GPU here
    x = torch.empty(1, 2, 3, 4, 5, device="meta", requires_grad=True)
    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        assert "UpsampleTrilinear3D" in type(upsample2x(x).grad_fn).__name__
        torch.use_deterministic_algorithms(True, warn_only=True)
        assert "Upsample2xSeparable" in type(upsample2x(x).grad_fn).__name__
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)
    assert "Upsample2xSeparable" in type(upsample2x(torch.ones(1, 1, 2, 2, 2, requires_grad=True)).grad_fn).__name__


def test_upsample2x_bf16_gradient_is_summed_in_float32():
    torch.manual_seed(0)
    x = torch.randn(1, 4, 4, 4, 4).to(torch.bfloat16)
    grad = torch.randn(1, 4, 8, 8, 8).to(torch.bfloat16)
    ours_x, reference_x = x.clone().requires_grad_(), x.double().requires_grad_()
    upsample2x(ours_x).backward(grad)
    F.interpolate(reference_x, scale_factor=2, mode="trilinear", align_corners=False).backward(grad.double())
    assert ours_x.grad.dtype == torch.bfloat16
    # one bf16 rounding of the float32 sum: within half a bf16 ulp (2**-8 relative) of the exact gradient
    torch.testing.assert_close(ours_x.grad.double(), reference_x.grad, rtol=2 ** -8, atol=1e-6)
