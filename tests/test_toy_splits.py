"""The toy world's held-out split: disjoint, complete, balanced and the same on every machine."""

import hashlib

import pytest

from ncppo.toy.splits import SPLITS, split_captions, split_of
from ncppo.toy.world import COLOURS, SHAPES, Scene, all_scenes


def test_the_splits_are_disjoint_and_cover_every_caption():
    parts = {s: split_captions(s) for s in SPLITS}
    assert all(len(p) == 56 for p in parts.values())
    assert sorted(c for p in parts.values() for c in p) == sorted(s.caption for s in all_scenes())


def test_every_split_holds_every_colour_pairing_once_and_every_shape():
    for split in SPLITS:
        scenes = [Scene.parse(c) for c in split_captions(split)]
        pairs = [(s.object_colour, s.background) for s in scenes]
        assert len(set(pairs)) == len(pairs) == len(COLOURS) * (len(COLOURS) - 1)
        assert {s.shape for s in scenes} == set(SHAPES)
        assert min(sum(s.shape == shape for s in scenes) for shape in SHAPES) >= 18


def test_a_held_out_caption_is_a_composition_the_training_split_never_shows():
    train = {Scene.parse(c) for c in split_captions("train")}
    for caption in split_captions("test") + split_captions("validation"):
        scene = Scene.parse(caption)
        assert scene not in train
        assert any((t.object_colour, t.background) == (scene.object_colour, scene.background) for t in train)


def test_the_split_is_stable():
    # a change here changes which captions every committed result was measured on
    digest = hashlib.sha256("\n".join(split_captions("test")).encode()).hexdigest()[:12]
    assert digest == "4f4d185861c5"
    assert split_captions("test")[:2] == ["a red triangle on a green background", "a red square on a blue background"]
    assert split_of(Scene.parse("a red circle on a green background")) == "train"
    with pytest.raises(ValueError, match="unknown toy-world split 'dev'"):
        split_captions("dev")
