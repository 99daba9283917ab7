"""The study from the command line: create, invite, simulate with the oracle, results."""

import json
import re

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from ncppo.cli import main
from ncppo.study.create import open_study
from ncppo.toy.oracle import OracleReward
from ncppo.toy.world import Scene, render
from tests.study_helpers import fake_generation


def test_create_invite_simulate_results(tmp_path, capsys):
    scenes = [Scene("red", "circle", "blue"), Scene("green", "square", "white"), Scene("yellow", "circle", "black"),
              Scene("white", "square", "purple")]
    prompts = [s.caption for s in scenes]
    a = fake_generation(tmp_path / "a", prompts, (128, 128, 128))  # grey squares: poor on every caption
    b = fake_generation(tmp_path / "b", prompts, (0, 0, 0))
    rng = np.random.default_rng(0)
    for i, scene in enumerate(scenes):  # B draws what the caption asks for
        Image.fromarray(render(scene, 32, rng)).save(b / "images" / f"p{i:05d}-i00.png")
    assert main(["study", "create", "--a", str(a), "--b", str(b), "--out", str(tmp_path / "s"), "--votes", "3"]) == 0
    assert "admin token" in capsys.readouterr().out
    assert main(["study", "invite", str(tmp_path / "s"), "--n", "2"]) == 0
    links = capsys.readouterr().out.split()
    assert len(links) == 2 and all(link.startswith("http://127.0.0.1:8000/?token=") for link in links)
    assert main(["study", "simulate", str(tmp_path / "s"), "--reward", "oracle"]) == 0
    assert json.loads(capsys.readouterr().out) == {"annotators": 3, "votes": 12}
    assert main(["study", "results", str(tmp_path / "s")]) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "s" / "results" / "results.json").read_text())
    oracle = OracleReward()
    b_better = [oracle([np.asarray(Image.open(b / "images" / f"p{i:05d}-i00.png"))], [p])[0] >
                oracle([np.full((32, 32, 3), 128, np.uint8)], [p])[0] for i, p in enumerate(prompts)]
    assert all(b_better) and result["items_complete"] == 4
    assert result["questions"]["q1"]["win"] == 1.0  # 3 simulated annotators with a sharp Bradley-Terry choice
    assert printed.startswith("A = a, B = b: 4 of 4 items complete")  # the models by their folders' names
    assert "Q1 Which image do you prefer given the prompt?: B (b) wins 100.0%" in printed
    assert result["models"]["A"]["folder"] == str(a.resolve()) and result["models"]["B"]["name"] == "b"
    assert "Q1 position: left chosen in" in printed and "(sides are random: 50% expected)" in printed
    for k in (3, 4, 5):  # (after annotator-1 and -2) every simulated annotator agrees with the (unanimous) majority
        assert f"simulated-{k}: 4 votes; agrees with the majority in 100%" in printed
    votes = pq.read_table(tmp_path / "s" / "results" / "votes.parquet")
    assert votes.num_rows == 12 and (tmp_path / "s" / "results" / "results.png").stat().st_size > 1000
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", votes.column("created_at")[0].as_py())
    assert len(open_study(tmp_path / "s").votes()) == 12
    assert main(["study", "create", "--a", str(a), "--b", str(b), "--out", str(tmp_path / "s")]) == 2
    assert "already holds a study" in capsys.readouterr().err


def test_create_with_instructions_and_gold_then_results_per_annotator(tmp_path, capsys):
    from tests.study_helpers import fake_gold

    a = fake_generation(tmp_path / "a", ["p0", "p1"], (200, 0, 0))
    b = fake_generation(tmp_path / "b", ["p0", "p1"], (0, 0, 200))
    (tmp_path / "howto.txt").write_text("Pick the sharper one.\n")
    assert main(["study", "create", "--a", str(a), "--b", str(b), "--out", str(tmp_path / "s"), "--votes", "1",
                 "--instructions", str(tmp_path / "howto.txt"), "--gold", str(fake_gold(tmp_path / "g", 1))]) == 0
    assert "study " in (out := capsys.readouterr().out) and "2 items x 1 votes, 1 gold items for every annotator" in out
    store = open_study(tmp_path / "s")
    assert store.instructions == "Pick the sharper one." and len(store.gold()) == 1
    token = store.invite(1)[0]
    while (item := store.next_assignment(token)) is not None:
        better = "left" if item.left_is_a else "right"  # for the gold item, A is the better image
        store.submit(token, item.id, f"c{item.id}", {"q1": better, "q2": better, "q3": better})
    assert main(["study", "results", str(tmp_path / "s")]) == 0
    printed = capsys.readouterr().out
    assert "annotator-1: 3 votes; agrees with the majority in 100%; gold accuracy 100% (3/3)" in printed
    result = json.loads((tmp_path / "s" / "results" / "results.json").read_text())
    assert result["items"] == 2 and result["gold_items"] == 1 and result["votes"] == 2
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", result["generated_at"])
