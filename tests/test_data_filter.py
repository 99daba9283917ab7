import numpy as np
import pytest

from ncppo.data.filter import build_graph, dataset_stats, select_pairs
from ncppo.data.pairs import PreferencePairs

from .data_helpers import write_dataset


def _pairs(tmp_path, spec, name="d"):
    return PreferencePairs(write_dataset(tmp_path / name, spec), tie_policy="keep")


def _kept(pairs, selection):
    m = pairs.meta
    return sorted((m.caption[i].as_py(), m.uid_w[i].as_py(), m.uid_l[i].as_py()) for i in selection.rows)


def test_chain_cycle_tie_and_win_counts(tmp_path):
    spec = [
        # chain a > b > c: a has 1 win, b wins and loses
        ("chain", "a", "b", 1), ("chain", "b", "c", 1),
        # cycle x > y > z > x: nobody is unbeaten
        ("cycle", "x", "y", 1), ("cycle", "y", "z", 1), ("cycle", "z", "x", 1),
        # two wins but one draw: not absolute
        ("drawn", "p", "q", 1), ("drawn", "p", "r", 1), ("drawn", "p", "s", 0.5),
        # two wins, no loss, no draw: the absolute winner (second row has image 1 winning)
        ("double", "w", "v1", 1, 10), ("double", "v2", "w", 0, 20),
    ]
    pairs = _pairs(tmp_path, spec)
    assert _kept(pairs, select_pairs(pairs.meta, min_wins=2)) == [("double", "w", "v2")]
    assert _kept(pairs, select_pairs(pairs.meta, min_wins=1)) == [("chain", "a", "b"), ("double", "w", "v2")]
    graph = build_graph(pairs.meta)
    assert graph.num_prompts == 4 and graph.num_nodes == 13


def test_pair_choice_latest_first_all_and_several_users(tmp_path):
    spec = [
        ("p", "w", "l1", 1, 30, 1), ("p", "w", "l2", 1, 10, 2), ("p", "l3", "w", 0, 20, 3),
        ("p", "l1", "l2", 1, 5, 1),  # other users compare the losers
    ]
    pairs = _pairs(tmp_path, spec)
    assert _kept(pairs, select_pairs(pairs.meta, pairs="latest")) == [("p", "w", "l1")]
    assert _kept(pairs, select_pairs(pairs.meta, pairs="first")) == [("p", "w", "l2")]
    assert _kept(pairs, select_pairs(pairs.meta, pairs="all")) == [("p", "w", "l1"), ("p", "w", "l2"), ("p", "w", "l3")]


def test_same_uid_under_two_captions_is_two_images(tmp_path):
    spec = [("one", "u", "a", 1), ("one", "u", "b", 1), ("two", "c", "u", 1), ("two", "d", "u", 1)]
    pairs = _pairs(tmp_path, spec)
    assert _kept(pairs, select_pairs(pairs.meta)) == [("one", "u", "b")]


def test_table2_variants(tmp_path):
    spec = [
        # x beats y (latest) and q; y beats z (latest) and r; no row compares x with z
        ("p", "x", "q", 1, 1), ("p", "x", "y", 1, 5), ("p", "y", "r", 1, 2), ("p", "y", "z", 1, 6),
        # here x2 beat z2 directly, so x>z is a real row
        ("p2", "x2", "y2", 1, 1), ("p2", "x2", "z2", 1, 0), ("p2", "y2", "z2", 1, 3), ("p2", "x2", "k", 1, -1),
        # an absolute winner whose loser never won: no z
        ("p3", "m", "n", 1, 1), ("p3", "m", "o", 1, 2),
    ]
    pairs = _pairs(tmp_path, spec)
    assert _kept(pairs, select_pairs(pairs.meta, variant="x>y")) == [("p", "x", "y"), ("p2", "x2", "y2"),
                                                                      ("p3", "m", "o")]
    assert _kept(pairs, select_pairs(pairs.meta, variant="x>y,y>z")) == [
        ("p", "x", "y"), ("p", "y", "z"), ("p2", "x2", "y2"), ("p2", "y2", "z2"), ("p3", "m", "o")]
    sel = select_pairs(pairs.meta, variant="x>y,x>z")
    assert _kept(pairs, sel) == [("p", "x", "y"), ("p2", "x2", "y2"), ("p2", "x2", "z2"), ("p3", "m", "o")]
    assert sel.details["xz_synthesised"] == 1 and sel.details["xz_from_existing_rows"] == 1
    assert sel.details["winners_without_z"] == 1
    (w_row, l_row), = sel.synthetic.tolist()
    m = pairs.meta
    assert m.uid_w[w_row].as_py() == "x" and m.uid_l[l_row].as_py() == "z"


def test_stats_hand_computed(tmp_path):
    spec = [("a", "1", "2", 1), ("a", "1", "3", 1), ("a", "2", "3", 0.5), ("b", "4", "5", 0), ("b", "5", "6", 1)]
    pairs = _pairs(tmp_path, spec)
    stats = dataset_stats(pairs.meta, min_wins=2)
    assert stats == {"rows": 5, "valid_rows": 5, "pairs": 4, "ties": 1, "prompts": 2, "prompts_with_pairs": 2,
                     "unique_images": 6, "images_both_winner_and_loser": 0, "absolute_winners": 2, "min_wins": 2}


def test_filter_reads_no_image_bytes(tmp_path, monkeypatch):
    pairs = _pairs(tmp_path, [("a", "1", "2", 1), ("a", "1", "3", 1)])

    def forbidden(*args, **kwargs):
        raise AssertionError("image rows were read")

    monkeypatch.setattr(type(pairs.source), "rows", forbidden)
    fresh = PreferencePairs(pairs.source, tie_policy="keep")  # metadata only
    assert len(select_pairs(fresh.meta).rows) == 1


def test_bad_filter_options(tmp_path):
    pairs = _pairs(tmp_path, [("a", "1", "2", 1)])
    with pytest.raises(ValueError, match="unknown pair choice"):
        select_pairs(pairs.meta, pairs="best")
    with pytest.raises(ValueError, match="unknown variant"):
        select_pairs(pairs.meta, variant="x>z")
    with pytest.raises(ValueError, match="min_wins must be >= 1"):
        select_pairs(pairs.meta, min_wins=0)
    with pytest.raises(ValueError, match="pairs='latest'"):
        select_pairs(pairs.meta, pairs="all", variant="x>y")
    assert isinstance(select_pairs(pairs.meta, min_wins=1).rows, np.ndarray)
