import json
from pathlib import Path

import pytest

from ncppo.evaluation.prompts import load_prompts

SHARED = Path(__file__).parents[2] / "shared" / "data" / "prompts"


@pytest.mark.skipif(not SHARED.is_dir(), reason="the shared prompt sets are not beside this checkout")
def test_the_standard_prompt_sets():
    parti = load_prompts(SHARED / "PartiPrompts.tsv")
    assert len(parti) == 1632 and parti.categories()[0] == "Abstract" and "Challenge" in parti.metadata[0]
    assert len(load_prompts(SHARED / "pickapic_v2_validation_unique.csv")) == 500
    hpd = load_prompts(SHARED / "hpdv2_benchmark.txt")
    assert len(hpd) == 3200 and hpd.categories() is None


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
