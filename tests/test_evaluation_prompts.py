import json
from pathlib import Path

import pytest

from ncppo.evaluation.prompts import load_prompts

SHARED = Path(__file__).parents[2] / "shared" / "data" / "prompts"
ROOT = Path(__file__).parents[1]


def test_the_standard_prompt_sets_load_by_name():
    parti = load_prompts("partiprompts")
    assert len(parti) == 1632 and parti.categories()[0] == "Abstract" and "Challenge" in parti.metadata[0]
    assert parti.source == "partiprompts" and parti.prompts[0] == "bond"
    pick = load_prompts("pickapic")
    assert len(pick) == 500 and pick.source == "pickapic" and pick.prompts[0].startswith("The joker holding pistols")
    hpd = load_prompts("hpdv2")
    assert len(hpd) == 3200 and hpd.prompts[0] == "Spongebob depicted in the style of Dragon Ball Z."
    styles = hpd.categories()
    assert [styles[i] for i in (0, 799, 800, 1600, 3199)] == ["anime", "anime", "concept-art", "paintings", "photo"]
    assert len(load_prompts("partiprompts", limit=7)) == 7


def test_the_packaged_sets_are_the_published_files_and_ship_with_the_package():
    import fnmatch
    import re

    from ncppo.evaluation.prompts import PROMPT_SETS, prompt_set_path

    folder = ROOT / "ncppo" / "evaluation" / "prompt_sets"
    sources = (folder / "SOURCES.md").read_text()
    for name, file in PROMPT_SETS.items():
        assert prompt_set_path(name) == folder / file and f"`{name}`" in sources and f"`{file}`" in sources
        if (SHARED / file).is_file():  # this workspace's copies: byte for byte the same
            assert (SHARED / file).read_bytes() == (folder / file).read_bytes()
    line = re.search(r'^"ncppo\.evaluation" = \[(.*)\]$', (ROOT / "pyproject.toml").read_text(), re.M)  # package-data
    globs = [g.strip().strip('"') for g in line.group(1).split(",")]
    for path in folder.iterdir():
        assert any(fnmatch.fnmatch(f"prompt_sets/{path.name}", g) for g in globs), f"{path.name} is not package data"
    for licence in ("Apache-2.0", "MIT"):
        assert licence in sources


def test_unknown_names_and_missing_files(tmp_path):
    from ncppo.errors import UsageError
    from ncppo.evaluation.prompts import prompt_set_path

    with pytest.raises(FileNotFoundError, match="'partiprompt' is no packaged prompt set; did you mean 'partiprompts'"):
        load_prompts("partiprompt")
    with pytest.raises(UsageError, match="unknown prompt set 'pickapik'; did you mean 'pickapic'"):
        prompt_set_path("pickapik")
    (tmp_path / "partiprompts").mkdir()  # a path that exists is a path, never a name
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prompts(tmp_path / "partiprompts")


def test_jsonl_prompt_files(tmp_path):
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "a cat", "Category": "Animals"}) + "\n\n"
                                      + json.dumps("a dog") + "\n" + json.dumps({"caption": "a fox"}) + "\n")
    found = load_prompts(tmp_path / "p.jsonl")
    assert found.prompts == ["a cat", "a dog", "a fox"] and found.metadata == [{"Category": "Animals"}, {}, {}]
    (tmp_path / "bad.jsonl").write_text(json.dumps("ok") + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        load_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "nokey.jsonl").write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"x": 1}) + "\n")
    with pytest.raises(ValueError, match=r"nokey.jsonl:2: no prompt key"):
        load_prompts(tmp_path / "nokey.jsonl")


def test_formats_and_errors(tmp_path):
    (tmp_path / "a.txt").write_text("a cat\n\n  a dog  \n")
    assert load_prompts(tmp_path / "a.txt").prompts == ["a cat", "a dog"]
    (tmp_path / "b.csv").write_text("id,Prompt\n1,red\n2,blue\n")
    b = load_prompts(tmp_path / "b.csv", limit=1)
    assert b.prompts == ["red"] and b.metadata == [{"id": "1"}]
    (tmp_path / "c.json").write_text(json.dumps([{"prompt": "x", "style": "photo"}, "y"]))
    assert load_prompts(tmp_path / "c.json").metadata == [{"style": "photo"}, {}]
    (tmp_path / "d.json").write_text(json.dumps({"prompts": ["z"]}))
    assert load_prompts(tmp_path / "d.json").prompts == ["z"]
    (tmp_path / "e.csv").write_text("id,text2\n1,red\n")
    with pytest.raises(ValueError, match=r"e.csv: no prompt column"):
        load_prompts(tmp_path / "e.csv")
    (tmp_path / "g.csv").write_text("prompt,k\nok,1\n,2\n")
    with pytest.raises(ValueError, match=r"g.csv: row 3, column 'prompt'"):
        load_prompts(tmp_path / "g.csv")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_prompts(tmp_path / "missing.txt")
    (tmp_path / "h.yaml").write_text("- a")
    with pytest.raises(ValueError, match="unknown prompt file type"):
        load_prompts(tmp_path / "h.yaml")


def test_a_file_that_is_not_text_is_a_usage_error(tmp_path):
    from ncppo.errors import UsageError

    (tmp_path / "p.txt").write_bytes(b"\xff\xfe\x00 not text")
    with pytest.raises(UsageError, match="p.txt: not UTF-8 text"):
        load_prompts(tmp_path / "p.txt")


def test_a_damaged_scores_file_is_named(tmp_path):
    from ncppo.errors import StateError
    from ncppo.evaluation.scoring import read_scores

    (tmp_path / "scores").mkdir()
    (tmp_path / "scores" / "oracle.json").write_text("{")
    with pytest.raises(StateError, match="oracle.json is not a scores file"):
        read_scores(tmp_path)
