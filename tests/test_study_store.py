import random

import pytest

from ncppo.study.create import create_study, open_study
from ncppo.study.results import fleiss_kappa, majority, study_results
from ncppo.study.store import StudyError
from tests.study_helpers import fake_generation

ANSWER = {"q1": "left", "q2": "tie", "q3": "right"}


@pytest.fixture
def study(tmp_path):
    prompts = [f"prompt {i}" for i in range(4)]
    a = fake_generation(tmp_path / "a", prompts, (200, 0, 0))
    b = fake_generation(tmp_path / "b", ["only in b"] + prompts[1:], (0, 0, 200))
    create_study(a, b, tmp_path / "study", votes_per_item=2, timeout_s=60)
    return tmp_path / "study"


def test_create_pairs_by_prompt_and_seed_and_copies_images(study, tmp_path):
    store = open_study(study)
    items = store.items()
    assert [i["prompt"] for i in items] == ["prompt 1", "prompt 2", "prompt 3"]  # unpaired images left out
    assert all((study / "images" / i[k]).is_file() for i in items for k in ("image_a", "image_b"))
    with pytest.raises(FileExistsError):
        create_study(tmp_path / "a", tmp_path / "b", study)


def test_each_item_gets_exactly_n_distinct_annotators(study):
    store = open_study(study)
    tokens = store.invite(5)
    seen, per_item = {t: set() for t in tokens}, {}
    for _ in range(3):
        for token in tokens:
            a = store.next_assignment(token)
            if a is None:
                continue
            assert a.item_id not in seen[token]  # nobody gets an item twice
            assert store.next_assignment(token).id == a.id  # an open assignment is handed back, not a new one
            assert store.submit(token, a.id, f"c-{token}-{a.id}", ANSWER)
            seen[token].add(a.item_id)
            per_item[a.item_id] = per_item.get(a.item_id, 0) + 1
    assert per_item == {1: 2, 2: 2, 3: 2}
    assert all(store.next_assignment(t) is None for t in tokens)


def test_sides_are_randomised_and_votes_stored_as_a_b(study):
    store = open_study(study)
    token = store.invite(1)[0]
    a = store.next_assignment(token, rng=random.Random(3))
    store.submit(token, a.id, "x", ANSWER)
    vote = store.votes()[0]
    left = "A" if a.left_is_a else "B"
    assert (vote["q1"], vote["q1_ab"]) == ("left", left) and vote["q2_ab"] == "tie"
    assert vote["q3_ab"] == ("B" if left == "A" else "A") and "annotator" not in vote  # tokens never exported
    sides = {store.next_assignment(t, rng=random.Random(s)).left_is_a for s, t in enumerate(store.invite(4))}
    assert sides == {True, False}


def test_a_retried_submission_is_counted_once(study):
    store = open_study(study)
    token, other = store.invite(2)
    a = store.next_assignment(token)
    assert store.submit(token, a.id, "same-client-id", ANSWER) is True
    assert store.submit(token, a.id, "same-client-id", ANSWER) is False  # the retry
    assert len(store.votes()) == 1
    with pytest.raises(StudyError, match="already answered"):
        store.submit(token, a.id, "another-id", ANSWER)
    b = store.next_assignment(other)
    with pytest.raises(StudyError, match="another vote") as err:
        store.submit(other, b.id, "same-client-id", ANSWER)
    assert err.value.status == 409
    with pytest.raises(StudyError, match="not yours"):
        store.submit(token, b.id, "third", ANSWER)
    with pytest.raises(StudyError, match="q2 must be one of"):
        store.submit(other, b.id, "fourth", {**ANSWER, "q2": "both"})


def test_abandoned_assignments_are_released(study, monkeypatch):
    import ncppo.study.store as store_module

    store = open_study(study)
    slow, fast, before, after = store.invite(4)
    now = [1000.0]
    monkeypatch.setattr(store_module.time, "time", lambda: now[0])
    abandoned = store.next_assignment(slow)
    got = store.next_assignment(fast)
    assert got.item_id == abandoned.item_id  # the item closest to complete is filled first
    store.submit(fast, got.id, "fast-1", ANSWER)
    assert store.next_assignment(before).item_id != abandoned.item_id  # 1 vote + 1 open assignment: full
    now[0] += 61  # past the timeout: the slow annotator's slot is given to someone else
    assert store.next_assignment(after).item_id == abandoned.item_id
    with pytest.raises(StudyError, match="expired"):
        store.submit(slow, abandoned.id, "late", ANSWER)


def test_tokens(study):
    store = open_study(study)
    with pytest.raises(StudyError) as missing:
        store.next_assignment("")
    with pytest.raises(StudyError) as wrong:
        store.next_assignment("nope")
    assert (missing.value.status, wrong.value.status) == (401, 403)


def test_majority_and_agreement():
    assert majority(["A", "A", "B"]) == "A" and majority(["A", "B", "tie"]) == "tie" and majority(["B"]) == "B"
    assert majority(["A", "B"]) == "tie"
    import numpy as np

    assert fleiss_kappa(np.array([[3, 0, 0], [0, 3, 0], [0, 0, 3]])) == pytest.approx(1.0)
    assert fleiss_kappa(np.array([[1, 1, 1]] * 4)) < 0


def test_results_from_known_votes(study):
    store = open_study(study)
    t1, t2 = store.invite(2)
    # both annotators prefer B on q1 for every item; they disagree on q3
    for token, q3_choice in ((t1, "A"), (t2, "B")):
        while (a := store.next_assignment(token)) is not None:
            side = {"A": "left" if a.left_is_a else "right", "B": "right" if a.left_is_a else "left"}
            store.submit(token, a.id, f"{token}-{a.id}", {"q1": side["B"], "q2": "tie", "q3": side[q3_choice]})
    result = study_results(store, n_boot=200)
    q1, q2, q3 = (result["questions"][q] for q in ("q1", "q2", "q3"))
    assert result["items_complete"] == 3 and (q1["win"], q1["loss"]) == (1.0, 0.0) and q1["full_agreement"] == 1.0
    assert q2["tie"] == 1.0 and q3["tie"] == 1.0 and q3["full_agreement"] == 0.0  # 1-1 split: no majority
    assert q1["win_rate_ties_half_interval"] == [1.0, 1.0]
