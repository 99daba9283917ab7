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
