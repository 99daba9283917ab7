import numpy as np

from ncppo.toy.annotators import build_pools
from ncppo.toy.oracle import OracleReward, score_components
from ncppo.toy.rival import RivalConfig, rival_image, rival_images
from ncppo.toy.splits import split_captions
from ncppo.toy.world import Scene


def test_rival_images_are_seeded_per_caption_and_draw():
    captions = split_captions("train")[:6]
    cfg = RivalConfig(images_per_prompt=1)
    whole = rival_images(captions, 7, 32, cfg)
    assert whole.shape == (6, 32, 32, 3) and whole.dtype == np.uint8
    assert np.array_equal(rival_images(captions, 7, 32, cfg), whole)  # the same draw again
    assert np.array_equal(rival_images(captions[2:4], 7, 32, cfg), whole[2:4])  # whatever the other captions
    assert not np.array_equal(rival_images(captions, 8, 32, cfg), whole)  # another draw


def test_the_rivals_flaws_follow_its_config():
    scene = Scene.parse("a red square on a blue background")
    rng = np.random.default_rng(0)
    perfect = RivalConfig(wrong_shape_rate=0.0, colour_jitter=0.0, max_noise=0.0)
    clean = [score_components(rival_image(scene, 32, perfect, rng), scene.caption) for _ in range(40)]
    assert min(c["object_colour"] for c in clean) > 0.99 and min(c["quality"] for c in clean) > 0.99
    wrong = RivalConfig(wrong_shape_rate=1.0, colour_jitter=0.0, max_noise=0.0)
    shapes = [score_components(rival_image(scene, 32, wrong, rng), scene.caption)["shape"] for _ in range(40)]
    assert np.mean(shapes) < np.mean([c["shape"] for c in clean]) - 0.3  # never the caption's square
    noisy = RivalConfig(wrong_shape_rate=0.0, colour_jitter=20.0, max_noise=0.15)
    flawed = [score_components(rival_image(scene, 32, noisy, rng), scene.caption) for _ in range(40)]
    assert np.mean([c["quality"] for c in flawed]) < 0.8 and np.mean([c["object_colour"] for c in flawed]) < 0.9


def test_pools_mix_the_base_model_with_the_rival():
    captions = split_captions("train")[:3]

    def generate(captions, seed, guidance):
        return np.full((len(captions), 32, 32, 3), 128, np.uint8)

    pools, images = build_pools(captions, generate, OracleReward(), images_per_prompt=2,
                                rival=RivalConfig(images_per_prompt=3))
    for pool in pools.values():
        assert [p.generator for p in pool] == ["base-cfg3", "base-cfg1.5", "rival", "rival", "rival"]
        assert max(p.reward for p in pool if p.generator == "rival") > max(p.reward for p in pool[:2])
    assert len(images) == 15
    pools, _ = build_pools(captions, generate, OracleReward(), images_per_prompt=2, rival=RivalConfig())
    assert all(len(pool) == 2 for pool in pools.values())  # images_per_prompt 0: no rival
