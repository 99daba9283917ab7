"""Generated image sets on disk: ``ncppo generate``'s folder layout, written resumably and read back.

``OUT/images/p{prompt:05d}-i{image:02d}.png`` plus ``OUT/manifest.jsonl`` (one row per image: id, prompt,
its metadata, prompt and image index, seed, model, LoRA, path) and ``OUT/generation.json`` (the settings).
Images are written atomically and the manifest is rewritten atomically after every batch, so a killed
run leaves only whole images; a rerun with the same settings skips the images that exist and decode,
and a rerun with other settings is refused (it would mix two generations in one folder). The folder
follows :func:`ncppo.io.guard_output_dir`: not the model, LoRA or prompt file, nor inside or around them,
not an existing file, and not a non-empty folder that ``ncppo generate`` did not write (``overwrite``
removes it first).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ncppo.configuration import flatten
from ncppo.errors import OutputDirError, StateError, UsageError
from ncppo.evaluation.generation import GenerationSpec, render_batch
from ncppo.evaluation.prompts import PromptSet
from ncppo.io import (
    atomic_write_text,
    open_output_dir,
    output_owner,
    read_json_object,
)

MANIFEST = "manifest.jsonl"
SETTINGS = "generation.json"
COMMAND = "generate"


@dataclass(frozen=True)
class ImageRecord:
    """One row of ``manifest.jsonl``: an image of a generated set and what identifies it."""

    id: str
    prompt: str
    prompt_index: int
    image_index: int
    seed: int
    path: str  # relative to the folder
    model: str = ""
    lora: str = ""
    metadata: dict | None = None


def image_id(prompt_index: int, image_index: int) -> str:
    return f"p{prompt_index:05d}-i{image_index:02d}"


def read_manifest(folder: str | Path) -> list[ImageRecord]:
    """The manifest's rows; a missing or unreadable manifest is an error naming the file and line."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {MANIFEST} (is it an `ncppo generate` output?)")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            records.append(ImageRecord(**json.loads(line)))
        except (json.JSONDecodeError, TypeError) as err:
            raise StateError(f"{path}:{number}: not a manifest row ({err})") from err
    return records


def pair_by_prompt_and_seed(a: list[ImageRecord], b: list[ImageRecord]) -> list[tuple[ImageRecord, ImageRecord]]:
    """Records of two sets with the same (prompt, seed), in ``a``'s order: the images a paired comparison uses."""
    b_by_key = {(r.prompt, r.seed): r for r in b}
    return [(ra, b_by_key[(ra.prompt, ra.seed)]) for ra in a if (ra.prompt, ra.seed) in b_by_key]


def load_image(folder: str | Path, record: ImageRecord) -> np.ndarray:
    from PIL import Image

    with Image.open(Path(folder) / record.path) as image:
        return np.asarray(image.convert("RGB"))


def _valid_png(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
        return True
    except (OSError, SyntaxError):
        return False


def _save_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    # not io.atomic_file: its sweep of the folder for stale files would make a set of n images O(n^2)
    tmp = path.with_name(f".tmp-{path.name}")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


def generate_image_set(pipe, prompts: PromptSet, out_dir: str | Path, spec: GenerationSpec, *, model: str = "",
                       lora: str = "", settings: dict | None = None, progress: bool = True,
                       overwrite: bool = False) -> dict:
    """Generate (or finish generating) ``spec`` into ``out_dir``; returns counts of made and reused images."""
    out = Path(out_dir)
    earlier = (out / SETTINGS).is_file() and output_owner(out) is None  # written before outputs were marked
    inputs = [p for p in (model, lora, prompts.source) if p and Path(p).exists()]
    open_output_dir(out, COMMAND, inputs=inputs, overwrite=overwrite, adopt=earlier)
    (out / "images").mkdir(exist_ok=True)
    wanted = {"spec": {k: v for k, v in asdict(spec).items() if k not in ("prompts", "batch_size")},
              "prompt_source": prompts.source, "prompts": len(prompts), "model": model, "lora": lora, **(settings or {})}
    settings_path = out / SETTINGS
    if settings_path.is_file():
        try:
            found = json.loads(settings_path.read_text())
        except ValueError as err:
            raise StateError(f"{settings_path} is damaged ({err}); pass --overwrite to generate the folder again") from err
        if found != json.loads(json.dumps(wanted)):
            changed = sorted(k for k in set(found) | set(wanted) if found.get(k) != json.loads(json.dumps(wanted)).get(k))
            raise OutputDirError(f"{out} holds a generation with other settings ({', '.join(changed)} differ); "
                             "use another --out, or pass --overwrite to replace it")
    else:
        atomic_write_text(settings_path, json.dumps(wanted, indent=2))
    records = {r.id: r for r in (read_manifest(out) if (out / MANIFEST).is_file() else [])}
    todo, reused = [], 0
    for p, k in spec.items():
        rid = image_id(p, k)
        if rid in records and _valid_png(out / records[rid].path):
            reused += 1
        else:
            records.pop(rid, None)
            todo.append((p, k))
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    bar = tqdm(total=len(todo), desc=f"generate {model or 'model'}", unit="img", disable=not progress)
    for start in range(0, len(todo), spec.batch_size):
        chunk = todo[start:start + spec.batch_size]
        images = render_batch(pipe, spec, chunk)
        for (p, k), image in zip(chunk, images):
            rid = image_id(p, k)
            rel = f"images/{rid}.png"
            _save_png(image, out / rel)
            records[rid] = ImageRecord(rid, spec.prompts[p], p, k, spec.seed_for(p, k), rel, model, lora,
                                       prompts.metadata[p] if prompts.metadata else {})
        _write_manifest(out, records)
        bar.update(len(chunk))
    bar.close()
    _write_manifest(out, records)
    return {"generated": len(todo), "reused": reused, "total": len(records)}


def _write_manifest(out: Path, records: dict[str, ImageRecord]) -> None:
    rows = [json.dumps(asdict(r)) for r in sorted(records.values(), key=lambda r: (r.prompt_index, r.image_index))]
    atomic_write_text(out / MANIFEST, "\n".join(rows) + ("\n" if rows else ""))


# -- pairing two generated sets ---------------------------------------------------------------------------
IDENTITY_KEYS = ("model", "lora")  # what may differ between two sets that are compared: the model under test


class SettingsMismatchError(UsageError):
    """Two generated sets were made with other settings than the model and LoRA; the message names the keys."""


@dataclass
class Pairing:
    """Two generated sets paired by (prompt, seed): ``pairs`` in ``a``'s order, the images of each side
    without a partner, and the generation settings that differ (flattened key -> (a's value, b's value))."""

    a_dir: Path
    b_dir: Path
    a_records: list[ImageRecord]
    b_records: list[ImageRecord]
    pairs: list[tuple[ImageRecord, ImageRecord]]
    unpaired_a: list[ImageRecord]
    unpaired_b: list[ImageRecord]
    differences: dict[str, tuple]
    unchecked: list[Path]  # sets without a generation.json: their settings could not be compared

    @property
    def unpaired(self) -> int:
        return len(self.unpaired_a) + len(self.unpaired_b)

    @property
    def prompts(self) -> int:
        """Distinct prompts among the pairs (the bootstrap units of a win rate)."""
        return len({ra.prompt for ra, _ in self.pairs})

    def notes(self) -> list[str]:
        """One line per thing a reader of a comparison must know: unpaired images, unchecked or differing settings."""
        out = []
        for folder, missing, records in ((self.a_dir, self.unpaired_a, self.a_records),
                                         (self.b_dir, self.unpaired_b, self.b_records)):
            if missing:
                examples = ", ".join(r.id for r in missing[:3]) + (", ..." if len(missing) > 3 else "")
                out.append(f"{len(missing)} of {len(records)} images of {folder} have no partner (same prompt and "
                           f"seed) in the other set and are left out (e.g. {examples})")
        for folder in self.unchecked:
            out.append(f"{folder} has no {SETTINGS}: its generation settings could not be checked against the other set")
        if self.differences:
            out.append("compared despite other generation settings (--allow-mismatch): " + _describe(self.differences))
        if self.pairs and self.prompts < 5:
            out.append(f"only {self.prompts} prompt(s) are paired: a win rate's interval over so few prompts means little")
        return out


def read_settings(folder: str | Path) -> dict | None:
    """The set's ``generation.json`` (``None`` when it has none); a damaged one is a :class:`StateError`."""
    path = Path(folder) / SETTINGS
    return read_json_object(path) if path.is_file() else None


def _describe(differences: dict[str, tuple]) -> str:
    return "; ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in differences.items())


def _ordered_prompts(records: list[ImageRecord]) -> list[str]:
    return [p for _, p in sorted({(r.prompt_index, r.prompt) for r in records})]


def settings_differences(a_settings: dict, b_settings: dict, a_records: list[ImageRecord] | None = None,
                         b_records: list[ImageRecord] | None = None) -> dict[str, tuple]:
    """The generation settings (flattened, e.g. ``spec.num_inference_steps``) that differ between two sets,
    other than the model and LoRA. The prompt file's path (``prompt_source``) counts only when the prompts
    in the manifests differ too (one file may be named by two paths, or by its packaged set name)."""
    fa, fb = flatten(a_settings), flatten(b_settings)
    keys = sorted(k for k in set(fa) | set(fb) if k not in IDENTITY_KEYS and fa.get(k) != fb.get(k))
    if "prompt_source" in keys and a_records is not None and b_records is not None \
            and _ordered_prompts(a_records) == _ordered_prompts(b_records):
        keys.remove("prompt_source")
    return {k: (fa.get(k), fb.get(k)) for k in keys}


def print_note(message: str) -> None:
    """A notice for the person at the console: ``ncppo: note: ...`` on stderr."""
    print(f"ncppo: note: {message}", file=sys.stderr)


def pair_image_sets(a_dir: str | Path, b_dir: str | Path, allow_mismatch: bool = False,
                    notify: Callable[[str], None] | None = print_note) -> Pairing:
    """Pair two ``ncppo generate`` outputs by (prompt, seed): what ``ncppo compare``, ``ncppo report`` and
    ``ncppo study create`` compare.

    Refused (:class:`SettingsMismatchError`, naming the keys) when the two ``generation.json`` differ in
    anything but the model and LoRA, unless ``allow_mismatch``; refused when nothing pairs. Every
    :meth:`Pairing.notes` line (unpaired images with examples, unchecked or differing settings, too few
    prompts) goes to ``notify`` (default: one ``ncppo: note:`` line each on stderr; ``None``: silent).
    """
    a_dir, b_dir = Path(a_dir), Path(b_dir)
    a_records, b_records = read_manifest(a_dir), read_manifest(b_dir)
    found = {folder: read_settings(folder) for folder in (a_dir, b_dir)}
    unchecked = [folder for folder, s in found.items() if s is None]
    differences = {} if unchecked else settings_differences(found[a_dir], found[b_dir], a_records, b_records)
    if differences and not allow_mismatch:
        raise SettingsMismatchError(
            f"{a_dir} and {b_dir} were generated with other settings ({_describe(differences)}); only the model "
            "and LoRA may differ between sets that are compared. Generate both with the same settings, or pass "
            "--allow-mismatch to compare them anyway")
    pairs = pair_by_prompt_and_seed(a_records, b_records)
    if not pairs:
        raise UsageError(f"{a_dir} and {b_dir} share no (prompt, seed): they were not generated from the same "
                         "prompts and seed")
    paired_a, paired_b = {id(ra) for ra, _ in pairs}, {id(rb) for _, rb in pairs}
    pairing = Pairing(a_dir, b_dir, a_records, b_records, pairs, [r for r in a_records if id(r) not in paired_a],
                      [r for r in b_records if id(r) not in paired_b], differences, unchecked)
    if notify is not None:
        for line in pairing.notes():
            notify(line)
    return pairing
