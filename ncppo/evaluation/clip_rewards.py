"""CLIP-based reward models, loaded from local files only (transformers format).

- PickScore: ``logit_scale.exp() * cos(image, text)`` of a CLIP model fine-tuned on Pick-a-Pic
  (``yuvalkirstain/PickScore_v1``; processor from ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``), both in one folder.
- CLIP score: ``100 * max(cos(image, text), 0)`` (torchmetrics' convention) for any transformers CLIP.
- LAION aesthetic predictor: an MLP head (768-1024-128-64-16-1, no activations, the ``improved-aesthetic-
  predictor`` weights ``sac+logos+ava1-l14-linearMSE.pth``) on the L2-normalised CLIP ViT-L/14 image embedding.
- HPSv2 / HPSv2.1: ``cos(image, text)`` of an open_clip ViT-H-14 checkpoint converted to a transformers CLIP
  (see ``ncppo.evaluation.open_clip_convert``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ncppo.errors import MissingWeightsError, StateError  # noqa: F401 (MissingWeightsError: also importable from here)


def _require_dir(path, reward: str, expected: str) -> Path:
    if not path:
        raise MissingWeightsError(f"reward {reward!r} needs --weights: {expected}")
    path = Path(path)
    if not path.exists():
        raise MissingWeightsError(f"{reward}: {path} does not exist; expected {expected}")
    return path


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def check_transformers_folder(path: Path, reward: str, what: str = "a transformers CLIP model folder") -> None:
    """A :class:`MissingWeightsError` naming the first thing a transformers model folder lacks: its
    ``config.json``, its weights (a single file, or an index and every shard it lists) or the image
    processor's config (what a partly copied or partly downloaded folder lacks)."""
    import json

    def missing(thing: str):
        return MissingWeightsError(f"{reward}: {path} has no {thing}; expected {what} (a complete copy of it)")

    if not (path / "config.json").is_file():
        raise missing("config.json")
    found = [name for name in WEIGHT_FILES if (path / name).is_file()]
    if not found:
        raise missing(f"model weights ({', '.join(WEIGHT_FILES)})")
    if found[0].endswith(".index.json"):
        try:
            shards = sorted(set(json.loads((path / found[0]).read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise StateError(f"{reward}: {path / found[0]} is damaged ({err!r})") from err
        absent = [name for name in shards if not (path / name).is_file()]
        if absent:
            raise MissingWeightsError(f"{reward}: {path} lacks {len(absent)} of the {len(shards)} weight shards that "
                                      f"{found[0]} lists ({', '.join(absent[:3])}{', ...' if len(absent) > 3 else ''})")
    if not any((path / name).is_file() for name in PROCESSOR_FILES):
        raise missing(f"image processor config ({' or '.join(PROCESSOR_FILES)})")


def _from_pretrained(loader, path: Path, reward: str):
    """``loader.from_pretrained(path)`` with transformers' and safetensors' errors on a damaged folder as one line."""
    try:
        return loader.from_pretrained(path)
    except (OSError, ValueError, KeyError) as err:
        raise StateError(f"{reward}: {path} cannot be loaded as {loader.__name__} ({str(err).splitlines()[0]})") from err
    except Exception as err:  # safetensors' SafetensorError on a truncated file derives from Exception only
        if type(err).__name__ != "SafetensorError":
            raise
        raise StateError(f"{reward}: a weights file in {path} is damaged or truncated ({err})") from err


class ClipReward:
    """Shared machinery: embed images and prompts with a CLIP model and its processor, in batches."""

    name = "clip"

    def __init__(self, model, processor, batch_size: int = 32, device: str | None = None):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.eval().to(self.device)
        self.processor = processor
        self.batch_size = batch_size

    @classmethod
    def from_dir(cls, path, **kwargs):
        from transformers import CLIPModel, CLIPProcessor

        path = _require_dir(path, cls.name, "a folder with a transformers CLIP model and its processor "
                                              "(config.json, model weights, preprocessor and tokenizer files)")
        check_transformers_folder(path, cls.name)
        return cls(_from_pretrained(CLIPModel, path, cls.name), _from_pretrained(CLIPProcessor, path, cls.name), **kwargs)

    @torch.no_grad()
    def embed(self, images: Sequence[np.ndarray], prompts: Sequence[str] | None):
        image_embeds, text_embeds = [], []
        for start in range(0, len(images), self.batch_size):
            pixel = self.processor(images=[np.asarray(i) for i in images[start:start + self.batch_size]],
                                   return_tensors="pt")["pixel_values"].to(self.device)
            image_embeds.append(_features(self.model.get_image_features(pixel_values=pixel)))
            if prompts is not None:
                tokens = self.processor(text=list(prompts[start:start + self.batch_size]), padding=True,
                                        truncation=True, max_length=77, return_tensors="pt").to(self.device)
                text_embeds.append(_features(self.model.get_text_features(**tokens)))
        normed = lambda x: torch.nn.functional.normalize(torch.cat(x).float(), dim=-1)  # noqa: E731
        return normed(image_embeds), (normed(text_embeds) if prompts is not None else None)

    @torch.no_grad()
    def cosine(self, images, prompts) -> torch.Tensor:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        image, text = self.embed(images, prompts)
        return (image * text).sum(-1)

    def __call__(self, images, prompts) -> np.ndarray:
        return (100 * self.cosine(images, prompts).clamp(min=0)).cpu().numpy().astype(np.float64)


def _features(out) -> torch.Tensor:
    """transformers 5 returns a model output from ``get_*_features``; older versions a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class PickScore(ClipReward):
    """PickScore: ``logit_scale.exp() * cos(image, text)`` of the PickScore_v1 CLIP."""

    name = "pickscore"

    @torch.no_grad()
    def __call__(self, images, prompts) -> np.ndarray:
        return (self.model.logit_scale.exp() * self.cosine(images, prompts)).cpu().numpy().astype(np.float64)


class HPSv2(ClipReward):
    """HPSv2 / HPSv2.1: ``cos(image, text)`` of the open_clip checkpoint, converted to a transformers CLIP."""

    name = "hpsv2"

    @classmethod
    def from_dir(cls, path, **kwargs):
        from ncppo.evaluation.open_clip_convert import load_open_clip_checkpoint

        path = _require_dir(path, cls.name, "an open_clip checkpoint (HPS_v2_compressed.pt or HPS_v2.1_compressed.pt) "
                                            "or a folder with it and the CLIP tokenizer files")
        model, processor = load_open_clip_checkpoint(path)
        return cls(model, processor, **kwargs)

    def __call__(self, images, prompts) -> np.ndarray:
        return self.cosine(images, prompts).cpu().numpy().astype(np.float64)


AESTHETIC_LAYERS = ((0, 1024), (2, 128), (4, 64), (6, 16), (7, 1))  # (index in the Sequential, out features)


def aesthetic_head(embed_dim: int = 768) -> torch.nn.Sequential:
    """The improved-aesthetic-predictor MLP (its dropouts are identity at inference)."""
    d = torch.nn.Dropout
    return torch.nn.Sequential(torch.nn.Linear(embed_dim, 1024), d(0.2), torch.nn.Linear(1024, 128), d(0.2),
                               torch.nn.Linear(128, 64), d(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))


class AestheticScore(ClipReward):
    """The LAION improved aesthetic predictor: an MLP head on the normalised CLIP ViT-L/14 image embedding."""

    name = "aesthetic"

    def __init__(self, model, processor, head: torch.nn.Module, **kwargs):
        super().__init__(model, processor, **kwargs)
        self.head = head.eval().to(self.device)

    @classmethod
    def from_dir(cls, path, **kwargs):
        from transformers import CLIPModel, CLIPProcessor

        path = _require_dir(path, cls.name, "a folder with a transformers CLIP ViT-L/14 model and the head's "
                                            "weights (a .pth or .safetensors file with layers.0 ... layers.7)")
        check_transformers_folder(path, cls.name, "a transformers CLIP ViT-L/14 model folder with the aesthetic head in it")
        heads = sorted(p for p in path.iterdir() if p.suffix in (".pth", ".pt") or
                       (p.suffix == ".safetensors" and "aesthetic" in p.name))
        if len(heads) != 1:
            raise MissingWeightsError(f"aesthetic: expected exactly one head file (*.pth, *.pt or aesthetic*.safetensors) "
                                      f"in {path}, found {[p.name for p in heads]}")
        if heads[0].suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(heads[0]))
        else:
            state = torch.load(heads[0], map_location="cpu", weights_only=True)
        state = {k.removeprefix("layers."): v for k, v in state.items()}
        model = _from_pretrained(CLIPModel, path, cls.name)
        head = aesthetic_head(model.config.projection_dim)
        try:
            head.load_state_dict(state)
        except RuntimeError as err:
            raise StateError(f"aesthetic: {heads[0]} is not an improved-aesthetic-predictor head for a "
                             f"{model.config.projection_dim}-d CLIP embedding ({err})") from err
        return cls(model, _from_pretrained(CLIPProcessor, path, cls.name), head, **kwargs)

    @torch.no_grad()
    def __call__(self, images, prompts=None) -> np.ndarray:
        image, _ = self.embed(images, None)
        return self.head(image).squeeze(-1).cpu().numpy().astype(np.float64)
