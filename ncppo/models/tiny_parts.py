"""The tiny models' shared parts: an offline-trained CLIP BPE tokenizer, tiny CLIP text encoders and a tiny
VAE (used by :mod:`ncppo.models.tiny` for the U-Nets and :mod:`ncppo.models.transformers_tiny` for the
transformers, so neither imports the other's builders)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

_COLOURS = ["red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "black", "white", "grey", "cyan", "magenta", "gold", "silver"]
_SHAPES = ["circle", "square", "triangle", "star", "ring", "cross", "heart", "diamond", "stripe", "dot", "blob", "line"]
_WORDS = ["a", "an", "the", "of", "on", "in", "with", "and", "at", "by", "photo", "picture", "painting", "drawing", "image", "of", "small", "large", "big", "tiny", "bright", "dark", "cat", "dog", "bird", "tree", "house", "car", "city", "mountain", "river", "sky", "sea", "beach", "forest", "flower", "portrait", "anime", "style", "detailed", "realistic", "art", "digital", "oil", "watercolor", "sketch", "night", "day", "sun", "moon", "cloud", "rain", "snow", "background", "left", "right", "top", "bottom", "centre", "center", "two", "three", "several", "many", "one", "person", "woman", "man", "child", "robot", "castle", "space", "planet", "galaxy", "street", "room", "table", "chair", "window", "door", "book", "cup", "apple", "banana"]


def default_corpus() -> list[str]:
    """A small built-in text corpus so a tokenizer can be trained without any download."""
    lines = [f"a {c} {s} on a {c2} background" for c in _COLOURS for s in _SHAPES for c2 in _COLOURS[:3]]
    lines += [" ".join(_WORDS[i : i + 7]) for i in range(0, len(_WORDS), 3)]
    return lines


def train_clip_tokenizer(corpus: Iterable[str] | None = None, vocab_size: int = 1000, model_max_length: int = 77):
    """Train a byte-level CLIP BPE tokenizer (vocabulary >= 256 bytes + special tokens), offline."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    base = CLIPTokenizer(model_max_length=model_max_length)
    trained = base.train_new_from_iterator(
        list(corpus) if corpus is not None else default_corpus(),
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is in the vocabulary: no unknowns
    )
    return _canonical_ids(trained)


def _canonical_ids(tokenizer):
    """The same tokenizer with deterministic token ids. The BPE trainer gives the alphabet's tokens (e.g.
    ``d</w>``) ids in hash-set order, which changes from run to run; merges name tokens by text, so
    sorting the ids of the non-merged tokens by text changes nothing else."""
    import json
    import tempfile

    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        path = Path(tmp) / "tokenizer.json"
        data = json.loads(path.read_text())
        vocab = data["model"]["vocab"]
        merged = {"".join(m) if isinstance(m, list) else m.replace(" ", "") for m in data["model"]["merges"]}
        special = {t["content"] for t in data["added_tokens"]}
        alphabet = sorted((t for t in vocab if t not in merged and t not in special), key=lambda t: vocab[t])
        for token, new_id in zip(sorted(alphabet), [vocab[t] for t in alphabet]):
            vocab[token] = new_id
        path.write_text(json.dumps(data))
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=tokenizer.model_max_length)


def tiny_text_encoder(vocab_size: int, hidden: int, with_projection: bool, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=hidden,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config).eval()


def _vae(latent_channels: int, seed: int, block_out_channels: Sequence[int] = (16, 32)):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    n = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=32,
    ).eval()
