"""PartialConv2d against a slow, direct implementation of eq. 1-2 (Liu et al., ECCV 2018), plus its speed contract;
GatedConv2d (Yu et al., ICCV 2019, Sec. 3.1) as its drop-in sibling, and the make_conv factory."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from conv_recorder import ConvRecorder
from pconv.core.layers import CONV_TYPES, GatedConv2d, MaskedInput, PartialConv2d, cat_masked, make_conv


def reference_pconv(x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    stride: int, padding: int, dilation: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 1-2 written out per output pixel: zero-pad X and M, sum W·X·M over the window, scale by
    sum(1)/sum(M), add b; 0 (bias included) and m' = 0 where sum(M) == 0."""
    n, c, h, w = x.shape
    if mask.shape[1] == 1:
        mask = mask.expand(n, c, h, w)
    c_out, _, kh, kw = weight.shape
    xp = torch.zeros(n, c, h + 2 * padding, w + 2 * padding, dtype=x.dtype)
    mp = torch.zeros_like(xp)
    xp[:, :, padding:padding + h, padding:padding + w] = x
    mp[:, :, padding:padding + h, padding:padding + w] = mask
    ho = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    wo = (w + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    sum1 = c * kh * kw
    rows, mrows = [], []
    for b in range(n):
        for i in range(ho):
            for j in range(wo):
                ys = slice(i * stride, i * stride + dilation * (kh - 1) + 1, dilation)
                xs = slice(j * stride, j * stride + dilation * (kw - 1) + 1, dilation)
                win_x, win_m = xp[b, :, ys, xs], mp[b, :, ys, xs]
                sum_m = win_m.sum()
                if sum_m > 0:
                    value = (weight * (win_x * win_m)).sum(dim=(1, 2, 3)) * (sum1 / sum_m)
                    if bias is not None:
                        value = value + bias
                    rows.append(value)
                    mrows.append(torch.ones((), dtype=x.dtype))
                else:
                    rows.append(torch.zeros(c_out, dtype=x.dtype))
                    mrows.append(torch.zeros((), dtype=x.dtype))
    out = torch.stack(rows).view(n, ho, wo, c_out).permute(0, 3, 1, 2)
    return out, torch.stack(mrows).view(n, 1, ho, wo)


def random_mask(n: int, c: int, h: int, w: int, gen: torch.Generator) -> torch.Tensor:
    """Random holes plus a large hole block (all-hole windows) in the first sample."""
    mask = (torch.rand(n, c, h, w, generator=gen) > 0.45).double()
    mask[0, :, 1:9, 1:9] = 0
    return mask


def make_layer(c_in: int, c_out: int, k: int, stride: int, padding: int, dilation: int = 1,
               bias: bool = True) -> PartialConv2d:
    torch.manual_seed(1)
    layer = PartialConv2d(c_in, c_out, k, stride=stride, padding=padding, dilation=dilation, bias=bias).double()
    if bias:
        with torch.no_grad():
            layer.bias.uniform_(0.5, 2.0)  # clearly non-zero, so "bias vanishes in holes" can fail
    return layer


CASES = [  # (kernel, stride, padding, dilation)
    (3, 1, 1, 1), (3, 2, 1, 1), (5, 2, 2, 1), (7, 2, 3, 1), (7, 1, 0, 1), (5, 1, 2, 2),
]


@pytest.mark.parametrize("k,stride,padding,dilation", CASES)
@pytest.mark.parametrize("mask_channels", ["single", "multi"])
def test_matches_direct_implementation_of_eq_1_2(k, stride, padding, dilation, mask_channels):
    gen = torch.Generator().manual_seed(k * 100 + stride * 10 + padding)
    c_in, c_out = 3, 4
    x = torch.randn(2, c_in, 13, 12, generator=gen, dtype=torch.float64)
    mask = random_mask(2, 1 if mask_channels == "single" else c_in, 13, 12, gen)
    layer = make_layer(c_in, c_out, k, stride, padding, dilation)
    out, new_mask = layer(x, mask)
    ref_out, ref_mask = reference_pconv(x, mask, layer.weight, layer.bias, stride, padding, dilation)
    assert out.shape == ref_out.shape and new_mask.shape == ref_mask.shape == (2, 1, *out.shape[2:])
    # the data covers every branch of eq. 1: all-hole windows and partially valid windows
    assert (ref_mask == 0).any() and (ref_mask == 1).any()
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    assert torch.equal(new_mask, ref_mask)
    assert torch.equal(out[(new_mask == 0).expand_as(out)], torch.zeros(int((new_mask == 0).sum()) * c_out,
                                                                       dtype=out.dtype))


def test_multi_channel_mask_counts_every_channel():
    """A hole in one channel only lowers sum(M) for the window: the N×C mask is not reduced to N×1."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 6, 6, generator=gen, dtype=torch.float64)
    mask = torch.ones(1, 3, 6, 6, dtype=torch.float64)
    mask[0, 1] = 0  # channel 1 entirely missing
    layer = make_layer(3, 2, 3, 1, 1)
    out, new_mask = layer(x, mask)
    ref, _ = reference_pconv(x, mask, layer.weight, layer.bias, 1, 1)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert torch.equal(new_mask, torch.ones_like(new_mask))
    single, _ = layer(x, mask[:, :1])  # the same mask as N×1 would use channel 1's values
    assert not torch.allclose(out, single)


def test_all_hole_windows_are_exactly_zero_including_bias():
    layer = make_layer(3, 5, 3, 1, 1)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    out, new_mask = layer(x, torch.zeros(2, 1, 8, 8, dtype=torch.float64))
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(new_mask, torch.zeros_like(new_mask))


def test_all_valid_without_padding_equals_plain_convolution():
    layer = make_layer(4, 6, 5, 2, 0)
    x = torch.randn(2, 4, 15, 15, dtype=torch.float64)
    out, new_mask = layer(x, torch.ones(2, 1, 15, 15, dtype=torch.float64))
    torch.testing.assert_close(out, F.conv2d(x, layer.weight, layer.bias, stride=2), rtol=1e-12, atol=1e-12)
    assert torch.equal(new_mask, torch.ones_like(new_mask))


def test_border_counts_as_hole():
    """With an all-valid mask, a corner window of a 3×3/pad-1 conv sees 4 of 9 pixels: scaled by 9/4."""
    layer = make_layer(2, 3, 3, 1, 1)
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    out, new_mask = layer(x, torch.ones(1, 1, 6, 6, dtype=torch.float64))
    plain = F.conv2d(x, layer.weight, None, padding=1)
    b = layer.bias.view(1, -1)
    torch.testing.assert_close(out[:, :, 0, 0], plain[:, :, 0, 0] * 9 / 4 + b)      # corner: 4 valid
    torch.testing.assert_close(out[:, :, 0, 3], plain[:, :, 0, 3] * 9 / 6 + b)      # edge: 6 valid
    torch.testing.assert_close(out[:, :, 2:4, 2:4], plain[:, :, 2:4, 2:4] + b.view(1, -1, 1, 1))  # interior
    assert torch.equal(new_mask, torch.ones_like(new_mask))


def test_gradients_flow_to_input_and_weights_and_skip_holes():
    gen = torch.Generator().manual_seed(3)
    layer = make_layer(3, 4, 3, 2, 1)
    x = torch.randn(2, 3, 10, 10, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = random_mask(2, 1, 10, 10, gen)
    out, _ = layer(x, mask)
    (out * torch.randn_like(out)).sum().backward()
    grads = (x.grad.clone(), layer.weight.grad.clone(), layer.bias.grad.clone())
    assert grads[0].abs().sum() > 0 and grads[1].abs().sum() > 0
    # the output never depends on hole pixels, so their gradient is exactly zero
    assert torch.equal(grads[0] * (1 - mask), torch.zeros_like(grads[0]))
    # and gradients match those of the direct implementation
    x2 = x.detach().clone().requires_grad_(True)
    w2, b2 = layer.weight.detach().clone().requires_grad_(True), layer.bias.detach().clone().requires_grad_(True)
    torch.manual_seed(0)
    ref, _ = reference_pconv(x2, mask, w2, b2, 2, 1)
    g = torch.Generator().manual_seed(9)
    upstream = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    (ref * upstream).sum().backward()
    layer.zero_grad()
    x.grad = None
    out, _ = layer(x, mask)
    (out * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(layer.weight.grad, w2.grad)
    torch.testing.assert_close(layer.bias.grad, b2.grad)


def test_no_state_kept_between_calls():
    gen = torch.Generator().manual_seed(4)
    layer = make_layer(3, 4, 3, 1, 1)
    before_attrs = set(vars(layer))
    before_buffers, before_params = dict(layer.named_buffers()), dict(layer.named_parameters())
    x = torch.randn(1, 3, 9, 9, generator=gen, dtype=torch.float64)
    m1, m2 = random_mask(1, 1, 9, 9, gen), random_mask(1, 1, 9, 9, gen)
    m2[0, 0, :, 4:] = 0
    out1, nm1 = layer(x, m1)
    out2, nm2 = layer(x, m2)
    out1b, nm1b = layer(x, m1)
    assert torch.equal(out1, out1b) and torch.equal(nm1, nm1b)
    assert not torch.equal(out1, out2)
    fresh = copy.deepcopy(make_layer(3, 4, 3, 1, 1))
    out2_fresh, _ = fresh(x, m2)
    assert torch.equal(out2, out2_fresh)  # the second call did not depend on the first
    assert set(vars(layer)) == before_attrs
    assert dict(layer.named_buffers()).keys() == before_buffers.keys()
    assert dict(layer.named_parameters()).keys() == before_params.keys()


@pytest.mark.parametrize("mask_channels", [1, 16])
@pytest.mark.parametrize("dilation", [1, 2])
def test_mask_path_is_not_a_second_full_convolution(mask_channels, dilation):
    """One C_in×C_out convolution per call; the mask path at most convolves a single channel, with no backward."""
    layer = PartialConv2d(16, 32, 3, stride=2, padding=1, dilation=dilation)
    x = torch.randn(2, 16, 12, 12, requires_grad=True)
    mask = (torch.rand(2, mask_channels, 12, 12) > 0.3).float()
    with ConvRecorder() as rec:
        out, _ = layer(x, mask)
        out.sum().backward()
    full = [s for s in rec.forward if s[:2] != (1, 1)]
    assert full == [(32, 16, 3, 3)], rec.forward
    # dilation needs the convolution-of-ones window sum; otherwise sum pooling is used
    assert rec.forward.count((1, 1, 3, 3)) == (dilation > 1), rec.forward
    assert rec.backward == [(32, 16, 3, 3)]


def test_window_sum_paths_agree():
    """Sum pooling and the convolution of ones give the same exact integer sums."""
    layer = PartialConv2d(4, 4, 5, stride=2, padding=2)
    count = torch.randint(0, 5, (2, 1, 11, 11)).float()
    ones = torch.ones(1, 1, 5, 5)
    assert torch.equal(layer.window_sum(count), F.conv2d(count, ones, stride=2, padding=2))


def test_concatenation_equals_multi_channel_mask():
    """cat_masked of parts with different N×1 masks == one N×C mask made of each part's expanded mask."""
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(2, 5, 8, 8, generator=gen, dtype=torch.float64)
    b = torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64)
    ma, mb = random_mask(2, 1, 8, 8, gen), random_mask(2, 1, 8, 8, gen)
    mb[1, :, 4:, :] = 0
    layer = make_layer(8, 4, 3, 1, 1)
    fast, fast_mask = layer.forward_masked(cat_masked([MaskedInput.from_mask(a, ma), MaskedInput.from_mask(b, mb)]))
    full_mask = torch.cat([ma.expand(-1, 5, -1, -1), mb.expand(-1, 3, -1, -1)], dim=1)
    slow, slow_mask = layer(torch.cat([a, b], dim=1), full_mask)
    ref, ref_mask = reference_pconv(torch.cat([a, b], dim=1), full_mask, layer.weight, layer.bias, 1, 1)
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)
    assert torch.equal(fast_mask, slow_mask) and torch.equal(fast_mask, ref_mask)
    # the count really is channel-weighted: a plain N×1 union/average of the masks would differ
    unweighted, _ = layer(torch.cat([a, b], dim=1), (ma + mb) / 2)
    assert not torch.allclose(fast, unweighted)


def test_already_masked_input_is_exact():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(1, 3, 8, 8, generator=gen, dtype=torch.float64)
    m = random_mask(1, 1, 8, 8, gen)
    layer = make_layer(3, 2, 3, 1, 1)
    a, _ = layer(x, m)
    b, _ = layer.forward_masked(MaskedInput.from_mask(x * m, m, already_masked=True))
    assert torch.equal(a, b)


def test_ratio_is_exact_under_bf16_autocast():
    """Window sums up to C_in·k² are not representable in bf16; the mask path must run in fp32."""
    layer = PartialConv2d(64, 8, 5, padding=2)
    assert torch.tensor(1599.0, dtype=torch.bfloat16).item() != 1599.0  # the case below needs fp32
    mask = torch.ones(1, 64, 10, 10)
    mask[0, 7, 5, 5] = 0  # one entry of one channel: windows around (5, 5) hold 1599 of 1600
    count = MaskedInput.from_mask(torch.zeros(1, 64, 10, 10), mask).count
    scale32, nm32 = layer.mask_update(count)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scale16, nm16 = layer.mask_update(count)
        out, new_mask = layer(torch.randn(1, 64, 10, 10), mask)
    assert scale16.dtype == torch.float32 and torch.equal(scale16, scale32) and torch.equal(nm16, nm32)
    assert scale32[0, 0, 5, 5].item() == pytest.approx(1600 / 1599, rel=1e-7)
    assert out.dtype == torch.bfloat16 and new_mask.dtype == torch.float32
    assert torch.isfinite(out.float()).all()


def test_channels_last_input():
    gen = torch.Generator().manual_seed(7)
    layer = PartialConv2d(8, 16, 3, stride=2, padding=1)
    x = torch.randn(2, 8, 12, 12, generator=gen)
    mask = (torch.rand(2, 1, 12, 12, generator=gen) > 0.4).float()
    ref, ref_mask = layer(x, mask)
    layer_cl = copy.deepcopy(layer).to(memory_format=torch.channels_last)
    out, new_mask = layer_cl(x.contiguous(memory_format=torch.channels_last),
                             mask.contiguous(memory_format=torch.channels_last))
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(new_mask, ref_mask)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="groups=1"):
        PartialConv2d(4, 4, 3, groups=2)
    with pytest.raises(ValueError, match="padding_mode"):
        PartialConv2d(4, 4, 3, padding=1, padding_mode="reflect")
    layer = PartialConv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"N×1×H×W or N×C×H×W"):
        layer(x, torch.ones(2, 2, 8, 8))
    with pytest.raises(ValueError, match=r"N×1×H×W or N×C×H×W"):
        layer(x, torch.ones(2, 1, 8, 7))
    with pytest.raises(ValueError, match=r"expected N×3×H×W"):
        layer(torch.randn(2, 5, 8, 8), torch.ones(2, 1, 8, 8))
    with pytest.raises(ValueError, match="at least one part"):
        cat_masked([])


# ---- GatedConv2d -----------------------------------------------------------------------------------------------

def make_gated(c_in: int, c_out: int, k: int, stride: int, padding: int, bias: bool = True,
               activation=None) -> GatedConv2d:
    torch.manual_seed(2)
    return GatedConv2d(c_in, c_out, k, stride=stride, padding=padding, bias=bias, activation=activation).double()


@pytest.mark.parametrize("k", [1, 3, 5, 7])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("mask_channels", [1, 3])
def test_gated_shapes_match_partial(k, stride, mask_channels):
    gen = torch.Generator().manual_seed(k + 10 * stride)
    x = torch.randn(2, 3, 13, 12, generator=gen, dtype=torch.float64)
    mask = random_mask(2, mask_channels, 13, 12, gen)
    gated = make_gated(3, 5, k, stride, k // 2)
    partial = make_layer(3, 5, k, stride, k // 2)
    out, new_mask = gated(x, mask)
    p_out, p_mask = partial(x, mask)
    assert out.shape == p_out.shape == (2, 5, *p_out.shape[2:])
    assert new_mask.shape == p_mask.shape and new_mask.dtype == p_mask.dtype
    assert torch.equal(new_mask, torch.ones_like(new_mask))  # no mask update rule: every output pixel is valid
    assert (gated.in_channels, gated.out_channels, gated.kernel_size, gated.stride) == \
        (partial.in_channels, partial.out_channels, partial.kernel_size, partial.stride)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("k", [(3, 3), (5, 3), (7, 7)])
def test_gated_parameter_count(bias, k):
    """Gated = 2·C_out·(C_in+1)·kh·kw (+ 2·C_out with bias) = 2 × partial + 2·C_out·kh·kw."""
    c_in, c_out = 6, 4
    kh, kw = k
    gated = GatedConv2d(c_in, c_out, k, bias=bias)
    partial = PartialConv2d(c_in, c_out, k, bias=bias)
    n_gated = sum(p.numel() for p in gated.parameters())
    n_partial = sum(p.numel() for p in partial.parameters())
    assert n_partial == c_out * c_in * kh * kw + (c_out if bias else 0)
    assert n_gated == 2 * c_out * (c_in + 1) * kh * kw + (2 * c_out if bias else 0)
    assert n_gated == 2 * n_partial + 2 * c_out * kh * kw


def test_gated_gradients_reach_both_convs_and_the_input():
    gen = torch.Generator().manual_seed(11)
    layer = make_gated(3, 4, 3, 2, 1, activation=F.relu)
    x = torch.randn(2, 3, 10, 10, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = random_mask(2, 1, 10, 10, gen)
    out, _ = layer(x, mask)
    (out * torch.randn(out.shape, generator=gen, dtype=torch.float64)).sum().backward()
    w, b = layer.conv.weight.grad, layer.conv.bias.grad
    for half in (slice(0, 4), slice(4, 8)):  # Conv_f, then Conv_g
        assert w[half].abs().sum() > 0 and b[half].abs().sum() > 0
    assert w[:, 3].abs().sum() > 0  # the mask channel's weights learn too
    assert x.grad.abs().sum() > 0
    # the layer sees X⊙M: hole pixels get exactly zero gradient, as with PartialConv2d
    assert torch.equal(x.grad * (1 - mask), torch.zeros_like(x.grad))


def test_gated_matches_hand_computed_case():
    """1×1 kernel, C_in = C_out = 1, LeakyReLU(0.2) as φ: O = φ(f)·σ(g) at each pixel, computed by hand."""
    layer = GatedConv2d(1, 1, 1, activation=lambda t: F.leaky_relu(t, 0.2)).double()
    with torch.no_grad():
        # rows: Conv_f, Conv_g; columns: the feature channel x, the mask channel m
        layer.conv.weight.copy_(torch.tensor([[2.0, 1.0], [0.5, -1.0]], dtype=torch.float64).view(2, 2, 1, 1))
        layer.conv.bias.copy_(torch.tensor([-1.0, 0.25], dtype=torch.float64))
    x = torch.tensor([3.0, -2.0, 1.0], dtype=torch.float64).view(1, 1, 1, 3)
    mask = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64).view(1, 1, 1, 3)
    out, new_mask = layer(x, mask)

    def sigmoid(v: float) -> float:
        return 1.0 / (1.0 + math.exp(-v))
    # pixel 0: x=3, m=1 -> f = 2·3 + 1 - 1 = 6,   g = 0.5·3 - 1 + 0.25 = 0.75,  φ(6) = 6
    # pixel 1: hole, X⊙M = 0, m=0 -> f = -1,     g = 0.25,                     φ(-1) = -0.2
    # pixel 2: x=1, m=1 -> f = 2 + 1 - 1 = 2,     g = 0.5 - 1 + 0.25 = -0.25,   φ(2) = 2
    expected = [6.0 * sigmoid(0.75), -0.2 * sigmoid(0.25), 2.0 * sigmoid(-0.25)]
    assert out.view(-1).tolist() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert torch.equal(new_mask, torch.ones(1, 1, 1, 3, dtype=torch.float64))
    feature, gate = layer.branches(MaskedInput.from_mask(x, mask))
    assert feature.view(-1).tolist() == pytest.approx([6.0, -1.0, 2.0])
    assert gate.view(-1).tolist() == pytest.approx([sigmoid(0.75), sigmoid(0.25), sigmoid(-0.25)])


def test_gate_is_strictly_between_zero_and_one():
    gen = torch.Generator().manual_seed(12)
    layer = make_gated(4, 6, 3, 1, 1)
    x = torch.randn(2, 4, 9, 9, generator=gen, dtype=torch.float64) * 3
    _, gate = layer.branches(MaskedInput.from_mask(x, random_mask(2, 1, 9, 9, gen)))
    assert gate.min() > 0 and gate.max() < 1
    assert gate.std() > 0.01  # a real gate, not a constant


def test_activation_after_the_layer_equals_phi_inside_it():
    """ReLU/LeakyReLU are positively homogeneous and σ > 0, so the U-Net block's activation after the layer is φ."""
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64)
    mask = random_mask(2, 1, 8, 8, gen)
    for phi in (F.relu, lambda t: F.leaky_relu(t, 0.2)):
        inside, _ = make_gated(3, 4, 3, 2, 1, activation=phi)(x, mask)
        after, _ = make_gated(3, 4, 3, 2, 1)(x, mask)
        torch.testing.assert_close(inside, phi(after), rtol=1e-12, atol=1e-12)


def test_gated_mask_channel_matters_and_hole_content_does_not():
    gen = torch.Generator().manual_seed(14)
    layer = make_gated(3, 4, 3, 1, 1)
    x = torch.randn(1, 3, 8, 8, generator=gen, dtype=torch.float64)
    m1 = (torch.rand(1, 1, 8, 8, generator=gen) > 0.2).double()
    m2 = m1.clone()
    m2[0, 0, 2:6, 2:6] = 0
    assert not torch.equal(m1, m2)
    # same masked features X⊙M, only the mask channel differs: zero x where the masks differ
    x0 = x * (1 - (m1 - m2))
    values = x0 * m2
    a, _ = layer.forward_masked(MaskedInput.from_mask(values, m1, already_masked=True))
    b, _ = layer.forward_masked(MaskedInput.from_mask(values, m2, already_masked=True))
    assert torch.equal(x0 * m1, x0 * m2)
    assert not torch.allclose(a, b)
    # and through forward(x, mask) too
    assert not torch.allclose(layer(x, m1)[0], layer(x, m2)[0])
    # the content of hole pixels never matters (the layer sees X⊙M)
    noisy = x + (1 - m1) * torch.randn(x.shape, generator=gen, dtype=torch.float64) * 100
    assert torch.equal(layer(x, m1)[0], layer(noisy, m1)[0])


def test_gated_multi_channel_mask_enters_as_its_channel_mean():
    gen = torch.Generator().manual_seed(15)
    layer = make_gated(3, 2, 3, 1, 1)
    x = torch.randn(1, 3, 7, 7, generator=gen, dtype=torch.float64)
    mask = random_mask(1, 3, 7, 7, gen)
    out, _ = layer(x, mask)
    inp = torch.cat([x * mask, mask.mean(dim=1, keepdim=True)], dim=1)
    torch.testing.assert_close(out, layer.conv(inp)[:, :2] * torch.sigmoid(layer.conv(inp)[:, 2:]),
                               rtol=1e-12, atol=1e-12)


def test_gated_keeps_no_state_and_works_on_concatenations():
    gen = torch.Generator().manual_seed(16)
    layer = make_gated(8, 4, 3, 1, 1)
    before_attrs = set(vars(layer))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    a = torch.randn(2, 5, 8, 8, generator=gen, dtype=torch.float64)
    b = torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64)
    ma, mb = random_mask(2, 1, 8, 8, gen), random_mask(2, 1, 8, 8, gen)
    inp = cat_masked([MaskedInput.from_mask(a, ma), MaskedInput.from_mask(b, mb)])
    out1, _ = layer.forward_masked(inp)
    layer(torch.randn(2, 8, 8, 8, generator=gen, dtype=torch.float64), torch.zeros(2, 1, 8, 8, dtype=torch.float64))
    out2, _ = layer.forward_masked(inp)
    assert torch.equal(out1, out2)
    assert set(vars(layer)) == before_attrs
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())
    # a concatenation equals the multi-channel mask, whose channel mean is the mask channel
    full_mask = torch.cat([ma.expand(-1, 5, -1, -1), mb.expand(-1, 3, -1, -1)], dim=1)
    slow, _ = layer(torch.cat([a, b], dim=1), full_mask)
    torch.testing.assert_close(out1, slow, rtol=1e-12, atol=1e-12)


def test_gated_under_bf16_autocast():
    layer = GatedConv2d(8, 4, 3, stride=2, padding=1)
    x, mask = torch.randn(2, 8, 10, 10), (torch.rand(2, 1, 10, 10) > 0.3).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, new_mask = layer(x, mask)
    assert out.dtype == torch.bfloat16 and new_mask.dtype == torch.float32
    assert out.shape == (2, 4, 5, 5) and torch.isfinite(out.float()).all()


def test_gated_is_a_drop_in_for_partial_in_the_unet():
    """Swapping every PartialConv2d of the U-Net for a GatedConv2d of the same arguments keeps the net working."""
    from pconv.core.unet import PConvUNet

    torch.manual_seed(17)
    net = PConvUNet(layer_size=3)
    swapped = 0
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, PartialConv2d):
                setattr(parent, name, make_conv("gated", child.in_channels, child.out_channels, child.kernel_size,
                                                stride=child.stride, padding=child.padding,
                                                bias=child.bias is not None))
                swapped += 1
    assert swapped == 6 and not any(isinstance(m, PartialConv2d) for m in net.modules())
    net.eval()
    image = torch.rand(2, 3, 16, 16)
    mask = torch.ones(2, 1, 16, 16)
    mask[:, :, 4:12, 4:12] = 0
    out, out_mask = net(image, mask)
    assert out.shape == (2, 3, 16, 16) and torch.equal(out_mask, torch.ones_like(out_mask))
    noisy = image + (1 - mask) * torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(net(noisy, mask)[0], out, rtol=0, atol=0)  # hole content never matters
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_make_conv_builds_each_kind_and_rejects_typos():
    assert CONV_TYPES == ("partial", "gated")
    p = make_conv("partial", 3, 8, 5, stride=2, padding=2, bias=False)
    g = make_conv("gated", 3, 8, 5, stride=2, padding=2, bias=False)
    assert type(p) is PartialConv2d and type(g) is GatedConv2d
    assert p.bias is None and g.conv.bias is None
    assert (p.kernel_size, p.stride, p.padding) == (g.kernel_size, g.stride, g.padding) == ((5, 5), (2, 2), (2, 2))
    with pytest.raises(ValueError, match=r"'gatd'.*valid choices: partial, gated"):
        make_conv("gatd", 3, 8, 3)
    with pytest.raises(ValueError, match="valid choices"):
        make_conv("Partial", 3, 8, 3)


def test_gated_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="groups=1"):
        GatedConv2d(4, 4, 3, groups=2)
    with pytest.raises(ValueError, match="padding_mode"):
        GatedConv2d(4, 4, 3, padding=1, padding_mode="reflect")
    layer = GatedConv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"N×1×H×W or N×C×H×W"):
        layer(x, torch.ones(2, 2, 8, 8))
    with pytest.raises(ValueError, match=r"GatedConv2d: expected N×3×H×W"):
        layer(torch.randn(2, 5, 8, 8), torch.ones(2, 1, 8, 8))
    with pytest.raises(ValueError, match="channel count must be N×1×H×W"):
        layer.forward_masked(MaskedInput(x, torch.ones(2, 1, 8, 7)))
