"""Pretraining the toy world's base model: a ~4M-parameter pixel-space U-Net and a tiny CLIP text
encoder, trained jointly from scratch on rendered scenes (v-prediction, 10% empty captions so
classifier-free guidance works, EMA weights). The result is a diffusers-format ``PixelTextToImagePipeline``.

The default recipe takes longer than a demo can afford, so its result ships inside the package
(``ncppo/toy/base_models/toy-base-<fingerprint>/``, with ``pretrain.json`` recording the config, its hash,
the command, the code version and the first steps' losses); ``python -m ncppo.toy.pretrain
ncppo/toy/base_models`` rebuilds it. Any other config is pretrained on first use and cached under
``$NCPPO_CACHE`` (default ``~/.cache/ncppo``) by the same hash.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ncppo.diffusion import NoiseSchedule, add_noise
from ncppo.io import atomic_directory
from ncppo.toy.world import all_scenes, render, sample_scenes

FORMAT_VERSION = 3  # bump when the pretraining recipe changes: old caches are then not reused
SHIPPED = Path(__file__).parent / "base_models"
TRACE_STEPS = 5  # the first steps' losses, recorded so a rerun of the recipe can be checked against them


@dataclass(frozen=True)
class PretrainConfig:
    """The ``pretrain`` stage: the base model's shape and recipe (its hash names the cached model).

    Parameters:
        image_size: pixels per side.
        block_out_channels: the U-Net's channels per level; ``layers_per_block`` its resnets per level.
        steps: optimisation steps; ``batch_size`` images per step; ``learning_rate`` AdamW's (cosine decay
            after a 5% warm-up).
        ema_decay: the saved weights are an exponential moving average with this decay (warmed up as
            ``min(decay, (1 + step) / (10 + step))``); 0 saves the last weights.
        caption_dropout: share of empty captions (so classifier-free guidance works).
        prediction_type: ``v_prediction`` or ``epsilon``.
        seed: the pretraining seed.
        backbone: ``unet`` (the U-Net above) or ``dit``: a pixel-space DiT (PixArt's
            ``PixArtTransformer2DModel``, patch 2, adaLN-single, cross-attention to the caption) in a
            :class:`~ncppo.models.pixel_dit_pipeline.PixelDiTPipeline`, trained by the same recipe.
        dit_layers: the DiT's transformer blocks; ``dit_width`` its token width; ``dit_heads`` its attention heads.
    """

    image_size: int = 32
    block_out_channels: tuple[int, ...] = (32, 64, 128)
    layers_per_block: int = 1
    steps: int = 3000
    batch_size: int = 16
    learning_rate: float = 1e-3
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    prediction_type: str = "v_prediction"
    seed: int = 0
    backbone: str = "unet"
    dit_layers: int = 8
    dit_width: int = 128
    dit_heads: int = 4

    def identity(self) -> dict:
        """The fields that name the model: every field, less those added after models shipped while they hold their
        first value (so the shipped U-Net and the stages made from it keep their hashes)."""
        values = dataclasses.asdict(self)
        return {k: v for k, v in values.items() if k not in _LATER_FIELDS or v != _LATER_FIELDS[k]}

    def fingerprint(self) -> str:
        payload = json.dumps({"version": FORMAT_VERSION, **self.identity()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


_LATER_FIELDS = {"backbone": "unet", "dit_layers": 8, "dit_width": 128, "dit_heads": 4}
BACKBONES = ("unet", "dit")


QUICK = PretrainConfig(block_out_channels=(16, 32), layers_per_block=1, steps=30, batch_size=8, ema_decay=0.0)


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
    if cfg.backbone == "dit":
        from diffusers import PixArtTransformer2DModel

        from ncppo.models.pixel_dit_pipeline import PixelDiTPipeline

        if cfg.dit_width % cfg.dit_heads:
            raise ValueError(f"pretrain.dit_width {cfg.dit_width} is not a multiple of dit_heads {cfg.dit_heads}")
        transformer = PixArtTransformer2DModel(
            sample_size=cfg.image_size, num_layers=cfg.dit_layers, patch_size=2, in_channels=3, out_channels=3,
            attention_head_dim=cfg.dit_width // cfg.dit_heads, num_attention_heads=cfg.dit_heads,
            cross_attention_dim=cfg.dit_width, caption_channels=64, norm_type="ada_norm_single",
            norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False,
        )
        return PixelDiTPipeline(
            transformer=transformer, text_encoder=tiny_text_encoder(len(tokenizer), 64, False, cfg.seed + 2),
            tokenizer=tokenizer, scheduler=DDIMScheduler(prediction_type=cfg.prediction_type, **SD_SCHEDULER_CONFIG),
        )
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


def _train(cfg: PretrainConfig, pipe, steps: int, progress: bool) -> list[float]:
    """Run the recipe's first ``steps`` steps on ``pipe`` in place (its weights become the EMA's); the losses."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    schedule = NoiseSchedule.from_scheduler_config(pipe.scheduler.config)
    denoiser, text_encoder, tokenizer = pipe.denoiser.train(), pipe.text_encoder.train(), pipe.tokenizer
    params = list(denoiser.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=1e-4)
    from diffusers.optimization import get_cosine_schedule_with_warmup

    lr = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=max(1, cfg.steps // 20), num_training_steps=cfg.steps)
    ema = [p.detach().clone() for p in params] if cfg.ema_decay else None
    generator = torch.Generator().manual_seed(cfg.seed)
    losses = []
    for step in tqdm(range(1, steps + 1), desc="pretrain toy base model", disable=not progress):
        x0, captions = _batch(cfg, rng)
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        t = schedule.sample_timesteps(x0.shape[0], generator=generator)
        eps = torch.randn(x0.shape, generator=generator)
        abar = schedule.abar(t, x0)
        target = abar.sqrt() * eps - (1 - abar).sqrt() * x0 if cfg.prediction_type == "v_prediction" else eps
        pred = pipe.denoise(add_noise(schedule, x0, eps, t), t, text_encoder(ids)[0])
        loss = torch.nn.functional.mse_loss(pred, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr.step()
        losses.append(loss.item())
        if ema is not None:
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
    if ema is not None:
        with torch.no_grad():
            for p, e in zip(params, ema):
                p.copy_(e)
    pipe.denoiser.eval()
    pipe.text_encoder.eval()
    return losses


def recipe_losses(cfg: PretrainConfig, steps: int = TRACE_STEPS) -> list[float]:
    """The losses of the recipe's first ``steps`` steps, from scratch (what ``pretrain.json``'s
    ``loss_trace`` records, so a shipped model can be checked against the code that claims to make it)."""
    return _train(cfg, build_base_pipeline(cfg), steps, progress=False)


def _code_version() -> str:
    from ncppo import __version__

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "HEAD")
    dirty = commit and git("status", "--porcelain", "--untracked-files=no", "--", str(Path(__file__).parent.parent))
    return f"ncppo {__version__}" + (f" (git {commit}{', with uncommitted changes' if dirty else ''})" if commit else "")


def pretrain(cfg: PretrainConfig, out_dir: str | os.PathLike, progress: bool = True, command: str | None = None) -> dict:
    """Train from scratch and save the pipeline to ``out_dir`` (atomically); returns the training record
    (``command``: what made it, for the record)."""
    pipe = build_base_pipeline(cfg)
    start = time.perf_counter()
    losses = _train(cfg, pipe, cfg.steps, progress)
    tenth = max(1, len(losses) // 10)
    record = {"config": dataclasses.asdict(cfg), "fingerprint": cfg.fingerprint(), "format_version": FORMAT_VERSION,
              "seconds": time.perf_counter() - start, "unet_parameters": sum(p.numel() for p in pipe.denoiser.parameters()),
              "loss_first_10pct": float(np.mean(losses[:tenth])), "loss_last_10pct": float(np.mean(losses[-tenth:])),
              "loss_trace": losses[:TRACE_STEPS], "code_version": _code_version(), "command": command,
              "versions": {"torch": torch.__version__, "python": platform.python_version()},
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": torch.get_num_threads()}}
    with atomic_directory(out_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "pretrain.json").write_text(json.dumps({**record, "losses": losses}, indent=2))
    return record


def shipped_model(cfg: PretrainConfig) -> Path | None:
    """The packaged base model pretrained with ``cfg``, if the package ships one."""
    path = SHIPPED / f"toy-base-{cfg.fingerprint()}"
    return path if (path / "pretrain.json").is_file() else None


def base_model(cfg: PretrainConfig = PretrainConfig(), progress: bool = True) -> Path:
    """The base model for ``cfg``: the packaged one when the package ships it, else the cached one (pretrained on
    first use); a folder ``load_pipeline`` reads."""
    shipped = shipped_model(cfg)
    if shipped is not None:
        return shipped
    path = cache_root() / f"toy-base-{cfg.fingerprint()}"
    if not (path / "pretrain.json").is_file():
        pretrain(cfg, path, progress=progress)
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m ncppo.toy.pretrain FOLDER [--backbone dit]``: pretrain the default recipe (or its DiT twin) into
    ``FOLDER/toy-base-<hash>``."""
    parser = argparse.ArgumentParser(prog="python -m ncppo.toy.pretrain", description=main.__doc__)
    parser.add_argument("folder", help="where to write toy-base-<fingerprint>/ (the package's: ncppo/toy/base_models; "
                                       "the cache's, where an unshipped recipe such as the DiT's is found: ~/.cache/ncppo)")
    parser.add_argument("--backbone", choices=BACKBONES, default="unet", help="the default U-Net recipe, or its DiT twin")
    args = parser.parse_args(argv)
    cfg = PretrainConfig(backbone=args.backbone)
    out = Path(args.folder) / f"toy-base-{cfg.fingerprint()}"
    command = "python -m ncppo.toy.pretrain " + " ".join(argv if argv is not None else sys.argv[1:])
    record = pretrain(cfg, out, command=command)
    print(f"pretrained {cfg.fingerprint()} in {record['seconds']:.0f} s -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
