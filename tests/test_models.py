import json

import pytest
import torch

from ncppo.batch import PreferenceBatch
from ncppo.models.loading import ModelLoadError, load_pipeline
from ncppo.models.preference_model import LoraSettings, PreferenceModel
from ncppo.models.tiny import build_tiny_pipeline, train_clip_tokenizer

from .conftest import perturb_lora, random_pairs


def _unet_out(unet, kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ehs = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    added = None
    if kind == "sdxl":
        added = {"text_embeds": torch.randn(2, 16, generator=g), "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)}
    with torch.no_grad():
        return unet(x, torch.tensor([10, 700]), encoder_hidden_states=ehs, added_cond_kwargs=added).sample



def test_tokenizer_is_offline_and_covers_every_byte():
    tok = train_clip_tokenizer()
    assert len(tok) > 256 + 2
    ids = tok("a red circle, ünïcode ☃", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77 and ids[0] == tok.bos_token_id
    assert tok.unk_token_id not in ids[1 : ids.index(tok.eos_token_id)]


def test_tokenizer_training_is_deterministic():
    # the BPE trainer numbers its alphabet in hash-set order; a cached base model keyed by its config
    # must not get other token ids on another run
    corpus = [f"a {c} {s} on a {b} background" for c in ("red", "green", "black") for s in ("circle", "square")
              for b in ("white", "blue")]
    vocabs = [train_clip_tokenizer(corpus, vocab_size=300).get_vocab() for _ in range(4)]
    assert all(v == vocabs[0] for v in vocabs[1:])


def test_tiny_pipelines_save_and_load(tiny_pipeline_dirs, kind):
    path = tiny_pipeline_dirs[kind]
    assert (path / "model_index.json").is_file()
    pipe = load_pipeline(path)
    assert type(pipe).__name__ == {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}[kind]
    image = pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3)


def test_loading_errors_are_clear(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        load_pipeline(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a diffusers pipeline directory"):
        load_pipeline(tmp_path / "weights.bin")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_pipeline(tmp_path / "missing" / "deeper" / "dir")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="offline.*local directory"):
        load_pipeline("someone/not-a-cached-model")


def test_unsupported_pipeline_class(tmp_path, tiny_pipeline_dirs):
    import shutil

    shutil.copytree(tiny_pipeline_dirs["sd15"], tmp_path / "p")
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionImg2ImgPipeline"
    (tmp_path / "p" / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="unsupported pipeline class StableDiffusionImg2ImgPipeline"):
        load_pipeline(tmp_path / "p")


def test_lora_disabled_equals_base_model_exactly(pipeline, kind):
    base = _unet_out(pipeline.unet, kind)
    model = PreferenceModel(pipeline, lora=LoraSettings(rank=4))
    perturb_lora(model.unet)
    with_lora = _unet_out(model.unet, kind)
    assert not torch.allclose(with_lora, base)
    with model.frozen_unet() as frozen:
        assert frozen is model.unet
        torch.testing.assert_close(_unet_out(frozen, kind), base, atol=0, rtol=0)
    torch.testing.assert_close(_unet_out(model.unet, kind), with_lora, atol=0, rtol=0)  # re-enabled
    trainable = model.trainable_parameters()
    assert trainable and all("lora" in n for n, p in model.unet.named_parameters() if p.requires_grad)


def test_lora_save_and_load_into_fresh_pipeline(tmp_path, tiny_pipeline_dirs, kind):
    model = PreferenceModel(load_pipeline(tiny_pipeline_dirs[kind]), lora=LoraSettings(rank=4, alpha=8))
    perturb_lora(model.unet, seed=1)
    trained = _unet_out(model.unet, kind)
    model.save_lora(tmp_path / "lora")
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    fresh = load_pipeline(tiny_pipeline_dirs[kind])
    before = _unet_out(fresh.unet, kind)
    fresh.load_lora_weights(tmp_path / "lora")
    torch.testing.assert_close(_unet_out(fresh.unet, kind), trained, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(before, trained)


def test_full_finetune_keeps_a_frozen_reference(pipeline, kind):
    base = _unet_out(pipeline.unet, kind)
    model = PreferenceModel(pipeline, finetune="full")
    assert model.lora is None and all(p.requires_grad for p in model.unet.parameters())
    with torch.no_grad():
        for p in model.unet.parameters():
            p.add_(0.01)
    with model.frozen_unet() as frozen:
        assert frozen is not model.unet
        assert not any(p.requires_grad for p in frozen.parameters())
        torch.testing.assert_close(_unet_out(frozen, kind), base, atol=0, rtol=0)
    with pytest.raises(ValueError, match="save_unet"):
        model.save_lora("unused")


def test_bad_batches_are_rejected(pipeline, kind):
    model = PreferenceModel(pipeline, lora=LoraSettings(rank=2))
    good = model.encode_batch(random_pairs())
    lw, ll = good.latents_w, good.latents_l
    embeds = good.condition_w.encoder_hidden_states
    with pytest.raises(ValueError, match=r"latents_w must be \(B, 4, h, w\)"):
        model.encode_batch(PreferenceBatch(latents_w=lw[:, :3], latents_l=ll, prompt_embeds=embeds))
    with pytest.raises(ValueError, match="differ in shape"):
        model.encode_batch(PreferenceBatch(latents_w=lw, latents_l=ll[..., :8], prompt_embeds=embeds))
    with pytest.raises(ValueError, match="neither latents_l nor pixel_values_l"):
        model.encode_batch(PreferenceBatch(latents_w=lw, prompt_embeds=embeds))
    with pytest.raises(ValueError, match="neither prompt_embeds nor prompts"):
        model.encode_batch(PreferenceBatch(latents_w=lw, latents_l=ll))
    with pytest.raises(ValueError, match="prompt_embeds must be"):
        model.encode_batch(PreferenceBatch(latents_w=lw, latents_l=ll, prompt_embeds=embeds[:1]))
    with pytest.raises(ValueError, match="pixel values must be"):
        model.encode_batch(PreferenceBatch(pixel_values_w=torch.zeros(2, 1, 32, 32),
                                           pixel_values_l=torch.zeros(2, 1, 32, 32), prompts=["a", "b"]))
    if kind == "sdxl":
        with pytest.raises(ValueError, match="SDXL-class model needs pooled_prompt_embeds"):
            model.encode_batch(PreferenceBatch(latents_w=lw, latents_l=ll, prompt_embeds=embeds))
        assert good.condition_w.time_ids.tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 2


def test_unknown_finetune_mode(pipeline):
    with pytest.raises(ValueError, match="unknown finetune mode"):
        PreferenceModel(pipeline, finetune="qlora")


def test_v_prediction_pipeline_sets_the_schedule():
    pipe = build_tiny_pipeline("sd15", prediction_type="v_prediction")
    assert PreferenceModel(pipe, lora=LoraSettings(rank=2)).schedule.prediction_type == "v_prediction"
