"""open_clip checkpoints (HPSv2's ViT-H-14) as transformers ``CLIPModel`` s, since open_clip itself is not
installable here. The architecture is read off the state dict's shapes; the weights are renamed, and the
fused attention input projection is split into q, k and v:

| open_clip | transformers |
|---|---|
| ``visual.conv1.weight`` | ``vision_model.embeddings.patch_embedding.weight`` |
| ``visual.class_embedding``, ``visual.positional_embedding`` | ``...embeddings.class_embedding``, ``...position_embedding.weight`` |
| ``visual.ln_pre``, ``visual.ln_post`` | ``vision_model.pre_layrnorm``, ``vision_model.post_layernorm`` |
| ``visual.proj`` (width x dim) | ``visual_projection.weight`` (transposed) |
| ``token_embedding``, ``positional_embedding``, ``ln_final`` | ``text_model.embeddings.token_embedding``, ``...position_embedding``, ``text_model.final_layer_norm`` |
| ``text_projection`` (width x dim) | ``text_projection.weight`` (transposed) |
| ``*transformer.resblocks.N.ln_1`` / ``ln_2`` | ``*encoder.layers.N.layer_norm1`` / ``layer_norm2`` |
| ``*.attn.in_proj_weight`` / ``in_proj_bias`` | ``*.self_attn.{q,k,v}_proj.weight`` / ``bias`` (thirds, in that order) |
| ``*.attn.out_proj``, ``*.mlp.c_fc``, ``*.mlp.c_proj`` | ``*.self_attn.out_proj``, ``*.mlp.fc1``, ``*.mlp.fc2`` |
| ``logit_scale`` | ``logit_scale`` |

Heads are ``width / 64`` (open_clip's default head width); the activation is GELU (open_clip's
``ViT-H-14``; OpenAI's checkpoints use QuickGELU: ``activation="quick_gelu"``).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ncppo.errors import StateError

HEAD_WIDTH = 64


def _layers(state: dict, prefix: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(rf"{re.escape(prefix)}transformer\.resblocks\.(\d+)\.", k))}
    return max(found) + 1 if found else 0


def clip_config_from_open_clip(state: dict, activation: str = "gelu"):
    """A ``CLIPConfig`` with the architecture of an open_clip state dict."""
    from transformers import CLIPConfig

    conv = state["visual.conv1.weight"]
    v_width, patch = conv.shape[0], conv.shape[-1]
    grid = int(round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5))
    t_width = state["token_embedding.weight"].shape[1]
    embed_dim = state["text_projection"].shape[1]
    vision = {"hidden_size": v_width, "intermediate_size": state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
              "num_hidden_layers": _layers(state, "visual."), "num_attention_heads": v_width // HEAD_WIDTH,
              "patch_size": patch, "image_size": grid * patch, "hidden_act": activation, "projection_dim": embed_dim}
    text = {"hidden_size": t_width, "intermediate_size": state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            "num_hidden_layers": _layers(state, ""), "num_attention_heads": t_width // HEAD_WIDTH,
            "vocab_size": state["token_embedding.weight"].shape[0],
            "max_position_embeddings": state["positional_embedding"].shape[0], "hidden_act": activation,
            "projection_dim": embed_dim, "eos_token_id": state["token_embedding.weight"].shape[0] - 1,
            "bos_token_id": state["token_embedding.weight"].shape[0] - 2, "pad_token_id": 0}
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=embed_dim)


def _block(src: str, dst: str, state: dict, out: dict) -> None:
    for a, b in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                 ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
        for p in ("weight", "bias"):
            out[f"{dst}.{b}.{p}"] = state[f"{src}.{a}.{p}"]
    for p in ("weight", "bias"):
        q, k, v = state[f"{src}.attn.in_proj_{p}"].chunk(3, dim=0)
        out[f"{dst}.self_attn.q_proj.{p}"], out[f"{dst}.self_attn.k_proj.{p}"], out[f"{dst}.self_attn.v_proj.{p}"] = q, k, v


def convert_open_clip_state_dict(state: dict) -> dict:
    """open_clip names -> transformers ``CLIPModel`` names (see the module docstring's table)."""
    out = {
        "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "visual_projection.weight": state["visual.proj"].t().contiguous(),
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "text_projection.weight": state["text_projection"].t().contiguous(),
        "logit_scale": state["logit_scale"].reshape(()),
    }
    for src, dst in (("visual.ln_pre", "vision_model.pre_layrnorm"), ("visual.ln_post", "vision_model.post_layernorm"),
                     ("ln_final", "text_model.final_layer_norm")):
        for p in ("weight", "bias"):
            out[f"{dst}.{p}"] = state[f"{src}.{p}"]
    for i in range(_layers(state, "visual.")):
        _block(f"visual.transformer.resblocks.{i}", f"vision_model.encoder.layers.{i}", state, out)
    for i in range(_layers(state, "")):
        _block(f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}", state, out)
    return out


def read_open_clip_state(path: str | Path) -> dict:
    """The state dict of an open_clip checkpoint file (``{"state_dict": ...}`` or bare; DDP's ``module.`` dropped)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError) as err:  # truncated, or not a torch file
        raise StateError(f"{path} cannot be read as a torch checkpoint ({str(err).splitlines()[0]})") from err
    state = data.get("state_dict", data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or "visual.conv1.weight" not in {k.removeprefix("module.") for k in state}:
        raise StateError(f"{path} is not an open_clip CLIP checkpoint (no visual.conv1.weight)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def open_clip_to_transformers(state: dict, activation: str = "gelu"):
    from transformers import CLIPModel

    model = CLIPModel(clip_config_from_open_clip(state, activation))
    converted = convert_open_clip_state_dict(state)
    result = model.load_state_dict(converted, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise StateError(f"conversion left tensors unmatched: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}")
    return model.eval()


def load_open_clip_checkpoint(path: str | Path, activation: str = "gelu"):
    """(``CLIPModel``, ``CLIPProcessor``) from a checkpoint file, or a folder holding one ``*.pt``/``*.bin`` and
    the CLIP tokenizer (and optionally preprocessor) files; without a preprocessor config, OpenAI's CLIP
    preprocessing at the model's image size is used (as open_clip does)."""
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer

    from ncppo.errors import MissingWeightsError

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix in (".pt", ".bin", ".pth"))
        if len(found) != 1:
            raise MissingWeightsError(f"{path}: expected one open_clip checkpoint (*.pt, *.pth or *.bin), found "
                                    f"{[p.name for p in found]}")
        path = found[0]
    if not any((folder / f).is_file() for f in ("vocab.json", "tokenizer.json")):
        raise MissingWeightsError(f"{folder}: no CLIP tokenizer files (vocab.json + merges.txt or tokenizer.json) "
                                  "beside the checkpoint; copy them from any OpenAI/LAION CLIP model folder")
    if (folder / "vocab.json").is_file() and not (folder / "tokenizer.json").is_file() \
            and not (folder / "merges.txt").is_file():
        raise MissingWeightsError(f"{folder}: vocab.json without merges.txt (the CLIP tokenizer needs both, or tokenizer.json)")
    model = open_clip_to_transformers(read_open_clip_state(path), activation)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    # the text is pooled at the end-of-text token: take its id from the tokenizer that makes the input
    model.config.text_config.eos_token_id = model.text_model.eos_token_id = tokenizer.eos_token_id
    size = model.config.vision_config.image_size
    if (folder / "preprocessor_config.json").is_file():
        image_processor = CLIPImageProcessor.from_pretrained(folder)
    else:
        image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
