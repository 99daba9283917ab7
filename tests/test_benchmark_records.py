"""``benchmarks/records.py``: a committed record is reused only under the values it was made under; a damaged or
foreign one stops the run naming its file and what differs."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.records import code_version, reuse  # noqa: E402

SETTING = {"budget_dpo_steps": 60, "images_per_prompt": 8, "backbone": "unet"}


def test_a_record_is_reused_under_its_own_values_only(tmp_path):
    path = tmp_path / "seed-0.json"
    path.write_text(json.dumps({"setting": SETTING, "code": "abc"}))
    assert reuse(path, {"setting": SETTING}, "hint")["code"] == "abc"
    with pytest.raises(SystemExit, match=r"seed-0.json: made under other values .*images_per_prompt.*; hint"):
        reuse(path, {"setting": {**SETTING, "images_per_prompt": 4}}, "hint")
    with pytest.raises(SystemExit, match="world_digest"):
        reuse(path, {"world_digest": "f00"}, "hint")
    assert reuse(tmp_path / "missing.json", {"setting": SETTING}, "hint") is None


def test_a_damaged_record_names_its_file(tmp_path):
    path = tmp_path / "seed-1.json"
    path.write_text("{not json")
    with pytest.raises(SystemExit, match="seed-1.json: not a JSON record"):
        reuse(path, {}, "hint")


def test_the_code_version_is_this_checkouts_commit():
    version = code_version()
    assert len(version.split()[0]) >= 7 and all(c in "0123456789abcdef" for c in version.split()[0])
