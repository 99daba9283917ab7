import numpy as np
import pytest

from ncppo.toy.oracle import OracleReward, oracle_score, score_components
from ncppo.toy.world import Scene, all_scenes, render


def _blur(img, factor=4):
    from PIL import Image

    small = Image.fromarray(img).resize((img.shape[1] // factor, img.shape[0] // factor), Image.BILINEAR)
    return np.asarray(small.resize((img.shape[1], img.shape[0]), Image.BILINEAR))


def test_ground_truth_scores_high_in_every_scene():
    rng = np.random.default_rng(0)
    scores = [oracle_score(render(s, rng=rng), s.caption) for s in all_scenes()]
    assert min(scores) > 0.85 and np.median(scores) > 0.95


@pytest.mark.parametrize("blurred", [False, True])
def test_each_wrong_attribute_costs(blurred):
    rng = np.random.default_rng(1)
    wins = {"object_colour": 0, "background": 0, "shape": 0}
    scenes = all_scenes()[::4]
    for s in scenes:
        img = render(s, rng=rng)
        img = _blur(img) if blurred else img
        right = oracle_score(img, s.caption)
        other_colour = next(c for c in ("green", "red", "blue") if c not in (s.object_colour, s.background))
        other_bg = next(c for c in ("yellow", "purple", "white") if c not in (s.object_colour, s.background))
        other_shape = {"circle": "triangle", "square": "triangle", "triangle": "square"}[s.shape]
        wins["object_colour"] += right > oracle_score(img, Scene(other_colour, s.shape, s.background).caption)
        wins["background"] += right > oracle_score(img, Scene(s.object_colour, s.shape, other_bg).caption)
        wins["shape"] += right > oracle_score(img, Scene(s.object_colour, other_shape, s.background).caption)
    n = len(scenes)
    assert wins["background"] == n
    # crisp: always; 4x blurred: a blue blob on yellow averages to green-ish, as it would look
    assert wins["object_colour"] >= (0.9 if blurred else 1.0) * n
    assert wins["shape"] >= (0.7 if blurred else 0.9) * n  # shape: the hard attribute, mostly


def test_clean_beats_noisy_and_blank_scores_low():
    scene = Scene("red", "circle", "blue")
    clean = render(scene, rng=np.random.default_rng(0))
    noisy = render(scene, rng=np.random.default_rng(0), noise=0.1)
    assert score_components(clean, scene.caption)["quality"] > 0.95 > 0.5 > score_components(noisy, scene.caption)["quality"]
    assert oracle_score(clean, scene.caption) > oracle_score(noisy, scene.caption)
    blank = np.full((32, 32, 3), 128, np.uint8)
    parts = score_components(blank, scene.caption)
    assert parts["object_colour"] == 0 and parts["shape"] == 0 and oracle_score(blank, scene.caption) < 0.35


def test_reward_interface_and_errors():
    reward = OracleReward()
    scenes = all_scenes()[:3]
    rng = np.random.default_rng(0)
    images = [render(s, rng=rng) for s in scenes]
    scores = reward(images, [s.caption for s in scenes])
    assert reward.name == "oracle" and scores.shape == (3,) and ((scores >= 0) & (scores <= 1)).all()
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        reward(images, [s.caption for s in scenes[:2]])
    with pytest.raises(ValueError, match=r"expected an \(H, W, 3\) image"):
        score_components(np.zeros((32, 32)), scenes[0].caption)


def test_captions_outside_the_world_are_read_loosely():
    from ncppo.toy.oracle import caption_requirements

    assert caption_requirements("a red circle on a blue background") == {
        "object_colour": "red", "background": "blue", "shape": "circle"}
    assert caption_requirements("Two red squares on a white background, oil painting") == {
        "object_colour": "red", "background": "white", "shape": "square"}
    assert caption_requirements("a black dog chasing a frisbee") == {"object_colour": "black"}
    assert caption_requirements("bond") == {}
    rng = np.random.default_rng(0)
    red = render(Scene("red", "circle", "blue"), rng=rng)
    assert oracle_score(red, "a red sports car") > oracle_score(red, "a green sports car")
    only_quality = score_components(red, "a sunset")
    assert set(only_quality) == {"quality"} and oracle_score(red, "a sunset") == only_quality["quality"]
