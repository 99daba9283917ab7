"""Transformer backbones with flow matching (SD3-class MMDiT, FLUX.1-class): the tiny pipelines, the perceptual
encoder, LoRA, and the six objectives, each test on both."""

import math

import pytest
import torch

from ncppo.errors import UsageError
from ncppo.models.preference_model import LoraSettings, PreferenceModel
from ncppo.objectives import OBJECTIVE_NAMES, make_objective
from ncppo.perception import NoiseConditionedEncoder
from ncppo.step import training_step

from .conftest import noised_random_pairs, perturb_lora, random_pairs
from .transformer_helpers import tiny_model_dir

KINDS = ("sd3", "flux")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    return {}


@pytest.fixture(params=KINDS)
def tiny_dir(request, tiny_dirs, tmp_path_factory):
    """The tiny pipeline of each kind, built once by the CLI (offline)."""
    from ncppo.cli import main

    if request.param not in tiny_dirs:
        out = tmp_path_factory.mktemp(request.param) / request.param
        assert main(["tiny-model", str(out), "--kind", request.param]) == 0
        tiny_dirs[request.param] = out
    return tiny_dirs[request.param]


def test_the_pipeline_classes_ncppo_supports_are_named():
    from ncppo.models.loading import ModelLoadError, pipeline_kind

    with pytest.raises(ModelLoadError, match="unsupported pipeline class object; ncppo trains .*StableDiffusion3Pipeline"):
        pipeline_kind(object())
    with pytest.raises(UsageError, match="does not apply to sd3"):
        from ncppo.models.tiny import build_tiny_pipeline

        build_tiny_pipeline("sd3", prediction_type="v_prediction")


@pytest.fixture
def model(tiny_dir):
    from ncppo.models.loading import load_pipeline

    return PreferenceModel(load_pipeline(tiny_dir), lora=LoraSettings(rank=4))




def test_the_tiny_pipelines_are_flow_transformers(model):
    from diffusers import (
        FluxPipeline,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    from ncppo.flow import FlowSchedule

    assert isinstance(model.schedule, FlowSchedule) and model.schedule.shift == 3.0
    nb = noised_random_pairs(model)
    assert nb.condition.encoder_hidden_states.shape[-1] == 32
    if model.kind == "sd3":
        assert isinstance(model.pipeline, StableDiffusion3Pipeline) and not model.schedule.use_dynamic_shifting
        assert isinstance(model.unet, SD3Transformer2DModel) and len(model.unet.transformer_blocks) == 4
        assert model.pipeline.text_encoder_3 is not None and model.pipeline.tokenizer_3 is not None
        assert nb.condition.text_embeds.shape == (4, 32) and nb.condition.guidance is None
    else:
        assert isinstance(model.pipeline, FluxPipeline) and model.schedule.use_dynamic_shifting
        assert isinstance(model.unet, FluxTransformer2DModel) and model.unet.config.guidance_embeds
        assert len(model.unet.transformer_blocks) == 2 and len(model.unet.single_transformer_blocks) == 2
        assert nb.condition.text_embeds.shape == (4, 16) and nb.condition.guidance.tolist() == [3.5] * 4


@pytest.mark.parametrize("features,blocks", [("last", 0.5), ("all", 1.0), ("last", (0, 3)), ("last", 1)])
def test_encoder_equals_the_hooked_hidden_states_of_a_full_forward(model, features, blocks):
    nb = noised_random_pairs(model, seed=1)
    enc = NoiseConditionedEncoder(features, blocks=blocks)
    transformer = model.unet
    names = enc.levels(transformer)
    hooked = {}
    blocks = list(transformer.transformer_blocks) + list(getattr(transformer, "single_transformer_blocks", []))
    handles = [blk.register_forward_hook(lambda m, a, out, i=i: hooked.__setitem__(i, out[1]))
               for i, blk in enumerate(blocks)]  # each block returns (text stream, image stream)
    timestep = model.schedule.model_timestep(nb.t, nb.x_t)
    cond = nb.condition
    with torch.no_grad(), model.frozen_unet() as frozen:
        try:
            model.backbone.forward(frozen, nb.x_t, timestep, cond)  # the full forward, as training runs it
        finally:
            for h in handles:
                h.remove()
        feats = enc(frozen, nb.x_t, timestep, **cond.unet_kwargs())
    assert len(feats) == len(names)
    for name, f in zip(names, feats):
        expected = hooked[int(name.split("_")[1])].transpose(1, 2)  # image tokens only, channels first
        tokens = (nb.x_t.shape[-1] // 2) * (nb.x_t.shape[-2] // 2)
        assert f.shape == (nb.x_t.shape[0], 16, tokens)
        torch.testing.assert_close(f, expected, atol=0, rtol=0)


def test_lora_adapts_both_streams_and_off_is_the_base_exactly(model, tiny_dir):
    from ncppo.models.loading import load_pipeline

    attn = model.unet.transformer_blocks[0].attn
    for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
        assert hasattr(getattr(attn, name), "lora_A"), name
    assert hasattr(attn.to_out[0], "lora_A")
    nb = noised_random_pairs(model, seed=2)
    base = PreferenceModel(load_pipeline(tiny_dir), finetune="none")
    with torch.no_grad():
        expected = base.predict_epsilon(base.unet, nb.x_t, nb.t, nb.condition)
        perturb_lora(model.unet, scale=0.3)
        with model.frozen_unet() as frozen:
            off = model.predict_epsilon(frozen, nb.x_t, nb.t, nb.condition)
        on = model.predict_epsilon(model.unet, nb.x_t, nb.t, nb.condition)
    torch.testing.assert_close(off, expected, atol=0, rtol=0)
    assert (on - expected).abs().max() > 1e-4


def test_saved_lora_loads_into_a_fresh_pipeline_with_identical_outputs(model, tiny_dir, tmp_path):
    from ncppo.models.loading import load_pipeline

    perturb_lora(model.unet, scale=0.3)
    model.save_lora(tmp_path / "lora")
    fresh = load_pipeline(tiny_dir)
    fresh.load_lora_weights(tmp_path / "lora")
    loaded = PreferenceModel(fresh, finetune="none")
    nb = noised_random_pairs(model, seed=3)
    with torch.no_grad():
        ours = model.predict_epsilon(model.unet, nb.x_t, nb.t, nb.condition)
        theirs = loaded.predict_epsilon(loaded.unet, nb.x_t, nb.t, nb.condition)
    assert sum("add_q_proj" in n and "lora" in n for n, _ in fresh.transformer.named_parameters()) > 0
    torch.testing.assert_close(theirs, ours, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", OBJECTIVE_NAMES)
def test_every_objective_trains_the_lora_of_both_streams(model, name):
    objective = make_objective(name)
    objective.validate(model)
    if objective.needs_reference_prediction:  # at init the policy is its reference: (NCP-)DPO sits at log 2
        at_init = training_step(model, objective, random_pairs(), generator=torch.Generator().manual_seed(0))
        assert at_init.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    perturb_lora(model.unet, scale=0.05)
    out = training_step(model, objective, random_pairs(), generator=torch.Generator().manual_seed(1))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    grads = {n: p.grad for n, p in model.unet.named_parameters() if "lora" in n}
    assert all(g is None or torch.isfinite(g).all() for g in grads.values())
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "add_q_proj" in n)
    assert all(p.grad is None for n, p in model.unet.named_parameters() if "lora" not in n)


def test_bad_encoder_depth_and_block_index_are_refused_before_training(model):
    with pytest.raises(UsageError, match="encoder depth 9 exceeds this transformer's 4 blocks"):
        make_objective("ncp-dpo", encoder_blocks=9).validate(model)
    with pytest.raises(UsageError, match=r"unknown encoder block index 7: this transformer has 4 blocks, indices 0 to 3"):
        make_objective("ncp-dpo", encoder_blocks=[1, 7]).validate(model)
    with pytest.raises(UsageError, match="a transformer's are one of"):
        make_objective("ncp-dpo", features="mid").validate(model)
    with pytest.raises(UsageError, match=r"fraction of the depth must lie in \(0, 1\]"):
        make_objective("ncp-dpo", encoder_blocks=1.5)
    with pytest.raises(UsageError, match=">= 1 block"):
        make_objective("ncp-dpo", encoder_blocks=0)
    make_objective("dpo", encoder_blocks=9).validate(model)  # noise-space objectives have no encoder


def test_ncppo_train_runs_each_objective(tiny_dir, tmp_path):
    from .transformer_helpers import train_each_objective

    for run in train_each_objective(tiny_dir, tmp_path).values():
        fresh = PreferenceModel.from_pretrained(tiny_dir, finetune="none")
        fresh.pipeline.load_lora_weights(run / "lora")  # the run's LoRA, in the pipeline's own loader
        assert any("lora" in n for n, _ in fresh.unet.named_parameters())


def test_guidance_is_for_guidance_distilled_models_only(tiny_dir):
    from ncppo.models.loading import load_pipeline
    from ncppo.models.tiny import build_tiny_pipeline

    pipe = load_pipeline(tiny_dir)
    if pipe.transformer.config.get("guidance_embeds", False):
        model = PreferenceModel(pipe, lora=LoraSettings(rank=4), guidance=2.0)
        assert noised_random_pairs(model).condition.guidance.tolist() == [2.0] * 4
        schnell = build_tiny_pipeline("flux-schnell")  # FLUX.1-schnell-like: no guidance embedding
        with pytest.raises(UsageError, match="no guidance embedding .a schnell-like model.; leave guidance unset"):
            PreferenceModel(schnell, guidance=3.5)
        model = PreferenceModel(schnell, lora=LoraSettings(rank=4))
        assert model.guidance is None and noised_random_pairs(model).condition.guidance is None
        out = training_step(model, make_objective("ncp-dpo"), random_pairs(), generator=torch.Generator().manual_seed(0))
        assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    else:
        with pytest.raises(UsageError, match="a sd3 model has no guidance embedding"):
            PreferenceModel(pipe, guidance=3.5)


def test_the_linearised_distance_agrees_with_the_exact_one(model):
    """``distance: linear`` (a forward-mode JVP through the transformer's blocks, what half precision uses)."""
    from ncppo.objectives.spaces import PerceptualSpace

    perturb_lora(model.unet, scale=0.05)
    nb = noised_random_pairs(model, seed=5)
    with torch.no_grad():
        v_theta = model.predict_epsilon(model.unet, nb.x_t, nb.t, nb.condition)
        with model.frozen_unet() as frozen:
            v_ref = model.predict_epsilon(frozen, nb.x_t, nb.t, nb.condition)
        exact, exact_ref = PerceptualSpace(distance="exact").losses(model, nb, v_theta, v_ref)
        linear, linear_ref = PerceptualSpace(distance="linear").losses(model, nb, v_theta, v_ref)
    torch.testing.assert_close(linear, exact, rtol=1e-2, atol=0)
    torch.testing.assert_close(linear_ref, exact_ref, rtol=1e-2, atol=0)


def test_timestep_weighting_is_a_flow_models_option(tiny_dir, tiny_pipeline_dirs):
    from ncppo.models.loading import load_pipeline

    model = PreferenceModel(load_pipeline(tiny_dir), finetune="none", timestep_weighting="uniform")
    assert model.schedule.weighting == "uniform"
    assert PreferenceModel(load_pipeline(tiny_dir), finetune="none").schedule.weighting == "logit_normal"
    with pytest.raises(UsageError, match="weighting"):
        PreferenceModel(load_pipeline(tiny_dir), finetune="none", timestep_weighting="mode")
    with pytest.raises(UsageError, match="flow-matching models only"):
        PreferenceModel(load_pipeline(tiny_pipeline_dirs["sd15"]), finetune="none", timestep_weighting="uniform")


def test_config_keys_reach_the_model_and_the_objective(tiny_dir):
    from ncppo.training.config import load_config
    from ncppo.training.setup import build_model, build_objective, prepare_model

    flux = tiny_dir.name == "flux"
    cfg = load_config(None, [f"model.pretrained={tiny_dir}", "data.source=/d", "model.lora_rank=4",
                             "model.timestep_weighting=uniform", "objective.encoder_blocks=[0, 2]",
                             *(["model.guidance=2"] if flux else [])])
    model = build_model(cfg.model)
    prepare_model(model, cfg, torch.device("cpu"))
    assert model.schedule.weighting == "uniform" and model.lora.rank == 4
    guidance = noised_random_pairs(model).condition.guidance
    assert (guidance.tolist() == [2.0] * 4) if flux else guidance is None
    assert build_objective(cfg.objective).space.encoder.levels(model.unet) == ["block_0", "block_2"]


def test_bad_transformer_options_stop_the_trainer_before_training(tiny_dir, tmp_path):
    from ncppo.cli import main
    from ncppo.training import Trainer, load_config
    from ncppo.training.config import ConfigError

    from .data_helpers import write_dataset

    data = write_dataset(tmp_path / "pairs", [(f"a red shape {k}", f"w{k}", f"l{k}", 1) for k in range(2)])
    model_dir = tiny_dir
    bad = {"objective.encoder_blocks=9": "objective: encoder depth 9 exceeds this transformer's 4 blocks",
           "objective.encoder_blocks=[1, 7]": r"objective: unknown encoder block index 7: this transformer has 4 "
                                              r"blocks, indices 0 to 3",
           "objective.features=mid": "objective: perceptual features 'mid' are a U-Net's"}
    if tiny_dir.name == "flux":  # FLUX.1-schnell-like: no guidance embedding
        model_dir = tmp_path / "schnell"
        assert main(["tiny-model", str(model_dir), "--kind", "flux-schnell"]) == 0
        bad["model.guidance=3.5"] = r"model.guidance: guidance 3.5 was given but this FLUX model has no guidance " \
                                    r"embedding \(a schnell-like model\)"
    else:
        bad["model.guidance=3.5"] = "model.guidance: guidance 3.5 was given but a sd3 model has no guidance embedding"
    for k, (key, message) in enumerate(bad.items()):
        run = tmp_path / f"run-{k}"
        with pytest.raises(ConfigError, match=message):
            Trainer(load_config(None, [f"output_dir={run}", f"model.pretrained={model_dir}", f"data.source={data}",
                                       "model.lora_rank=4", "data.resolution=32", "max_steps=1", key]))
        assert not (run / "metrics.jsonl").exists() and not (run / "lora").exists(), key


def test_transformer_keys_on_a_unet_are_refused(tiny_pipeline_dirs):
    from ncppo.training.config import ConfigError, load_config
    from ncppo.training.setup import build_model, prepare_model

    base = [f"model.pretrained={tiny_pipeline_dirs['sd15']}", "data.source=/d", "model.lora_rank=4"]
    for key, message in {"model.guidance=3.5": "model.guidance: guidance 3.5 was given but a sd15 model has no "
                                               "guidance embedding",
                         "model.timestep_weighting=uniform": r"model.timestep_weighting: flow timestep options "
                                                             r"\['weighting'\] apply to flow-matching models only"}.items():
        with pytest.raises(ConfigError, match=message):
            build_model(load_config(None, [*base, key]).model)
    cfg = load_config(None, [*base, "objective.encoder_blocks=0.5"])
    with pytest.raises(ConfigError, match="objective.encoder_blocks: 0.5 sets a transformer's encoder depth; this "
                                          "sd15 model is a U-Net"):
        prepare_model(build_model(cfg.model), cfg, torch.device("cpu"))
    cfg = load_config(None, [*base, "objective.name=dpo", "objective.encoder_blocks=0.5"])
    prepare_model(build_model(cfg.model), cfg, torch.device("cpu"))  # noise space: no encoder to set


def test_cache_round_trip_trains_as_raw_pairs(model, tmp_path):
    from ncppo.batch import PreferenceBatch
    from ncppo.data.cache import LatentCache, build_cache
    from ncppo.data.pairs import PreferencePairs

    from .data_helpers import write_dataset

    pairs = PreferencePairs(write_dataset(tmp_path / "src", [(f"a red circle {k}", f"u{k}", f"v{k}", 1) for k in range(3)]))
    build_cache(model, pairs, tmp_path / "c", resolution=32, progress=False)
    cached = next(LatentCache(tmp_path / "c").batches(3, shuffle=False))
    raw = pairs.collate([0, 1, 2], 32)
    embeds, pooled = model.encode_prompts(raw.prompts)
    torch.testing.assert_close(cached.prompt_embeds, embeds)
    torch.testing.assert_close(cached.pooled_prompt_embeds, pooled)  # SD3 and FLUX condition on pooled text too
    torch.testing.assert_close(cached.latents_w, model.encode_images(raw.pixel_values_w, sample=False), rtol=0, atol=1e-6)
    from_raw = PreferenceBatch(latents_w=model.encode_images(raw.pixel_values_w, sample=False),
                               latents_l=model.encode_images(raw.pixel_values_l, sample=False), prompts=raw.prompts)
    perturb_lora(model.unet, scale=0.05)
    losses = [training_step(model, make_objective("ncp-dpo"), b, generator=torch.Generator().manual_seed(0)).loss
              for b in (cached, from_raw)]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-9)


def test_an_explicit_objective_is_validated_against_the_model_before_training(tiny_dir, tmp_path):
    """``Trainer(config, objective=...)``: the objective given, not the config's, is checked against the model."""
    from ncppo.training import Trainer, load_config
    from ncppo.training.config import ConfigError

    from .data_helpers import write_dataset

    data = write_dataset(tmp_path / "pairs", [(f"a red shape {k}", f"w{k}", f"l{k}", 1) for k in range(2)])
    run = tmp_path / "run"
    cfg = load_config(None, [f"output_dir={run}", f"model.pretrained={tiny_dir}", f"data.source={data}",
                             "model.lora_rank=4", "data.resolution=32", "max_steps=1"])  # the config's ncp-dpo fits
    with pytest.raises(ConfigError, match="objective: encoder depth 9 exceeds this transformer's 4 blocks"):
        Trainer(cfg, objective=make_objective("ncp-dpo", encoder_blocks=9))
    assert not (run / "metrics.jsonl").exists() and not (run / "lora").exists()


@pytest.fixture(scope="module")
def pixart_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory, "pixart")


def test_pixart_embeddings_without_their_mask_say_how_to_get_one(pixart_dir):
    from ncppo.batch import PreferenceBatch

    model = PreferenceModel.from_pretrained(pixart_dir, finetune="none")
    embeds, _, mask = model.encode_text(["a red circle", "a blue square"])
    assert mask is not None and mask.shape == embeds.shape[:2]
    latents = torch.randn(2, 4, 16, 16)
    with pytest.raises(ValueError, match=r"prompt_attention_mask of shape \(2, \d+\) \(a latent cache built by this "
                                         r"ncppo stores it: rebuild an older cache, or give the mask or the prompts\)"):
        model.encode_batch(PreferenceBatch(latents_w=latents, latents_l=latents, prompt_embeds=embeds))


def test_prompt_dropout_of_a_cached_pixart_batch_gives_the_empty_prompts_mask(pixart_dir, tmp_path):
    """Dropped rows get the empty prompt's embeddings and its T5 padding mask, not the dropped prompt's mask."""
    from ncppo.data.cache import LatentCache, build_cache
    from ncppo.data.pairs import PreferencePairs
    from ncppo.training.sources import CacheData, MicroBatches, PromptDropout

    from .data_helpers import write_dataset

    model = PreferenceModel.from_pretrained(pixart_dir, lora=LoraSettings(rank=4))
    prompts = ["a big red circle on a blue square", "a small green triangle beside a yellow star"]
    pairs = PreferencePairs(write_dataset(tmp_path / "src", [(p, f"u{k}", f"v{k}", 1) for k, p in enumerate(prompts)]))
    build_cache(model, pairs, tmp_path / "c", resolution=32, progress=False)
    data = CacheData(LatentCache(tmp_path / "c"))
    kept = MicroBatches(data, 2, seed=0)(0)
    dropped = MicroBatches(data, 2, seed=0, dropout=PromptDropout(1.0, model))(0)
    embeds, _, mask = model.encode_text([""])
    assert not torch.equal(kept.prompt_attention_mask, mask.expand(2, -1).to(kept.prompt_attention_mask))
    torch.testing.assert_close(dropped.prompt_embeds, embeds.expand(2, -1, -1).to(dropped.prompt_embeds))
    assert dropped.prompt_attention_mask.dtype == kept.prompt_attention_mask.dtype
    assert torch.equal(dropped.prompt_attention_mask, mask.expand(2, -1).to(kept.prompt_attention_mask))
    condition = model.encode_batch(dropped).condition_w  # what the denoiser attends to
    assert torch.equal(condition.attention_mask.cpu(), mask.expand(2, -1).to(condition.attention_mask).cpu())
