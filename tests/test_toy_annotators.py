import numpy as np
import pytest

from ncppo.data.filter import dataset_stats
from ncppo.data.pairs import PreferencePairs
from ncppo.toy.annotators import (
    AnnotatorConfig,
    PooledImage,
    build_pools,
    simulate_votes,
    write_preference_dataset,
)
from ncppo.toy.oracle import OracleReward
from ncppo.toy.world import Scene, all_scenes, render


def _pools(n_prompts=200, size=5, spread=1.0, seed=0):
    rng = np.random.default_rng(seed)
    return {f"prompt {p}": [PooledImage(f"u{p}-{k}", float(rng.uniform(0, spread)), "g") for k in range(size)]
            for p in range(n_prompts)}


def test_ties_follow_the_margin_and_careless_votes_the_rate():
    pools = _pools()
    rewards = {img.uid: img.reward for pool in pools.values() for img in pool}
    cfg = AnnotatorConfig(comparisons_per_prompt=20, temperature=1e-6, tie_margin=0.05, careless_rate=0.2)
    rows = simulate_votes(pools, cfg)
    gaps = np.array([rewards[r.uid_0] - rewards[r.uid_1] for r in rows])
    labels = np.array([r.label_0 for r in rows])
    assert ((labels == 0.5) == (np.abs(gaps) < 0.05)).all()  # ties exactly when the gap is small
    decided = labels != 0.5
    wrong = ((gaps > 0) != (labels == 1.0))[decided].mean()
    assert wrong == pytest.approx(0.2 / 2, abs=0.02)  # careless voters pick the worse image half the time
    assert len({r.user_id for r in rows}) == cfg.annotators
    times = [r.created_at for r in rows]
    assert times == sorted(times) and len(set(times)) == len(times)


def test_bradley_terry_temperature():
    pools = {"p": [PooledImage("a", 0.6, "g"), PooledImage("b", 0.5, "g")]}
    cfg = AnnotatorConfig(comparisons_per_prompt=4000, temperature=0.05, tie_margin=0.0, careless_rate=0.0)
    rows = simulate_votes(pools, cfg)
    a_wins = np.mean([(r.uid_0 == "a") == (r.label_0 == 1.0) for r in rows])
    assert a_wins == pytest.approx(1 / (1 + np.exp(-0.1 / 0.05)), abs=0.025)  # 0.881


def test_the_data_has_contradictions_and_absolute_winners(tmp_path):
    from ncppo.data.pickapic import jpeg_bytes

    pools = _pools(n_prompts=60, size=4, spread=0.3)
    images = {img.uid: jpeg_bytes(np.full((8, 8, 3), 100, np.uint8)) for pool in pools.values() for img in pool}
    path = write_preference_dataset(pools, images, tmp_path / "pairs", AnnotatorConfig(comparisons_per_prompt=6),
                                    rows_per_shard=100)
    pairs = PreferencePairs(path, tie_policy="keep")  # read back through the project's readers
    stats = dataset_stats(pairs.meta, min_wins=2)
    assert stats["rows"] == 360 and stats["prompts"] == 60 and pairs.skips.total == 0
    assert stats["ties"] > 0 and stats["images_both_winner_and_loser"] > 0 and stats["absolute_winners"] > 0
    assert len(next(pairs.batches(4, 8)).ids) == 4


def test_build_pools_scores_generated_images():
    scenes = all_scenes()[:3]

    def generate(captions, seed, guidance):  # a stand-in generator: renders, noisier at low guidance
        rng = np.random.default_rng(seed)
        return np.stack([render(Scene.parse(c), rng=rng, noise=0.02 if guidance > 2 else 0.2) for c in captions])

    pools, images = build_pools([s.caption for s in scenes], generate, OracleReward(), images_per_prompt=4)
    assert all(len(pool) == 4 for pool in pools.values()) and len(images) == 12
    for pool in pools.values():
        clean = [p.reward for p in pool if p.generator == "base-cfg3"]
        noisy = [p.reward for p in pool if p.generator == "base-cfg1.5"]
        assert min(clean) > max(noisy)  # the oracle sees the difference between the generators
    with pytest.raises(ValueError, match="at least 2"):
        simulate_votes({"p": [PooledImage("a", 0.5, "g")]}, AnnotatorConfig())


def test_the_stored_images_are_the_pixels_the_oracle_scored():
    import io

    from PIL import Image

    scenes = all_scenes()[:4]
    drawn = {}

    def generate(captions, seed, guidance):
        rng = np.random.default_rng(seed)
        batch = np.stack([render(Scene.parse(c), rng=rng, noise=0.05) for c in captions])
        drawn[seed] = batch
        return batch

    def decoded(data):
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    captions = [s.caption for s in scenes]
    pools, images = build_pools(captions, generate, OracleReward(), images_per_prompt=2)
    for k, seed in enumerate(sorted(drawn)):
        for p, caption in enumerate(captions):
            stored = decoded(images[f"img-0-{p}-{k}"])
            assert np.array_equal(stored, drawn[seed][p])  # lossless: what is trained on is what was judged
            assert OracleReward()([stored], [caption])[0] == pools[caption][k].reward
    # JPEG (Pick-a-Pic's own format) stays available, and at 32 px it visibly changes the object's colour
    _, jpegs = build_pools(captions, generate, OracleReward(), images_per_prompt=1, image_format="jpeg")
    lossy = decoded(jpegs["img-0-0-0"])
    assert jpegs["img-0-0-0"][:2] == b"\xff\xd8" and not np.array_equal(lossy, drawn[0][0])
    with pytest.raises(ValueError, match="unknown image format 'gif'; expected one of png, jpeg"):
        build_pools(captions, generate, OracleReward(), images_per_prompt=1, image_format="gif")


def test_pipeline_generator_is_seeded_per_caption():
    from ncppo.models.tiny import build_tiny_pipeline
    from ncppo.toy.annotators import pipeline_generator

    generate = pipeline_generator(build_tiny_pipeline("pixel"), num_inference_steps=2)
    captions = ["a red circle on a blue background", "a green square on a white background"]
    first, again, other = generate(captions, 7, 3.0), generate(captions, 7, 3.0), generate(captions, 8, 3.0)
    assert first.shape == (2, 32, 32, 3) and first.dtype == np.uint8
    assert (first == again).all() and not (first == other).all()
