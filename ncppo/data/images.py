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


MAX_IMAGE_PIXELS = 4096 * 4096
"""The largest image (width x height) that ncppo decodes: 16.8 Mpx, ~50 MB as RGB (Pick-a-Pic's images are
at most ~1-4 Mpx). Checked from the header before any decoding, so a 633-byte JPEG claiming 10000x10000 px
(which Pillow's own limit of ~89 Mpx would decode into ~1 GB) is a bad image, counted or raised like a
corrupt one. Change it for the process (``ncppo.data.images.MAX_IMAGE_PIXELS = ...``), per reader
(``PreferencePairs(..., max_image_pixels=...)``) or per command (``--max-image-pixels``)."""

IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")


def _too_large(size: tuple[int, int], max_pixels: int | None) -> str | None:
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    w, h = size
    if w * h > limit:
        return (f"image too large (the header claims {w}x{h} = {w * h} px, over the limit of {limit} px: "
                "ncppo.data.images.MAX_IMAGE_PIXELS, --max-image-pixels)")
    return None


def _open_header(data: bytes, formats=None):
    """A PIL image with only its header parsed (nothing decoded); Pillow's own bomb warning is ours to report."""
    import warnings

    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data), formats=formats)


def decode_image(data: bytes | None, where: str, max_pixels: int | None = None):
    """Decode image bytes to an RGB PIL image; a clear :class:`DataError` for missing, corrupt, truncated or
    oversized data (over ``max_pixels``, by default :data:`MAX_IMAGE_PIXELS`, read from the header first)."""
    if not data:
        raise DataError(f"{where}: no image data")
    try:
        img = _open_header(data)
    except Exception as err:
        raise DataError(f"{where}: cannot decode image ({type(err).__name__}: {err})") from err
    with img:
        if (reason := _too_large(img.size, max_pixels)) is not None:
            raise DataError(f"{where}: {reason}")
        try:
            img.load()  # forces the full decode: a truncated file fails here, not later
            return img.convert("RGB")
        except Exception as err:
            raise DataError(f"{where}: cannot decode image ({type(err).__name__}: {err})") from err


def inspect_image(data: bytes | None, max_pixels: int | None = None) -> str | None:
    """Why ``data`` is not a usable JPEG/PNG/WebP image, from its bytes without decoding; None when it looks fine.

    Checks: present; magic bytes; the header parses and its size is within ``max_pixels``; the file ends
    where its format ends (JPEG end-of-image marker, PNG ``IEND`` chunk, WebP RIFF length), which catches
    truncation. Cheap (tens of microseconds): ``ncppo data filter`` runs it on every image it copies.
    """
    if not data:
        return "no image data"
    if data[:3] == b"\xff\xd8\xff":
        kind, whole = "JPEG", data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        kind, whole = "PNG", b"IEND" in data[-16:]
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        kind, whole = "WebP", int.from_bytes(data[4:8], "little") + 8 <= len(data)
    else:
        return f"not a JPEG, PNG or WebP image (starts with {data[:8]!r})"
    try:
        img = _open_header(data, formats=IMAGE_FORMATS)
    except Exception as err:
        return f"cannot read the {kind} header ({type(err).__name__}: {err})"
    with img:
        if (reason := _too_large(img.size, max_pixels)) is not None:
            return reason
    if not whole:
        return f"truncated {kind} (the data stops before the end of the image)"
    return None


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
