import pytest
import torch

from ncppo.models.tiny import tiny_unet
from ncppo.perception import FEATURE_CHOICES, NoiseConditionedEncoder, feature_names, perceptual_distance


def _inputs(unet, kind, n=3, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, unet.config.in_channels, size, size, generator=g)
    t = torch.tensor([0, 17, 999])[:n]
    ehs = torch.randn(n, 7, unet.config.cross_attention_dim, generator=g)
    added = None
    if kind == "sdxl":
        added = {"text_embeds": torch.randn(n, 16, generator=g),
                 "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]]).repeat(n, 1)}
    return x, t, ehs, added


def _hooked_forward(unet, x, t, ehs, added):
    """The tensors the full U-Net forward computes at conv_in, each down block and the mid block."""
    seen, handles = {}, []

    def keep(name):
        def hook(_module, _inp, out):
            seen[name] = out[0] if isinstance(out, tuple) else out
        return hook

    handles.append(unet.conv_in.register_forward_hook(keep("conv_in")))
    for i, block in enumerate(unet.down_blocks):
        handles.append(block.register_forward_hook(keep(f"down_{i}")))
    handles.append(unet.mid_block.register_forward_hook(keep("mid")))
    with torch.no_grad():
        unet(x, t, encoder_hidden_states=ehs, added_cond_kwargs=added)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("features", FEATURE_CHOICES)
def test_encoder_equals_full_forward_tensors(kind, features):
    unet = tiny_unet(kind, block_out_channels=(32, 64, 64)).eval()
    x, t, ehs, added = _inputs(unet, kind)
    expected = _hooked_forward(unet, x, t, ehs, added)
    with torch.no_grad():
        feats = NoiseConditionedEncoder(features)(unet, x, t, ehs, added)
    names = feature_names(features, len(unet.down_blocks))
    assert len(feats) == len(names)
    for name, f in zip(names, feats):
        torch.testing.assert_close(f, expected[name], atol=0, rtol=0)


def test_last_is_the_deepest_down_block_output():
    unet = tiny_unet("sd15", block_out_channels=(32, 64, 64)).eval()
    assert feature_names("last", len(unet.down_blocks)) == ["down_2"]
    x, t, ehs, _ = _inputs(unet, "sd15")
    (f,) = NoiseConditionedEncoder()(unet, x, t, ehs)
    assert f.shape == (3, 64, 4, 4)  # 16 -> two downsamplers -> 4


def test_gradient_reaches_input_and_not_weights(kind):
    unet = tiny_unet(kind).eval().requires_grad_(False)
    x, t, ehs, added = _inputs(unet, kind)
    x.requires_grad_(True)
    feats = NoiseConditionedEncoder("last+mid")(unet, x, t, ehs, added)
    sum(f.pow(2).mean() for f in feats).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in unet.parameters())


def test_sdxl_without_added_conditions_is_an_error():
    unet = tiny_unet("sdxl").eval()
    x, t, ehs, _ = _inputs(unet, "sdxl")
    with pytest.raises(ValueError, match="SDXL-class U-Net needs added_cond_kwargs"):
        NoiseConditionedEncoder()(unet, x, t, ehs, None)


def test_bad_feature_choice_and_shapes():
    with pytest.raises(ValueError, match="unknown perceptual feature choice 'middle'"):
        NoiseConditionedEncoder("middle")
    unet = tiny_unet("sd15").eval()
    x, t, ehs, _ = _inputs(unet, "sd15")
    with pytest.raises(ValueError, match=r"\(N, 4, H, W\)"):
        NoiseConditionedEncoder()(unet, x[:, :3], t, ehs)
    with pytest.raises(ValueError, match="2 levels"):
        NoiseConditionedEncoder("last+mid", level_weights=(1.0,))(unet, x, t, ehs)


def test_perceptual_distance_hand_computed():
    a = [torch.zeros(2, 1, 2, 2), torch.zeros(2, 3)]
    b = [torch.ones(2, 1, 2, 2) * torch.tensor([1.0, 2.0]).view(2, 1, 1, 1), torch.full((2, 3), 3.0)]
    # level MSEs: [1, 4] and [9, 9]; equal weights average them
    torch.testing.assert_close(perceptual_distance(a, b), torch.tensor([5.0, 6.5]))
    torch.testing.assert_close(perceptual_distance(a, b, [3.0, 1.0]), torch.tensor([3.0, 5.25]))
    with pytest.raises(ValueError):
        perceptual_distance(a, b[:1])


def test_level_norms_hand_computed():
    a = [torch.zeros(1, 2, 1, 2), torch.zeros(1, 4, 1, 1)]
    b = [torch.tensor([[[[1.0, 3.0]], [[0.0, 2.0]]]]), torch.full((1, 4, 1, 1), 2.0)]
    # channels: level 0 (2 channels) rescaled by C_last / C = 4 / 2 = 2 -> MSE x 4; level 1 unchanged
    plain = perceptual_distance(a, b)
    assert plain.item() == pytest.approx((((1 + 9 + 0 + 4) / 4) + 4) / 2)
    assert perceptual_distance(a, b, level_norm="channels").item() == pytest.approx((((1 + 9 + 4) / 4) * 4 + 4) / 2)
    # target: per channel, divided by the target's spatial std (ch0: std(1,3)=sqrt(2), ch1: std(0,2)=sqrt(2));
    # a level with one position has std 0 and is floored at 1e-6 -- so use a two-position level only
    level = perceptual_distance(a[:1], b[:1], level_norm="target").item()
    assert level == pytest.approx((1 + 9 + 0 + 4) / 2 / 4)
    with pytest.raises(ValueError, match="unknown level_norm 'batch'"):
        NoiseConditionedEncoder(level_norm="batch")


def test_all_plus_mid_is_every_down_block_and_the_mid_block():
    assert feature_names("all+mid", 3) == ["down_0", "down_1", "down_2", "mid"]


@pytest.mark.parametrize("level_norm", ["none", "target"])
def test_jvp_equals_the_exact_distance_to_first_order(kind, level_norm):
    """||J_f(x*) d||^2 from the forward-mode JVP equals the exact ||f(x* + h d) - f(x*)||^2 / h^2 as h -> 0,
    and its primal output is the encoder's own."""
    unet = tiny_unet(kind).eval().requires_grad_(False).double()
    x, t, ehs, added = _inputs(unet, kind)
    x, ehs = x.double(), ehs.double()
    if added:
        added = {k: v.double() for k, v in added.items()}
    d = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    enc = NoiseConditionedEncoder("all", level_norm=level_norm)
    primal, tangent = enc.jvp(unet, x, d, t, ehs, added)
    with torch.no_grad():
        target = enc(unet, x, t, ehs, added)
        for p, f in zip(primal, target):
            torch.testing.assert_close(p, f)
        h = 1e-5
        exact = enc.distance(enc(unet, x + h * d, t, ehs, added), target) / h**2
    torch.testing.assert_close(enc.tangent_distance(tangent, target), exact, rtol=1e-3, atol=0)
