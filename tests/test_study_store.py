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


# -- issue 18: undo, gold items, "nothing available right now", the annotator checks ------------------------

def test_undo_takes_back_the_last_answer_and_reopens_its_item(study):
    store = open_study(study)
    token, other = store.invite(2)
    first = store.next_assignment(token, rng=random.Random(1))
    assert store.submit(token, first.id, "c1", ANSWER)
    shown = store.next_assignment(token)  # the next item is on screen when the annotator undoes
    again, answers = store.undo(token)
    assert (again.id, again.item_id, again.left_is_a) == (first.id, first.item_id, first.left_is_a)
    assert answers == ANSWER and store.votes() == [] and [u["client_id"] for u in store.undone()] == ["c1"]
    assert store.next_assignment(token).id == first.id  # the undone item comes back first, sides unchanged
    # the item shown meanwhile went back to the pool: another annotator can take its slot
    assert store.conn.execute("SELECT status FROM assignments WHERE id = ?", (shown.id,)).fetchone()[0] == "released"
    with pytest.raises(StudyError, match="answer was undone") as late:  # a late retry of the undone vote
        store.submit(token, first.id, "c1", ANSWER)
    assert late.value.status == 409 and store.votes() == []
    assert store.submit(token, first.id, "c2", {**ANSWER, "q3": "left"})
    assert [(v["client_id"], v["q3"]) for v in store.votes()] == [("c2", "left")]
    with pytest.raises(StudyError, match="no answer of yours to undo") as nothing:
        store.undo(other)
    assert nothing.value.status == 409
    assert study_results(store, n_boot=10)["undone_answers"] == 1


def test_gold_items_go_to_everyone_and_give_each_annotator_an_accuracy(tmp_path):
    from tests.study_helpers import fake_gold

    prompts = [f"prompt {i}" for i in range(6)]
    a = fake_generation(tmp_path / "a", prompts, (200, 0, 0))
    b = fake_generation(tmp_path / "b", prompts, (0, 0, 200))
    store = create_study(a, b, tmp_path / "s", votes_per_item=1, gold=fake_gold(tmp_path / "g", 2))
    gold = store.gold()
    assert len(gold) == 2 and len(store.items()) == 8 and store.progress("")["items"] == 6
    careful, careless = store.invite(2)
    order = {careful: [], careless: []}
    for token in (careful, careless):
        while (a_ := store.next_assignment(token, rng=random.Random(len(order[token])))) is not None:
            order[token].append(a_.item_id in gold)
            better = "left" if a_.left_is_a else "right"  # image A of a gold item is the better one
            pick = better if token == careful else {"left": "right", "right": "left"}[better]
            store.submit(token, a_.id, f"{token}-{a_.id}", {"q1": pick, "q2": pick, "q3": "tie"})
    # every annotator sees both gold items, spread among the regular ones (one after every 2 regular items)
    assert order[careful] == [False, False, True, False, False, True, False, False]
    assert order[careless] == [True, True]  # the regular items had all their votes: only gold was left
    result = study_results(store, n_boot=10)
    assert result["items"] == 6 and result["gold_items"] == 2 and result["votes"] == 6  # gold never counts for A/B
    checks = result["annotators"]
    assert checks["annotator-1"]["gold_accuracy"] == pytest.approx(4 / 6)  # q1 and q2 right, q3 a tie
    assert checks["annotator-2"]["gold_accuracy"] == 0.0 and checks["annotator-2"]["agreement_with_majority"] is None


def test_nothing_available_right_now_when_others_hold_the_last_items(study):
    store = open_study(study)
    first, second, third = store.invite(3)
    held = [store.next_assignment(t) for t in (first, second)]  # both slots of item 1 (3 items x 2 votes)
    assert held[0].item_id == held[1].item_id
    for _ in range(2):  # the third annotator takes items 2 and 3 and answers them
        a_ = store.next_assignment(third)
        store.submit(third, a_.id, f"y-{a_.id}", ANSWER)
    assert store.next_assignment(third) is None and store.waiting(third)  # item 1 is held by the others
    for token, a_ in zip((first, second), held):
        store.submit(token, a_.id, f"x-{token}", ANSWER)
    assert store.next_assignment(third) is None and not store.waiting(third)  # now really done


def test_position_bias_and_agreement_with_the_majority(study):
    store = open_study(study)
    tokens = store.invite(2)
    for token in tokens:  # both always click left, whatever the sides: a pure position bias
        while (a_ := store.next_assignment(token, rng=random.Random(7))) is not None:
            store.submit(token, a_.id, f"{token}-{a_.id}", {"q1": "left", "q2": "left", "q3": "tie"})
    result = study_results(store, n_boot=10)
    bias = result["position_bias"]["q1"]
    assert (bias["left"], bias["right"], bias["tie"]) == (6, 0, 0) and bias["left_share_of_decisive"] == 1.0
    assert bias["p_value"] == pytest.approx(2 / 2**6) and bias["interval"][0] > 0.5
    assert result["position_bias"]["q3"]["p_value"] == 1.0  # ties only: nothing to test
    from ncppo.study.results import binomial_p_value

    assert binomial_p_value(5, 10) == 1.0 and binomial_p_value(0, 10) == pytest.approx(2 / 1024)
    for entry in result["annotators"].values():
        assert entry["votes"] == 3 and entry["compared"] == 9 and 0.0 <= entry["agreement_with_majority"] <= 1.0
        assert entry["gold_accuracy"] is None
