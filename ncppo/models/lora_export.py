"""LoRA files for other tools, and finding the LoRA in a folder.

* :func:`export_kohya` writes a diffusers-format U-Net LoRA (``pytorch_lora_weights.safetensors``, as
  :meth:`~ncppo.models.preference_model.PreferenceModel.save_lora` writes it) in the kohya key format
  that AUTOMATIC1111, ComfyUI, SD.Next and InvokeAI read (``lora_unet_..._to_q.lora_down.weight``,
  ``.lora_up.weight``, ``.alpha``), with training metadata in the safetensors header (kohya's ``ss_*``
  keys, the ``modelspec.*`` keys, and ``ncppo.*`` keys: base model, objective and its settings, beta,
  steps, data, version). diffusers' ``pipe.load_lora_weights(FILE)`` reads it through its kohya loader.
  The conversion is diffusers' own (``convert_state_dict_to_kohya``); the alphas are the LoRA's own
  (diffusers' converter writes alpha = rank whatever the LoRA's alpha was).
* :func:`find_lora` resolves what a user passes as ``--lora``: a LoRA folder, a ``.safetensors`` file,
  or a training run's folder (its ``lora/``); a folder without a LoRA is refused with the folders in it
  that hold one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ncppo.errors import UsageError
from ncppo.io import atomic_file
from ncppo.models.loading import ModelLoadError

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
KOHYA_SUFFIX = "_kohya.safetensors"  # lora/<run name>_kohya.safetensors
ARCHITECTURES = {"sd15": ("sd_v1", "stable-diffusion-v1/lora"), "sdxl": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora"),
                 "pixel": ("ncppo_pixel", "ncppo-pixel/lora")}


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A diffusers-format LoRA (a folder holding :data:`LORA_FILE`, or the file): its tensors and its adapter
    settings (``lora_alpha``, ``r``, ``alpha_pattern``, ``rank_pattern`` ... of the U-Net's peft config, as
    diffusers writes them into the header; empty when the file has none)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    file = path / LORA_FILE if path.is_dir() else path
    if not file.is_file():
        raise ModelLoadError(f"{path}: no {LORA_FILE} (not a diffusers-format LoRA)")
    with safe_open(str(file), "pt") as handle:
        header = handle.metadata() or {}
    adapter = {}
    if "lora_adapter_metadata" in header:
        raw = json.loads(header["lora_adapter_metadata"])
        adapter = {k.split(".", 1)[1]: v for k, v in raw.items() if k.startswith("unet.")}
    return load_file(str(file)), adapter


def _module_value(module: str, patterns: dict, default):
    """peft's ``rank_pattern`` / ``alpha_pattern``: the value of the first pattern matching the module's name."""
    for pattern, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module):
            return value
    return default


def to_kohya(state_dict: dict[str, torch.Tensor], adapter: dict) -> dict[str, torch.Tensor]:
    """A diffusers-format U-Net LoRA (``unet.<module>.lora.down.weight`` or ``.lora_A.weight``) in kohya's
    key format, with each module's alpha (float32) from ``adapter`` (``lora_alpha``, ``alpha_pattern``;
    missing: alpha = rank, peft's and kohya's default)."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya, convert_unet_state_dict_to_peft

    others = sorted({k.split(".", 1)[0] for k in state_dict if not k.startswith("unet.")})
    if others:
        raise UsageError(f"only U-Net LoRAs are exported to the kohya format; this one also holds {', '.join(others)}")
    peft = convert_unet_state_dict_to_peft(state_dict)  # unet.<module>.lora_A.weight / lora_B.weight
    kohya = convert_state_dict_to_kohya(peft)
    modules = {k[len("unet."):-len(".lora_A.weight")]: v for k, v in peft.items() if k.endswith(".lora_A.weight")}
    names = {}
    for module in modules:  # the kohya name of each module: diffusers' converter's rule
        key = f"lora_unet.{module}.lora_down.weight"
        names[key.replace(".", "_", key.count(".") - 2).split(".")[0]] = module
    for key in [k for k in kohya if k.endswith(".alpha")]:
        prefix = key[: -len(".alpha")]
        rank = kohya[f"{prefix}.lora_down.weight"].shape[0]
        module = names.get(prefix)
        alpha = adapter.get("lora_alpha") or rank
        if module is not None:
            alpha = _module_value(module, adapter.get("alpha_pattern"), alpha)
        kohya[key] = torch.tensor(float(alpha), dtype=torch.float32)
    return {k: v.detach().to("cpu").contiguous() for k, v in kohya.items()}


def training_metadata(*, kind: str, base_model: str, rank: int, alpha: float, title: str, info: dict) -> dict[str, str]:
    """The safetensors header of an exported LoRA: kohya's ``ss_*`` keys, the SAI ``modelspec.*`` keys and
    ``ncppo.<key>`` for every item of ``info`` (JSON for anything that is not a string)."""
    import time

    version, architecture = ARCHITECTURES.get(kind, (kind, f"{kind}/lora"))
    meta = {
        "ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": f"{alpha:g}",
        "ss_base_model_version": version, "ss_sd_model_name": Path(base_model).name or base_model,
        "ss_output_name": title, "ss_training_comment": f"trained with ncppo ({info.get('objective', '?')})",
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": architecture,
        "modelspec.implementation": "diffusers", "modelspec.title": title,
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if "steps" in info:
        meta["ss_steps"] = str(info["steps"])
    if "learning_rate" in info:
        meta["ss_learning_rate"] = str(info["learning_rate"])
    for key, value in info.items():
        meta[f"ncppo.{key}"] = value if isinstance(value, str) else json.dumps(value, default=str)
    return meta


def export_kohya(lora: str | Path, out_file: str | Path, metadata: dict[str, str] | None = None) -> Path | None:
    """Write the diffusers-format LoRA ``lora`` (folder or file) to ``out_file`` in kohya's key format, with
    ``metadata`` (strings) in the header; through a temporary file and a rename. A transformer's LoRA (SD3)
    has no kohya U-Net form: nothing is written and None returned (ComfyUI reads its diffusers file as it is)."""
    from safetensors.torch import save_file

    state_dict, adapter = read_lora(lora)
    if state_dict and all(k.startswith("transformer.") for k in state_dict):
        return None
    kohya = to_kohya(state_dict, adapter)
    out_file = Path(out_file)
    with atomic_file(out_file) as tmp:
        save_file(kohya, str(tmp), metadata={"format": "pt", **(metadata or {})})
    return out_file


def kohya_file_name(run_name: str) -> str:
    """``<run name>_kohya.safetensors`` with the name made safe for a file name (A1111 shows the stem)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", run_name).strip("._") or "ncppo_lora"
    return f"{stem}{KOHYA_SUFFIX}"


def read_metadata(file: str | Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file."""
    from safetensors import safe_open

    with safe_open(str(file), "pt") as handle:
        return dict(handle.metadata() or {})


def find_lora(path: str | Path) -> Path:
    """What ``--lora PATH`` loads: a ``.safetensors`` file as it is (diffusers or kohya keys), a folder holding
    :data:`LORA_FILE` (a run's ``lora/`` or one of its ``checkpoints/step-N/``), or a training run's folder:
    its ``lora/``. Anything else is a :class:`ModelLoadError` naming the folders inside that hold a LoRA."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--lora {path} does not exist")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ModelLoadError(f"--lora {path}: not a .safetensors file (give a LoRA folder or its .safetensors file)")
        return path
    if (path / LORA_FILE).is_file():
        return path
    if (path / "lora" / LORA_FILE).is_file():
        return path / "lora"
    holders = sorted(p.parent for p in path.glob(f"*/{LORA_FILE}"))
    holders += sorted((p.parent for p in path.glob(f"checkpoints/*/{LORA_FILE}")),
                      key=lambda p: (len(p.name), p.name))
    if (path / "diffusion_pytorch_model.safetensors").is_file() or (path / "unet").is_dir():
        why = "a fully fine-tuned U-Net, not a LoRA: put it in the base pipeline (UNet2DConditionModel.from_pretrained)"
    elif (path / "trainable.safetensors").is_file():
        why = ("a checkpoint without a LoRA file (written by an older ncppo, or of a full fine-tune); "
               "ncppo.evaluation.runs.apply_checkpoint loads it")
    else:
        why = f"no {LORA_FILE} in it"
    where = f"; folders in it that hold one: {', '.join(str(p) for p in holders)}" if holders else ""
    raise ModelLoadError(f"--lora {path}: not a diffusers-format LoRA ({why}){where}")
