"""Pretraining the toy world's base model: a ~4M-parameter pixel-space U-Net and a tiny CLIP text
encoder, trained jointly from scratch on rendered scenes (v-prediction, 10% empty captions so
classifier-free guidance works). The result is a diffusers-format ``PixelTextToImagePipeline``, cached
under ``$NCPPO_CACHE`` (default ``~/.cache/ncppo``) by a hash of its config and reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ncppo.diffusion import NoiseSchedule, add_noise
from ncppo.io import atomic_directory
from ncppo.toy.world import all_scenes, render, sample_scenes

FORMAT_VERSION = 2  # bump when the pretraining recipe changes: old caches are then not reused


@dataclass(frozen=True)
class PretrainConfig:
    """The ``pretrain`` stage: the base model's shape and recipe (its hash names the cached model).

    Parameters:
        image_size: pixels per side.
        block_out_channels: the U-Net's channels per level; ``layers_per_block`` its resnets per level.
        steps: optimisation steps; ``batch_size`` images per step; ``learning_rate`` AdamW's.
        caption_dropout: share of empty captions (so classifier-free guidance works).
        prediction_type: ``v_prediction`` or ``epsilon``.
        seed: the pretraining seed.
    """

    image_size: int = 32
    block_out_channels: tuple[int, ...] = (32, 64, 128)
    layers_per_block: int = 1
    steps: int = 400
    batch_size: int = 32
    learning_rate: float = 5e-4
    caption_dropout: float = 0.1
    prediction_type: str = "v_prediction"
    seed: int = 0

    def fingerprint(self) -> str:
        payload = json.dumps({"version": FORMAT_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


QUICK = PretrainConfig(block_out_channels=(16, 32), layers_per_block=1, steps=30, batch_size=8)


def cache_root() -> Path:
    return Path(os.environ.get("NCPPO_CACHE") or Path.home() / ".cache" / "ncppo")  # empty means unset


def build_base_pipeline(cfg: PretrainConfig):
    """An untrained pipeline of the config's shape, with a tokenizer trained on the world's captions.

    Attention only below full resolution (self-attention over 32x32 pixels costs 4x the whole step on
    CPU), and the pooled caption is added to the time embedding (``addition_embed_type="text"``) so the
    colours reach every pixel early; captions are short, so the text context is 16 tokens.
    """
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from ncppo.models.pixel_pipeline import PixelTextToImagePipeline
    from ncppo.models.tiny import SD_SCHEDULER_CONFIG, tiny_text_encoder, train_clip_tokenizer

    tokenizer = train_clip_tokenizer([s.caption for s in all_scenes()] + [""], vocab_size=400, model_max_length=16)
    n = len(cfg.block_out_channels)
    torch.manual_seed(cfg.seed)
    unet = UNet2DConditionModel(
        sample_size=cfg.image_size, in_channels=3, out_channels=3, block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block, norm_num_groups=8, cross_attention_dim=64, attention_head_dim=4,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        addition_embed_type="text", addition_embed_type_num_heads=4,
    )
    return PixelTextToImagePipeline(
        unet=unet, text_encoder=tiny_text_encoder(len(tokenizer), 64, False, cfg.seed + 2), tokenizer=tokenizer,
        scheduler=DDIMScheduler(prediction_type=cfg.prediction_type, **SD_SCHEDULER_CONFIG),
    )


def _batch(cfg: PretrainConfig, rng: np.random.Generator):
    scenes = sample_scenes(cfg.batch_size, rng)
    images = np.stack([render(s, cfg.image_size, rng) for s in scenes])
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    captions = ["" if rng.random() < cfg.caption_dropout else s.caption for s in scenes]
    return pixels, captions


def pretrain(cfg: PretrainConfig, out_dir: str | os.PathLike, progress: bool = True) -> dict:
    """Train from scratch and save the pipeline to ``out_dir`` (atomically); returns the training record."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    pipe = build_base_pipeline(cfg)
    schedule = NoiseSchedule.from_scheduler_config(pipe.scheduler.config)
    unet, text_encoder, tokenizer = pipe.unet.train(), pipe.text_encoder.train(), pipe.tokenizer
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=1e-4)
    from diffusers.optimization import get_cosine_schedule_with_warmup

    lr = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=max(1, cfg.steps // 20), num_training_steps=cfg.steps)
    generator = torch.Generator().manual_seed(cfg.seed)
    losses, start = [], time.perf_counter()
    for _ in tqdm(range(cfg.steps), desc="pretrain toy base model", disable=not progress):
        x0, captions = _batch(cfg, rng)
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        t = schedule.sample_timesteps(x0.shape[0], generator=generator)
        eps = torch.randn(x0.shape, generator=generator)
        abar = schedule.abar(t, x0)
        target = abar.sqrt() * eps - (1 - abar).sqrt() * x0 if cfg.prediction_type == "v_prediction" else eps
        pred = unet(add_noise(schedule, x0, eps, t), t, encoder_hidden_states=text_encoder(ids)[0]).sample
        loss = torch.nn.functional.mse_loss(pred, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr.step()
        losses.append(loss.item())
    record = {"config": dataclasses.asdict(cfg), "fingerprint": cfg.fingerprint(), "seconds": time.perf_counter() - start,
              "unet_parameters": sum(p.numel() for p in unet.parameters()),
              "loss_first_50": float(np.mean(losses[:50])), "loss_last_50": float(np.mean(losses[-50:]))}
    pipe.unet.eval()
    pipe.text_encoder.eval()
    with atomic_directory(out_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "pretrain.json").write_text(json.dumps({**record, "losses": losses}, indent=2))
    return record


def base_model(cfg: PretrainConfig = PretrainConfig(), progress: bool = True) -> Path:
    """The cached base model for ``cfg`` (pretrained on first use): a folder ``load_pipeline`` reads."""
    path = cache_root() / f"toy-base-{cfg.fingerprint()}"
    if not (path / "pretrain.json").is_file():
        pretrain(cfg, path, progress=progress)
    return path
