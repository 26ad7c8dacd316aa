"""PConvUNet: the paper's architecture (Sec. 3.3, supplementary table), exact masks through the skips, BN freezing."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conv_recorder import ConvRecorder
from pconv.core.layers import MaskedInput
from pconv.core.unet import (PAPER_ENCODER, PConvUNet, build_model, decoder_spec, default_layer_size, encoder_spec,
                         min_image_size)


def make_mask(n: int, size: int, seed: int, channels: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mask = (torch.rand(n, channels, size, size, generator=gen) > 0.3).float()
    mask[:, :, size // 4: size // 2, size // 4: size // 2 + 5] = 0  # a large hole as well as speckle
    return mask


def randomise_bn(model: PConvUNet, seed: int) -> None:
    """Non-trivial BN statistics and affine parameters, so eval-mode BN is not the identity."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            c = module.num_features
            module.running_mean.copy_(torch.randn(c, generator=gen).to(module.running_mean.dtype) * 0.1)
            module.running_var.copy_(torch.rand(c, generator=gen).to(module.running_var.dtype) + 0.5)
            with torch.no_grad():
                module.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(c, generator=gen) * 0.1)


def reference_forward(model: PConvUNet, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The net written the paper's way with the model's own weights: every PConv gets the concatenated features
    (unmasked) and an explicitly materialised multi-channel mask; no pre-masking, no channel counts."""
    n, c_in = image.shape[:2]
    full_mask = mask.expand(-1, c_in, -1, -1) if mask.shape[1] == 1 else mask
    feats, masks = [image], [full_mask]
    h, m = image, full_mask
    for block in model.encoder:
        h, m1 = block.conv(h, m)
        if block.bn is not None:
            h = block.bn(h)
        h = F.relu(h)
        m = m1.expand(-1, h.shape[1], -1, -1)
        feats.append(h)
        masks.append(m)
    feats.pop()
    masks.pop()
    for i, block in enumerate(model.decoder):
        up = F.interpolate(h, scale_factor=2.0, mode="nearest")
        up_m = F.interpolate(m, scale_factor=2.0, mode="nearest")
        x = torch.cat([up, feats.pop()], dim=1)
        mm = torch.cat([up_m, masks.pop()], dim=1)
        h, m1 = block.conv(x, mm)
        if i < len(model.decoder) - 1:
            h = F.leaky_relu(block.bn(h), 0.2)
            m = m1.expand(-1, h.shape[1], -1, -1)
    return h, m1


def test_parameter_count_matches_paper_table():
    """Paper, supplementary table: 8 encoder + 8 decoder PConvs, ≈32.86 M parameters at 512 px."""
    encoder = [(3, 64, 7), (64, 128, 5), (128, 256, 5), (256, 512, 3)] + [(512, 512, 3)] * 4
    decoder = [(1024, 512)] * 4 + [(768, 256), (384, 128), (192, 64), (67, 3)]
    expected = sum(ci * co * k * k for ci, co, k in encoder) + sum(ci * co * 9 for ci, co in decoder)
    bn_channels = [co for _, co, _ in encoder[1:]] + [co for _, co in decoder[:-1]]
    expected += 2 * sum(bn_channels)  # BN gamma and beta
    expected += 64 + 3  # conv biases where no BN follows: first encoder and last decoder layer
    model = build_model(8)
    count = sum(p.numel() for p in model.parameters())
    assert count == expected
    assert round(count / 1e6, 2) == 32.86
    assert len(model.encoder) == 8 and len(model.decoder) == 8


def test_architecture_follows_the_table():
    model = PConvUNet(layer_size=8)
    for block, (k, c_out, bn) in zip(model.encoder, PAPER_ENCODER):
        assert block.conv.kernel_size == (k, k) and block.conv.stride == (2, 2) and block.conv.padding == (k // 2,) * 2
        assert block.conv.out_channels == c_out and (block.bn is not None) == bn
        assert (block.conv.bias is None) == bn
    ins = [d.conv.in_channels for d in model.decoder]
    outs = [d.conv.out_channels for d in model.decoder]
    assert ins == [1024, 1024, 1024, 1024, 768, 384, 192, 67]
    assert outs == [512, 512, 512, 512, 256, 128, 64, 3]
    assert all(d.conv.kernel_size == (3, 3) and d.conv.stride == (1, 1) for d in model.decoder)
    assert all(d.bn is not None for d in model.decoder[:-1])
    last = model.decoder[-1]
    assert last.bn is None and last.conv.bias is not None
    # the 256 px variant drops one 3×3/512 layer
    assert encoder_spec(7) == PAPER_ENCODER[:7]
    assert [s[2] for s in decoder_spec(7)] == [512, 512, 512, 256, 128, 64, 3]


@pytest.mark.parametrize("layer_size,h,w", [(4, 32, 32), (5, 64, 32)])
def test_output_shapes(layer_size, h, w):
    torch.manual_seed(0)
    model = PConvUNet(layer_size=layer_size)
    image = torch.rand(2, 3, h, w)
    mask = torch.ones(2, 1, h, w)
    mask[:, :, 4:12, 4:20] = 0
    out, out_mask = model(image, mask)
    assert out.shape == (2, 3, h, w) and out_mask.shape == (2, 1, h, w)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.equal(out_mask, torch.ones_like(out_mask))  # the holes are small enough to be filled


def test_output_is_invariant_to_hole_content():
    torch.manual_seed(0)
    model = PConvUNet(layer_size=5).train()  # train mode: batch statistics must not see the holes either
    image = torch.rand(2, 3, 64, 64)
    mask = make_mask(2, 64, seed=1)
    out1, m1 = model(image, mask)
    noisy = torch.where(mask.bool(), image, torch.randn(2, 3, 64, 64) * 100)
    out2, m2 = model(noisy, mask)
    assert torch.equal(out1, out2) and torch.equal(m1, m2)
    changed = image.clone()
    changed[:, :, 60, 60] += 0.5  # a valid pixel does change the output (the check above can fail)
    assert mask[:, :, 60, 60].all()
    out3, _ = model(changed, mask)
    assert not torch.equal(out1, out3)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_equals_the_multi_channel_formulation(mode):
    """The fast path (pre-masked features, channel counts) == the paper's net with materialised C-channel masks."""
    torch.manual_seed(0)
    model = PConvUNet(layer_size=4).double()
    randomise_bn(model, seed=2)
    reference = copy.deepcopy(model)
    model.train(mode == "train")
    reference.train(mode == "train")
    image = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    mask = make_mask(2, 32, seed=3).double()
    mask[1, :, :20, :20] = 0  # big enough that the first layers keep holes, so the skip masks differ
    out, out_mask = model(image, mask)
    ref, ref_mask = reference_forward(reference, image, mask)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    assert torch.equal(out_mask, ref_mask)


def test_decoder_layer_concat_equals_explicit_multi_channel_mask():
    """One decoder layer: features with different masks concatenated; fast path vs explicit N×C mask."""
    torch.manual_seed(0)
    model = PConvUNet(layer_size=4).double().eval()
    randomise_bn(model, seed=4)
    block = model.decoder[-2]  # 128 (from below) + 64 (skip) -> 64
    below = torch.randn(2, 128, 8, 8, dtype=torch.float64)
    below_mask = make_mask(2, 8, seed=5).double()
    skip = torch.randn(2, 64, 16, 16, dtype=torch.float64)
    skip_mask = make_mask(2, 16, seed=6).double()
    skip_mask[0, :, 8:, :] = 0
    fast, fast_mask = block(below * below_mask, below_mask, MaskedInput.from_mask(skip, skip_mask))
    up, up_mask = F.interpolate(below, scale_factor=2.0), F.interpolate(below_mask, scale_factor=2.0)
    full_mask = torch.cat([up_mask.expand(-1, 128, -1, -1), skip_mask.expand(-1, 64, -1, -1)], dim=1)
    slow, slow_mask = block.conv(torch.cat([up, skip], dim=1), full_mask)
    slow = F.leaky_relu(block.bn(slow), 0.2) * slow_mask
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-10)
    assert torch.equal(fast_mask, slow_mask)
    assert (slow_mask == 0).any()  # the check covered all-hole windows too


def test_multi_channel_input_mask_equals_expanded_single_channel():
    torch.manual_seed(0)
    model = PConvUNet(layer_size=4).eval()
    image = torch.rand(1, 3, 32, 32)
    mask = make_mask(1, 32, seed=7)
    out1, _ = model(image, mask)
    out2, _ = model(image, mask.expand(-1, 3, -1, -1).clone())
    torch.testing.assert_close(out1, out2, rtol=1e-6, atol=1e-6)


def test_freeze_encoder_bn():
    torch.manual_seed(0)
    model = PConvUNet(layer_size=4)
    image, mask = torch.rand(2, 3, 32, 32), make_mask(2, 32, seed=8)
    enc_bns = model.encoder_batch_norms()
    dec_bns = [b.bn for b in model.decoder if b.bn is not None]
    assert len(enc_bns) == 3 and len(dec_bns) == 3

    before = [bn.running_mean.clone() for bn in enc_bns]
    model.train()
    model(image, mask)
    assert all(not torch.equal(b, bn.running_mean) for b, bn in zip(before, enc_bns))  # unfrozen: stats move

    assert not model.encoder_bn_frozen
    model.freeze_encoder_bn()
    assert model.encoder_bn_frozen
    with pytest.raises(AttributeError):
        model.encoder_bn_frozen = False  # read-only
    model.train()  # must not re-enable the encoder BN
    assert model.training and all(not bn.training for bn in enc_bns) and all(bn.training for bn in dec_bns)
    enc_state = [{k: v.clone() for k, v in bn.state_dict().items()} for bn in enc_bns]
    dec_mean = [bn.running_mean.clone() for bn in dec_bns]
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        out, _ = model(image, mask)
        out.square().mean().backward()
    for state, bn in zip(enc_state, enc_bns):
        for key, value in bn.state_dict().items():
            assert torch.equal(value, state[key]), key  # running stats, counters and affine params unchanged
        assert not bn.weight.requires_grad and not bn.bias.requires_grad
        assert bn.weight.grad is None and bn.bias.grad is None
    assert all(not torch.equal(m, bn.running_mean) for m, bn in zip(dec_mean, dec_bns))
    assert all(bn.weight.grad is not None and bn.weight.requires_grad for bn in dec_bns)
    assert all(b.conv.weight.grad is not None for b in model.encoder)  # encoder convs still learn
    frozen_ids = {id(p) for bn in enc_bns for p in bn.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert not frozen_ids & {id(p) for p in trainable}
    # eval / train round trip keeps the freeze
    model.eval()
    model.train()
    assert all(not bn.training for bn in enc_bns)


def test_state_dict_round_trip_does_not_carry_the_freeze():
    """Documented choice: the freeze is training-procedure state (the checkpoint's phase), not in the state dict."""
    model = PConvUNet(layer_size=4).freeze_encoder_bn()
    fresh = PConvUNet(layer_size=4)
    fresh.load_state_dict(model.state_dict())  # strict: same keys whatever the phase
    assert set(fresh.state_dict()) == set(PConvUNet(layer_size=4).state_dict())
    assert not fresh.encoder_bn_frozen
    assert fresh.freeze_encoder_bn().encoder_bn_frozen


def test_layer_size_7_variant():
    torch.manual_seed(0)
    model = build_model(7)
    assert len(model.encoder) == 7 and [b.conv.out_channels for b in model.encoder][-1] == 512
    assert min_image_size(7) == 128
    image = torch.rand(2, 3, 128, 128)
    mask = make_mask(2, 128, seed=9)
    with torch.no_grad():
        out, out_mask = model(image, mask)
    assert out.shape == (2, 3, 128, 128) and out_mask.shape == (2, 1, 128, 128)
    assert torch.isfinite(out).all()


def test_channels_last_matches_contiguous():
    torch.manual_seed(0)
    model = PConvUNet(layer_size=4).eval()
    randomise_bn(model, seed=10)
    image, mask = torch.rand(2, 3, 32, 32), make_mask(2, 32, seed=11)
    ref, ref_mask = model(image, mask)
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    out, out_mask = model_cl(image.contiguous(memory_format=torch.channels_last),
                             mask.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(out_mask, ref_mask)


def test_bf16_autocast_on_cpu():
    torch.manual_seed(0)
    model = PConvUNet(layer_size=4).train()
    image, mask = torch.rand(2, 3, 32, 32), make_mask(2, 32, seed=12)
    ref, ref_mask = copy.deepcopy(model)(image, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, out_mask = model(image, mask)
    assert out.dtype == torch.bfloat16 and out_mask.dtype == torch.float32
    assert torch.isfinite(out.float()).all()
    assert torch.equal(out_mask, ref_mask)  # masks are computed exactly, whatever the compute dtype
    rel = (out.float() - ref).abs().mean() / ref.abs().mean()
    assert rel < 0.05
    out.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # invariance to hole content holds under autocast as well
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out2, _ = copy.deepcopy(model)(torch.where(mask.bool(), image, torch.rand_like(image)), mask)
        out3, _ = copy.deepcopy(model)(image, mask)
    assert torch.equal(out2, out3)


def test_one_full_convolution_per_layer():
    model = PConvUNet(layer_size=4)
    with ConvRecorder() as rec:
        out, _ = model(torch.rand(1, 3, 32, 32), make_mask(1, 32, seed=13))
        out.sum().backward()
    assert len(rec.forward) == 8, rec.forward  # 2·layer_size PConvs; the window sums are single-channel pooling
    assert all(s[:2] != (1, 1) for s in rec.forward)
    assert len(rec.backward) == 8


def test_default_layer_size_and_sizes():
    assert [default_layer_size(s) for s in (512, 256, 128, 64, 1024, 384)] == [8, 7, 6, 5, 8, 7]
    with pytest.raises(ValueError, match="not divisible by 2\\*\\*5"):
        default_layer_size(100)
    with pytest.raises(ValueError, match="too small"):
        default_layer_size(2)
    with pytest.raises(ValueError, match="integer"):
        default_layer_size(256.0)
    assert min_image_size(8) == 256
    for bad in (0, 9, True):
        with pytest.raises(ValueError, match="layer_size"):
            build_model(bad)


def test_bad_inputs_are_rejected():
    model = PConvUNet(layer_size=5)
    with pytest.raises(ValueError, match="multiple of 2\\*\\*layer_size = 32"):
        model(torch.rand(1, 3, 48, 48), torch.ones(1, 1, 48, 48))
    with pytest.raises(ValueError, match="mask must be"):
        model(torch.rand(1, 3, 64, 64), torch.ones(1, 2, 64, 64))
    with pytest.raises(ValueError, match="image must be"):
        model(torch.rand(1, 4, 64, 64), torch.ones(1, 1, 64, 64))
