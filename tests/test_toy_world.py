import numpy as np
import pytest

from ncppo.toy.world import COLOURS, SHAPES, Scene, all_scenes, render, sample_scenes, shape_mask


def test_captions_round_trip_and_errors():
    scene = Scene("orange", "triangle", "blue")
    assert scene.caption == "an orange triangle on a blue background"
    assert Scene.parse(scene.caption) == scene
    assert Scene.parse("A Red circle on a white background ") == Scene("red", "circle", "white")
    for bad in ("a teal circle on a blue background", "a red hexagon on a blue background", "red circle"):
        with pytest.raises(ValueError, match="not a toy-world caption"):
            Scene.parse(bad)


def test_the_world_has_every_combination_once():
    scenes = all_scenes()
    assert len(scenes) == len(COLOURS) * (len(COLOURS) - 1) * len(SHAPES) == 168
    assert len({s.caption for s in scenes}) == 168 and all(s.object_colour != s.background for s in scenes)
    drawn = sample_scenes(50, np.random.default_rng(0))
    assert len(drawn) == 50 and all(s in scenes for s in drawn)


def test_render_paints_the_caption():
    scene = Scene("red", "square", "blue")
    img = render(scene, size=32, rng=np.random.default_rng(3))
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert tuple(img[0, 0]) == COLOURS["blue"]
    red = (img == np.array(COLOURS["red"], dtype=np.uint8)).all(axis=2)
    assert 0.1 < red.mean() < 0.5  # an object of a sensible size
    noisy = render(scene, size=32, rng=np.random.default_rng(3), noise=0.1)
    assert np.abs(noisy.astype(int) - img.astype(int)).mean() > 5


def test_shapes_have_their_expected_areas():
    areas = {s: shape_mask(s, 64, (32, 32), 12).mean() for s in SHAPES}
    assert areas["circle"] == pytest.approx(np.pi * 144 / 4096, rel=0.05)
    assert areas["square"] == pytest.approx(areas["circle"], rel=0.1)  # equal areas: only shape differs
    with pytest.raises(ValueError, match="unknown shape"):
        shape_mask("star", 8, (4, 4), 2)
