"""``ncppo study create``: pair two generation outputs by (prompt, seed) into a study folder.

The study folder holds ``study.sqlite`` (items, annotators, votes), ``images/`` (the paired images under
random names that say nothing of the model: the server serves nothing else) and ``study.json`` (where
the images came from). It is built in a scratch folder and renamed into place at the end, so a crash
leaves the earlier state (no study, or the study that ``--overwrite`` would have replaced).

Only image files inside each generation folder are taken: a manifest path that is absolute, leaves the
folder (``..``, a symlink pointing out) or names something other than a PNG, JPEG or WebP image of at
most ``MAX_PIXELS`` pixels is an error naming the manifest, its row and the path. PNGs are copied without
their text and time chunks (metadata could name the model); JPEG and WebP are converted to PNG.

Organisers may add instructions (a text file, shown above the items; blank lines separate paragraphs) and
gold items: a JSONL file, one ``{"prompt", "better", "worse"[, "questions"]}`` per line, image paths
relative to the file's folder (and inside it, as above). A gold item looks like any other item; every
annotator gets each of them, and the results give each annotator's accuracy on them (``better`` is the
right answer to each of ``questions``, by default all three).
"""

from __future__ import annotations

import io
import json
import random
import secrets
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

from ncppo.errors import OutputDirError, UsageError
from ncppo.evaluation.image_sets import MANIFEST, ImageRecord, pair_image_sets
from ncppo.io import atomic_directory, atomic_write_text, guard_output_dir, mark_output_dir, output_owner
from ncppo.study.store import FORMAT, QUESTIONS, IncompleteStudyError, StudyStore

DB = "study.sqlite"
COMMAND = "study create"
MAX_PIXELS = 4096 * 4096
MAX_BYTES = 64 * 1024 * 1024
FORMATS = ("PNG", "JPEG", "WEBP")
# the PNG chunks that draw the image; text (tEXt, zTXt, iTXt), time, EXIF, ICC names and unknown chunks are dropped
PNG_CHUNKS = {b"IHDR", b"PLTE", b"IDAT", b"IEND", b"tRNS", b"cHRM", b"gAMA", b"sRGB", b"sBIT", b"pHYs"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _source(folder: Path, record: ImageRecord, where: str) -> Path:
    """The record's image file, resolved; an error unless it is a regular file inside ``folder`` (resolved)."""
    if not isinstance(record.path, str) or not record.path or "\x00" in record.path:
        raise UsageError(f"{where}: the path must be a non-empty string relative to the generation folder")
    if Path(record.path).is_absolute():
        raise UsageError(f"{where} is an absolute path; manifest paths must be relative to the generation folder {folder}")
    try:
        path = (folder / record.path).resolve(strict=True)
    except FileNotFoundError:
        raise UsageError(f"{where} does not exist") from None
    except (OSError, RuntimeError) as err:  # a symlink loop, a name too long
        raise UsageError(f"{where} cannot be resolved ({err})") from None
    if not path.is_relative_to(folder):
        raise UsageError(f"{where} leads to {path}, outside the generation folder {folder}; "
                         "only images inside it are copied into a study")
    if not path.is_file():
        raise UsageError(f"{where} is not a regular file")
    if path.stat().st_size > MAX_BYTES:
        raise UsageError(f"{where} is larger than {MAX_BYTES // 2**20} MiB")
    return path


def _strip_png(data: bytes, where: str) -> bytes:
    """The PNG without its metadata chunks (only the chunks in ``PNG_CHUNKS``, which draw the image)."""
    out, pos = [PNG_SIGNATURE], len(PNG_SIGNATURE)
    while pos < len(data):
        if pos + 12 > len(data):
            raise UsageError(f"{where} is a truncated PNG")
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        end = pos + 12 + length
        if end > len(data):
            raise UsageError(f"{where} is a truncated PNG")
        if kind in PNG_CHUNKS:
            out.append(data[pos:end])
        pos = end
        if kind == b"IEND":
            break
    return b"".join(out)


def blind_image(path: Path, where: str) -> bytes:
    """The image at ``path`` as PNG bytes without metadata; an error unless Pillow reads it as an image."""
    from PIL import Image

    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as image:
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise UsageError(f"{where} is {width} x {height} pixels, more than the limit of {MAX_PIXELS}")
            if image.format == "PNG":
                image.verify()  # every chunk's checksum
                return _strip_png(data, where)
            image.load()
            buffer = io.BytesIO()
            image.convert("RGBA" if "A" in image.getbands() else "RGB").save(buffer, format="PNG")
            return buffer.getvalue()
    except UsageError:
        raise
    except (OSError, SyntaxError, ValueError, zlib.error, struct.error, Image.DecompressionBombError) as err:
        raise UsageError(f"{where} is not a PNG, JPEG or WebP image Pillow can read ({err})") from None


def read_gold(path: str | Path) -> list[dict]:
    """Gold items from a JSONL file (see the module docstring); errors name the file, line and field."""
    path = Path(path)
    folder = path.resolve().parent
    gold = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            row = json.loads(line)
        except ValueError as err:
            raise UsageError(f"{where}: not valid JSON ({err})") from None
        if not isinstance(row, dict):
            raise UsageError(f"{where}: a JSON object {{\"prompt\", \"better\", \"worse\"}} expected")
        for key in ("prompt", "better", "worse"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise UsageError(f"{where}: field {key!r} must be a non-empty string")
        questions = row.get("questions", list(QUESTIONS))
        if not isinstance(questions, list) or not questions or any(q not in QUESTIONS for q in questions):
            raise UsageError(f"{where}: field 'questions' must be a list of {', '.join(QUESTIONS)}")
        sources = [_source(folder, SimpleNamespace(path=row[k]), f"{where}: field {k!r} ({row[k]!r})")
                   for k in ("better", "worse")]
        gold.append({"prompt": row["prompt"], "better": sources[0], "worse": sources[1], "questions": questions,
                     "where": where})
    return gold


def _models(pairs, folders: dict[str, Path]) -> dict:
    """What A and B are, for the results: the folder's name, the model and the LoRA of their images."""
    first = pairs[0] if pairs else (None, None)
    return {side.upper(): {"name": folders[side].name, "folder": str(folders[side]),
                           "model": getattr(record, "model", ""), "lora": getattr(record, "lora", "")}
            for side, record in zip("ab", first)}


def create_study(a_dir: str | Path, b_dir: str | Path, out: str | Path, votes_per_item: int = 3,
                 sample: int | None = None, seed: int = 0, timeout_s: float = 600.0, overwrite: bool = False,
                 allow_mismatch: bool = False, instructions: str | Path | None = None,
                 gold: str | Path | None = None) -> StudyStore:
    """A study of ``a_dir`` against ``b_dir``, paired by :func:`ncppo.evaluation.image_sets.pair_image_sets` (refused
    when their generation settings differ in more than the model and LoRA, unless ``allow_mismatch``).
    ``instructions``: a text file for the annotators; ``gold``: a JSONL of gold items (module docstring)."""
    if votes_per_item < 1:
        raise UsageError(f"votes per item must be >= 1, got {votes_per_item}")
    text = Path(instructions).read_text(encoding="utf-8").strip() if instructions else ""
    gold_rows = read_gold(gold) if gold else []
    target = guard_output_dir(out, COMMAND, inputs=[a_dir, b_dir], overwrite=overwrite)
    if (target / DB).exists() and not overwrite:
        raise OutputDirError(f"{out} already holds a study (with its votes); choose another --out, "
                             "or pass --overwrite to replace it")
    folders = {side: Path(folder).resolve() for side, folder in (("a", a_dir), ("b", b_dir))}
    pairing = pair_image_sets(folders["a"], folders["b"], allow_mismatch=allow_mismatch)
    records = {"a": pairing.a_records, "b": pairing.b_records}
    rows = {id(r): n for side in records for n, r in enumerate(records[side], start=1)}  # manifest line numbers
    pairs = pairing.pairs
    if sample is not None and sample < len(pairs):
        pairs = sorted(random.Random(seed).sample(pairs, sample), key=lambda p: (p[0].prompt_index, p[0].image_index))
    with atomic_directory(target) as scratch:
        (scratch / "images").mkdir()
        names = set()

        def copy(path: Path, where: str) -> str:
            data = blind_image(path, where)
            while (name := f"{secrets.token_urlsafe(16)}.png") in names:  # random: no model, side or order in it
                pass
            names.add(name)
            (scratch / "images" / name).write_bytes(data)
            return name

        items = []
        for ra, rb in pairs:
            item_names = []
            for side, record in (("a", ra), ("b", rb)):
                where = f"{folders[side] / MANIFEST}, row {rows[id(record)]}: image {record.path!r}"
                item_names.append(copy(_source(folders[side], record, where), where))
            items.append({"prompt": ra.prompt, "seed": ra.seed, "image_a": item_names[0], "image_b": item_names[1],
                          "metadata": {**(ra.metadata or {}), "a_id": ra.id, "b_id": rb.id}})
        gold_items = [{"prompt": g["prompt"], "seed": 0, "image_a": copy(g["better"], g["where"]),
                       "image_b": copy(g["worse"], g["where"]), "questions": g["questions"],
                       "metadata": {"gold": g["where"]}} for g in gold_rows]
        atomic_write_text(scratch / "study.json", json.dumps(
            {"a": str(a_dir), "b": str(b_dir), "models": _models(pairs, folders), "items": len(items),
             "gold_items": len(gold_items), "unpaired": len(records["a"]) + len(records["b"]) - 2 * len(pairs),
             "votes_per_item": votes_per_item, "seed": seed}, indent=2))
        StudyStore.create(scratch / DB, items, votes_per_item=votes_per_item, timeout_s=timeout_s,
                          study_seed=seed, gold=gold_items, instructions=text).close()
        mark_output_dir(scratch, COMMAND)  # last: a folder with the marker is a finished study
    return StudyStore(target / DB)


def open_study(folder: str | Path, check_images: bool = False) -> StudyStore:
    """The study in ``folder``; a clear error for anything but a complete study (an interrupted create).

    ``check_images``: also require every item's two images (what the server checks before it starts).
    """
    folder = Path(folder)
    redo = "delete it and run `ncppo study create` again"
    if folder.name.startswith((".tmp-", ".old-")):
        raise IncompleteStudyError(f"{folder} is the scratch folder of an interrupted `ncppo study create`, "
                                   f"not a study; {redo}")
    path = folder / DB
    if not path.is_file():
        if (folder / "images").is_dir():
            raise IncompleteStudyError(f"{folder} is a half-made study (images but no {DB}); {redo}")
        raise FileNotFoundError(f"{folder} is not a study (no {DB}); create one with `ncppo study create`")
    if output_owner(folder) != COMMAND:
        raise IncompleteStudyError(f"{folder} is not a complete study: it lacks the marker that `ncppo study create` "
                                   f"writes last (an interrupted create, or one made by an older ncppo); {redo}")
    store = StudyStore(path)
    found = store.meta("format")
    if found != FORMAT:
        store.close()
        raise IncompleteStudyError(f"{folder} is a study of format {found!r}, this ncppo reads {FORMAT!r}; {redo}")
    if check_images:
        images = folder / "images"
        missing = [name for item in store.items() for name in (item["image_a"], item["image_b"])
                   if not (images / name).is_file()]
        if missing:
            store.close()
            raise IncompleteStudyError(f"{folder} is a damaged study: {len(missing)} image(s) of its items are "
                                       f"missing from {images} (e.g. {missing[0]}); {redo}")
    return store
