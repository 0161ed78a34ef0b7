"""The CPU fast paths of vmat_diffusion.unet (conv3d, upsample2x) give the same results as PyTorch's ops."""
import pytest
import torch
import torch.nn.functional as F

from vmat_diffusion import BaselineUNet3D, SimpleUNet3D
from vmat_diffusion.unet import _HalvesConv3d, _use_halves, conv3d, upsample2x


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
