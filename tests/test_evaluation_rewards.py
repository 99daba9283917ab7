"""Reward models on tiny, locally built models saved in the formats the real weights use."""

import re
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from ncppo.errors import MissingDependencyError
from ncppo.evaluation import make_reward
from ncppo.evaluation.clip_rewards import MissingWeightsError, aesthetic_head
from ncppo.evaluation.open_clip_convert import open_clip_to_transformers


def _tiny_clip(seed=0):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, vocab_size=400,
                max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)).eval()


def _processor():
    from transformers import CLIPImageProcessor, CLIPProcessor

    from ncppo.models.tiny import train_clip_tokenizer

    return CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                         tokenizer=train_clip_tokenizer(vocab_size=400))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip")
    _tiny_clip().save_pretrained(path)
    _processor().save_pretrained(path)
    return path


def _images(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(n)]


PROMPTS = ["a red circle", "a blue square on a white background", "a cat"]


def test_pickscore_is_logit_scale_times_cosine(clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    reward = make_reward("pickscore", str(clip_dir))
    scores = reward(_images(), PROMPTS)
    # transformers' own forward: logits_per_image = logit_scale.exp() * normalised image @ normalised text
    model, processor = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)
    inputs = processor(text=PROMPTS, images=_images(), return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model(**inputs).logits_per_image.diagonal().numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4)
    clip = make_reward("clip", str(clip_dir))(_images(), PROMPTS)
    np.testing.assert_allclose(clip, 100 * np.maximum(expected / model.logit_scale.exp().item(), 0), rtol=1e-4, atol=1e-4)


def test_aesthetic_head_on_the_normalised_image_embedding(clip_dir, tmp_path):
    import shutil

    from transformers import CLIPModel

    folder = tmp_path / "aesthetic"
    shutil.copytree(clip_dir, folder)
    torch.manual_seed(1)
    head = aesthetic_head(32)
    state = {f"layers.{k}": v for k, v in head.state_dict().items()}
    torch.save(state, folder / "sac+logos+ava1-l14-linearMSE.pth")  # the predictor's own file format
    scores = make_reward("aesthetic", str(folder))(_images(), PROMPTS)
    model = CLIPModel.from_pretrained(clip_dir).eval()
    from ncppo.evaluation.clip_rewards import ClipReward

    embed, _ = ClipReward(model, _processor()).embed(_images(), None)
    with torch.no_grad():
        np.testing.assert_allclose(scores, head.eval()(embed).squeeze(-1).numpy(), rtol=1e-5, atol=1e-6)
    assert torch.allclose(embed.norm(dim=-1), torch.ones(3))
    (folder / "second.pth").write_bytes(b"")
    with pytest.raises(MissingWeightsError, match="exactly one head file"):
        make_reward("aesthetic", str(folder))


def test_missing_weights_say_what_is_expected(tmp_path):
    with pytest.raises(MissingWeightsError, match="needs --weights"):
        make_reward("pickscore")
    with pytest.raises(MissingWeightsError, match="does not exist"):
        make_reward("hpsv2", str(tmp_path / "nope.pt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingWeightsError, match="config.json"):
        make_reward("clip", str(tmp_path / "empty"))
    with pytest.raises((ValueError, MissingDependencyError), match="ImageReward package|does not exist|needs"):
        make_reward("imagereward", str(tmp_path / "ImageReward.pt"))


# -- a reference open_clip ViT, written from open_clip's published architecture, for the conversion test --
class _Block(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=nn.GELU(),
                                             c_proj=nn.Linear(4 * width, width)))

    def forward(self, x, mask=None):  # (L, N, W), sequence first as open_clip
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class _Transformer(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.resblocks = nn.ModuleList(_Block(width, heads) for _ in range(layers))

    def forward(self, x, mask=None):
        for block in self.resblocks:
            x = block(x, mask)
        return x


class _Visual(nn.Module):
    def __init__(self, width=128, layers=2, patch=8, image=32, embed=48):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * 0.1)
        self.positional_embedding = nn.Parameter(torch.randn((image // patch) ** 2 + 1, width) * 0.1)
        self.ln_pre, self.ln_post = nn.LayerNorm(width), nn.LayerNorm(width)
        self.transformer = _Transformer(width, layers, width // 64)
        self.proj = nn.Parameter(torch.randn(width, embed) * 0.1)

    def forward(self, x):
        x = self.conv1(x).flatten(2).permute(0, 2, 1)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x).permute(1, 0, 2)).permute(1, 0, 2)
        return self.ln_post(x[:, 0]) @ self.proj


class _OpenClip(nn.Module):
    def __init__(self, vocab=300, context=16, width=128, layers=2, embed=48):
        super().__init__()
        self.visual = _Visual(embed=embed)
        self.transformer = _Transformer(width, layers, width // 64)
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.randn(context, width) * 0.1)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.randn(width, embed) * 0.1)
        self.logit_scale = nn.Parameter(torch.tensor(np.log(1 / 0.07), dtype=torch.float32))
        self.register_buffer("attn_mask", torch.full((context, context), float("-inf")).triu(1), persistent=False)

    def encode_text(self, text):
        x = self.token_embedding(text) + self.positional_embedding
        x = self.transformer(x.permute(1, 0, 2), self.attn_mask).permute(1, 0, 2)
        return self.ln_final(x)[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection


def test_open_clip_conversion_reproduces_the_source_model():
    torch.manual_seed(0)
    source = _OpenClip().eval()
    with torch.no_grad():  # non-trivial norms and biases, so a swapped name cannot go unnoticed
        for name, p in source.named_parameters():
            if name.endswith("bias") or "ln" in name:
                p.add_(torch.randn_like(p) * 0.1)
    converted = open_clip_to_transformers({k: v.clone() for k, v in source.state_dict().items()})
    pixels = torch.randn(2, 3, 32, 32)
    eot = 299  # the highest id, as open_clip's tokenizer: argmax pooling finds it
    text = torch.zeros(2, 16, dtype=torch.long)
    text[0, :5] = torch.tensor([298, 5, 17, 40, eot])
    text[1, :3] = torch.tensor([298, 9, eot])
    with torch.no_grad():
        image_ref, text_ref = source.visual(pixels), source.encode_text(text)
        image_out = converted.get_image_features(pixel_values=pixels)
        text_out = converted.get_text_features(input_ids=text)
    image_out = image_out if isinstance(image_out, torch.Tensor) else image_out.pooler_output
    text_out = text_out if isinstance(text_out, torch.Tensor) else text_out.pooler_output
    torch.testing.assert_close(image_out, image_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(text_out, text_ref, rtol=1e-4, atol=1e-5)
    assert converted.logit_scale.item() == pytest.approx(source.logit_scale.item())


def test_hpsv2_loads_an_open_clip_checkpoint_folder(tmp_path):
    torch.manual_seed(0)
    source = _OpenClip(vocab=400).eval()
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}},
               tmp_path / "HPS_v2.1_compressed.pt")  # HPSv2's released layout (DDP names)
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        make_reward("hpsv2", str(tmp_path))
    _processor().tokenizer.save_pretrained(tmp_path)
    scores = make_reward("hpsv2", str(tmp_path))(_images(), PROMPTS)
    assert scores.shape == (3,) and np.all(np.abs(scores) <= 1.0 + 1e-6)
    (tmp_path / "not_clip.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="expected one open_clip checkpoint"):
        make_reward("hpsv2", str(tmp_path))


@pytest.mark.parametrize("reward", ["pickscore", "clip", "aesthetic"])
def test_a_partial_weights_folder_is_one_line_naming_what_is_missing(clip_dir, tmp_path, capsys, reward):
    import json
    import shutil

    from ncppo.cli import main

    def partial(name, drop=(), keep_index=False):
        folder = tmp_path / name
        shutil.copytree(clip_dir, folder)
        torch.save(aesthetic_head(32).state_dict(), folder / "head.pth")
        for f in drop:
            (folder / f).unlink()
        if keep_index:  # a sharded copy whose second shard never arrived
            (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
            (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
                "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
        return folder

    cases = {"model weights (model.safetensors": partial("no-weights", ["model.safetensors"]),
             "image processor config": partial("no-processor", ["processor_config.json"]),
             "lacks 1 of the 2 weight shards that model.safetensors.index.json lists (model-00002-of-00002":
                 partial("no-shard", keep_index=True)}
    for expected, folder in cases.items():
        with pytest.raises(MissingWeightsError, match=re.escape(expected)):
            make_reward(reward, str(folder))
        assert main(["score", "--reward", reward, "--weights", str(folder), str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"ncppo: error: {reward}: {folder}") and expected in err
    truncated = partial("truncated")
    (truncated / "model.safetensors").write_bytes((truncated / "model.safetensors").read_bytes()[:1000])
    assert main(["score", "--reward", reward, "--weights", str(truncated), str(tmp_path)]) == 2
    assert "damaged or truncated" in capsys.readouterr().err


def test_hpsv2_without_merges_or_with_a_truncated_checkpoint_is_named(tmp_path):
    from ncppo.errors import StateError

    (tmp_path / "vocab.json").write_text("{}")
    (tmp_path / "HPS_v2_compressed.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(MissingWeightsError, match="vocab.json without merges.txt"):
        make_reward("hpsv2", str(tmp_path))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(StateError, match="cannot be read as a torch checkpoint"):
        make_reward("hpsv2", str(tmp_path))
