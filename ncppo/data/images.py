"""Decoding and preparing images for training: resize, crop, flip, and SDXL's micro-conditioning sizes."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from ncppo.data.schema import DataError


@dataclass
class PreparedImage:
    pixels: object  # torch.Tensor (3, R, R) in [-1, 1]
    original_size: tuple[int, int]  # (h, w) before resizing: SDXL's original_size
    crop_top_left: tuple[int, int]  # SDXL's crops_coords_top_left


def decode_image(data: bytes | None, where: str):
    """Decode image bytes to an RGB PIL image; a clear :class:`DataError` for missing, corrupt or truncated data."""
    from PIL import Image

    if not data:
        raise DataError(f"{where}: no image data")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # forces the full decode: a truncated file fails here, not later
            return img.convert("RGB")
    except Exception as err:
        raise DataError(f"{where}: cannot decode image ({type(err).__name__}: {err})") from err


def prepare_image(img, resolution: int, *, center_crop: bool = True, flip: bool = False,
                  rng: np.random.Generator | None = None) -> PreparedImage:
    """Resize the shorter side to ``resolution``, crop a square (centre or random), optionally flip."""
    import torch
    from PIL import Image

    w, h = img.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    resized = img.resize((new_w, new_h), Image.BILINEAR)
    if center_crop or rng is None:
        top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
    else:
        top, left = int(rng.integers(0, new_h - resolution + 1)), int(rng.integers(0, new_w - resolution + 1))
    cropped = resized.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(cropped, dtype=np.float32) / 127.5 - 1.0
    pixels = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    if flip:
        pixels = pixels.flip(-1)
    return PreparedImage(pixels, (h, w), (top, left))


def sdxl_time_ids(image: PreparedImage, resolution: int):
    """``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)``, as SDXL was trained."""
    import torch

    return torch.tensor([*image.original_size, *image.crop_top_left, resolution, resolution], dtype=torch.float32)
