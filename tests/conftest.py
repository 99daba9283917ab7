"""Shared fixtures: tiny SD1.5-/SDXL-class pipelines, built offline once per session."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_pipeline_dirs(tmp_path_factory):
    """Paths of a tiny SD1.5-class and a tiny SDXL-class pipeline saved in diffusers format."""
    from ncppo.models.tiny import save_tiny_pipeline

    root = tmp_path_factory.mktemp("pipelines")
    return {kind: save_tiny_pipeline(root / kind, kind) for kind in ("sd15", "sdxl")}


@pytest.fixture(scope="session")
def quick_world(tmp_path_factory):
    """``ncppo demo --quick`` run once per session in a fresh cache: the toy world's folder."""
    from ncppo.cli import main

    root = tmp_path_factory.mktemp("toy")
    mp = pytest.MonkeyPatch()
    mp.setenv("NCPPO_CACHE", str(root / "cache"))  # a fresh machine: the base model is pretrained here
    try:
        assert main(["demo", "--quick", "--out", str(root / "demo")]) == 0
    finally:
        mp.undo()
    return root / "demo"


@pytest.fixture(params=["sd15", "sdxl"])
def kind(request):
    return request.param


@pytest.fixture
def pipeline(tiny_pipeline_dirs, kind):
    from ncppo.models.loading import load_pipeline

    return load_pipeline(tiny_pipeline_dirs[kind])


def random_pairs(batch_size: int = 2, size: int = 32, seed: int = 0):
    from ncppo.batch import PreferenceBatch

    g = torch.Generator().manual_seed(seed)
    prompts = ["a red circle", "a blue square", "a green star", "a pink ring"][:batch_size]
    return PreferenceBatch(
        pixel_values_w=torch.rand(batch_size, 3, size, size, generator=g) * 2 - 1,
        pixel_values_l=torch.rand(batch_size, 3, size, size, generator=g) * 2 - 1,
        prompts=prompts,
    )


def perturb_lora(unet, seed: int = 0, scale: float = 0.1) -> None:
    """Give the LoRA B matrices (zero at init) random values so the adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def noised_random_pairs(model, seed: int = 0):
    """:func:`random_pairs` encoded by ``model`` and noised by its process (winners and losers), one generator."""
    from ncppo.step import noise_pairs

    g = torch.Generator().manual_seed(seed)
    return noise_pairs(model, model.encode_batch(random_pairs(), g), True, g)
