"""Records that let a long benchmark span machines and sessions: each finished unit of work (a seed, a run) is
written as a small committed JSON file, stamped with what it was made under, and reused by a later sitting
instead of being recomputed. Shared by ``toy_reproduction.py`` and ``ncp_ablation.py``."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def code_version() -> str:
    """The checkout's commit, marked when tracked files have uncommitted changes."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return rev + (" (uncommitted changes)" if dirty else "")


def reuse(path: Path, made_under: dict, hint: str) -> dict | None:
    """The record at ``path``, or None when there is none. A record that is not JSON, or was made under other
    values of ``made_under``'s keys (a setting, the data's digest), stops the run naming the file and the keys:
    pooling it would mix experiments. ``hint`` says what to do then."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SystemExit(f"{path}: not a JSON record ({exc}); {hint}") from exc
    differ = {k: {"recorded": record.get(k), "now": v} for k, v in made_under.items() if record.get(k) != v}
    if differ:
        raise SystemExit(f"{path}: made under other values {differ}; {hint}")
    return record
