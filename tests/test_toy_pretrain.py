import json

import numpy as np
import pytest
import torch

from ncppo.models.loading import load_pipeline
from ncppo.toy import pretrain as pretrain_module
from ncppo.toy.pretrain import QUICK, PretrainConfig, base_model


def test_base_model_is_pretrained_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("NCPPO_CACHE", str(tmp_path))
    path = base_model(QUICK, progress=False)
    assert path.parent == tmp_path and path.name == f"toy-base-{QUICK.fingerprint()}"
    record = json.loads((path / "pretrain.json").read_text())
    assert len(record["losses"]) == QUICK.steps and all(v == v for v in record["losses"])  # finite
    assert record["loss_last_10pct"] < record["loss_first_10pct"] * 1.5
    assert record["loss_trace"] == record["losses"][: pretrain_module.TRACE_STEPS] and record["fingerprint"] == QUICK.fingerprint()

    def no_retraining(*args, **kwargs):
        raise AssertionError("the cached model should be reused")

    monkeypatch.setattr(pretrain_module, "pretrain", no_retraining)
    assert base_model(QUICK, progress=False) == path
    pipe = load_pipeline(path)
    assert type(pipe).__name__ == "PixelTextToImagePipeline" and pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.unet.config.addition_embed_type == "text" and pipe.tokenizer.model_max_length == 16
    images = pipe(["a red circle on a blue background"], num_inference_steps=2, guidance_scale=3.0, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 32, 32, 3)


def test_the_recipe_reproduces_its_recorded_first_steps():
    # the first steps of a rerun give the very losses the record holds (the recipe is seeded throughout)
    cfg = PretrainConfig(**{**QUICK.__dict__, "ema_decay": 0.99})
    first = pretrain_module.recipe_losses(cfg, steps=3)
    assert first == pretrain_module.recipe_losses(cfg, steps=3) and len(set(first)) == 3
    assert first != pretrain_module.recipe_losses(PretrainConfig(**{**cfg.__dict__, "seed": 1}), steps=3)


def test_the_shipped_base_model_loads_and_matches_its_recipe():
    cfg = PretrainConfig()
    path = pretrain_module.shipped_model(cfg)
    assert path is not None, f"the package should ship the default base model ({cfg.fingerprint()})"
    assert base_model(cfg, progress=False) == path  # used as it is: never pretrained on a user's machine
    record = json.loads((path / "pretrain.json").read_text())
    assert record["fingerprint"] == cfg.fingerprint() and record["config"] == json.loads(json.dumps(cfg.identity()))
    assert record["command"].startswith("python -m ncppo.toy.pretrain") and "git" in record["code_version"]
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size <= 20 * 2**20, f"the shipped model is {size / 2**20:.1f} MB (limit 20)"
    pipe = load_pipeline(path)
    assert type(pipe).__name__ == "PixelTextToImagePipeline"
    # plain diffusers loads it too, with the pipeline's code file (the README's recipe), to the same images
    from diffusers import DiffusionPipeline

    import ncppo.models.pixel_pipeline as pixel_pipeline

    plain = DiffusionPipeline.from_pretrained(path, custom_pipeline=pixel_pipeline.__file__, trust_remote_code=True)
    sample = {"num_inference_steps": 3, "guidance_scale": 3.0, "output_type": "np"}
    prompt = ["a red circle on a blue background"]
    np.testing.assert_array_equal(plain(prompt, generator=torch.Generator().manual_seed(0), **sample).images,
                                  pipe(prompt, generator=torch.Generator().manual_seed(0), **sample).images)
    # the code that claims to make it gives the recorded first steps (the record is from a 2-thread run;
    # torch's CPU kernels sum in a thread-dependent order, hence a relative tolerance far below a step's change)
    rerun = pretrain_module.recipe_losses(cfg, steps=pretrain_module.TRACE_STEPS)
    assert rerun == pytest.approx(record["loss_trace"], rel=1e-5)
    assert abs(record["loss_trace"][1] - record["loss_trace"][0]) > 1e-3  # the tolerance could catch a change


def test_fingerprint_follows_the_config():
    assert QUICK.fingerprint() == PretrainConfig(**{**QUICK.__dict__}).fingerprint()
    assert QUICK.fingerprint() != PretrainConfig(**{**QUICK.__dict__, "seed": 1}).fingerprint()
    with pytest.raises(TypeError):
        PretrainConfig(unknown=1)


def test_ncp_objectives_run_on_the_toy_architecture():
    import math

    from ncppo.batch import PreferenceBatch
    from ncppo.models.preference_model import LoraSettings, PreferenceModel
    from ncppo.objectives import make_objective
    from ncppo.perception import NoiseConditionedEncoder
    from ncppo.step import training_step
    from ncppo.toy.pretrain import build_base_pipeline

    model = PreferenceModel(build_base_pipeline(QUICK), lora=LoraSettings(rank=2))
    batch = PreferenceBatch(pixel_values_w=torch.rand(2, 3, 32, 32) * 2 - 1, pixel_values_l=torch.rand(2, 3, 32, 32) * 2 - 1,
                            prompts=["a red circle on a blue background", "a black square on a white background"])
    for name in ("ncp-dpo", "ncp-cpo"):
        out = training_step(model, make_objective(name), batch, generator=torch.Generator().manual_seed(0))
        assert math.isfinite(out.loss.item())
    # the encoder still equals the full forward's tensors with the pooled-text time embedding
    unet = model.unet
    seen = {}
    def keep(_module, _inputs, output):  # returns None: a returned value would replace the output
        seen["last"] = output[0]

    handle = unet.down_blocks[-1].register_forward_hook(keep)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 500])
    ehs = torch.randn(2, 16, 64)
    with torch.no_grad(), model.frozen_unet() as frozen:
        frozen(x, t, encoder_hidden_states=ehs)
        (feats,) = NoiseConditionedEncoder("last")(frozen, x, t, ehs)
    handle.remove()
    assert torch.equal(feats, seen["last"])

