import json
import os

import pytest
import torch

from ncppo.batch import PreferenceBatch
from ncppo.data import cache as cache_module
from ncppo.data.cache import LatentCache, build_cache
from ncppo.data.pairs import PreferencePairs
from ncppo.data.schema import DataError
from ncppo.models.preference_model import LoraSettings, PreferenceModel
from ncppo.objectives import make_objective
from ncppo.step import training_step

from .data_helpers import write_dataset

SPEC = [(f"a red circle {k % 3}", f"u{k}", f"v{k}", k % 2) for k in range(7)]


@pytest.fixture
def frozen_model(pipeline):
    return PreferenceModel(pipeline, finetune="none")


def test_cache_round_trip_matches_fresh_encoding(tmp_path, frozen_model, kind):
    pairs = PreferencePairs(write_dataset(tmp_path / "src", SPEC))
    index = build_cache(frozen_model, pairs, tmp_path / "c", resolution=32, batch_size=3, pairs_per_shard=3,
                        progress=False)
    assert index["cached_pairs"] == 7 and index["num_shards"] == 3 and index["skipped_pairs"] == 0
    cache = LatentCache(tmp_path / "c")
    batches = list(cache.batches(4, shuffle=False))
    ids = [i for b in batches for i in b.ids]
    assert ids == list(range(7))
    fresh = pairs.collate(list(range(7)), 32)
    expected = frozen_model.encode_images(fresh.pixel_values_w, sample=False)
    got = torch.cat([b.latents_w for b in batches])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    vae = frozen_model.pipeline.vae
    with torch.no_grad():  # decoding the cached latents gives what decoding fresh latents gives
        decode = lambda z: vae.decode(z / vae.config.scaling_factor).sample  # noqa: E731
        torch.testing.assert_close(decode(got), decode(expected), rtol=0, atol=1e-5)
    embeds, pooled = frozen_model.encode_prompts(fresh.prompts)
    torch.testing.assert_close(torch.cat([b.prompt_embeds for b in batches]), embeds)
    assert torch.equal(torch.cat([b.time_ids_l for b in batches]), fresh.time_ids_l)
    if kind == "sdxl":
        torch.testing.assert_close(torch.cat([b.pooled_prompt_embeds for b in batches]), pooled)


def test_fp16_cache_is_close(tmp_path, frozen_model):
    pairs = PreferencePairs(write_dataset(tmp_path / "src", SPEC))
    build_cache(frozen_model, pairs, tmp_path / "c", resolution=32, dtype="float16", progress=False)
    build_cache(frozen_model, pairs, tmp_path / "c32", resolution=32, progress=False)
    half = next(LatentCache(tmp_path / "c").batches(7, shuffle=False))
    full = next(LatentCache(tmp_path / "c32").batches(7, shuffle=False))
    assert half.latents_w.dtype == torch.float32  # stored in fp16, handed out in fp32
    torch.testing.assert_close(half.latents_w, full.latents_w, rtol=2e-3, atol=2e-3)
    assert os.path.getsize(tmp_path / "c" / "shard-00000.safetensors") < os.path.getsize(
        tmp_path / "c32" / "shard-00000.safetensors")


def test_cache_resumes_after_a_kill(tmp_path, frozen_model, monkeypatch):
    pairs = PreferencePairs(write_dataset(tmp_path / "src", SPEC))
    real = cache_module._encode
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # during the second shard
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(cache_module, "_encode", dying)
    with pytest.raises(KeyboardInterrupt):
        build_cache(frozen_model, pairs, tmp_path / "c", resolution=32, batch_size=2, pairs_per_shard=4,
                    progress=False)
    done = sorted(p.name for p in (tmp_path / "c").glob("shard-*.safetensors"))
    assert done == ["shard-00000.safetensors"] and not (tmp_path / "c" / "index.json").exists()
    with pytest.raises(DataError, match="incomplete"):
        LatentCache(tmp_path / "c")
    first_mtime = (tmp_path / "c" / "shard-00000.safetensors").stat().st_mtime_ns
    calls["n"] = -100  # no more kills
    index = build_cache(frozen_model, pairs, tmp_path / "c", resolution=32, batch_size=2, pairs_per_shard=4,
                        progress=False)
    assert calls["n"] == -100 + 2  # only the second shard (3 pairs, 2 batches) was encoded again
    assert (tmp_path / "c" / "shard-00000.safetensors").stat().st_mtime_ns == first_mtime
    assert index["cached_pairs"] == 7 and len(LatentCache(tmp_path / "c")) == 7
    with pytest.raises(DataError, match="other settings"):
        build_cache(frozen_model, pairs, tmp_path / "c", resolution=16, pairs_per_shard=4, progress=False)


def test_bad_images_are_counted_in_the_cache(tmp_path, frozen_model):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = write_dataset(tmp_path / "src", SPEC, rows_per_shard=100)
    table = pq.read_table(src / "train-00000.parquet").to_pylist()
    table[2]["jpg_1"] = b"\xff\xd8 broken"
    pq.write_table(pa.Table.from_pylist(table), src / "train-00000.parquet")
    index = build_cache(frozen_model, PreferencePairs(src), tmp_path / "c", resolution=32, progress=False)
    assert index["cached_pairs"] == 6 and index["skipped_pairs"] == 1
    assert json.loads((tmp_path / "c" / "index.json").read_text())["skipped_pairs"] == 1


def test_cached_and_raw_batches_train_alike(tmp_path, pipeline):
    model = PreferenceModel(pipeline, lora=LoraSettings(rank=2))
    pairs = PreferencePairs(write_dataset(tmp_path / "src", SPEC))
    build_cache(model, pairs, tmp_path / "c", resolution=32, progress=False)
    cached = next(LatentCache(tmp_path / "c").batches(3, shuffle=False))
    raw = pairs.collate([0, 1, 2], 32)
    from_raw = PreferenceBatch(latents_w=model.encode_images(raw.pixel_values_w, sample=False),
                               latents_l=model.encode_images(raw.pixel_values_l, sample=False),
                               prompts=raw.prompts, time_ids_w=raw.time_ids_w, time_ids_l=raw.time_ids_l)
    objective = make_objective("ncp-dpo")
    losses = [training_step(model, objective, b, generator=torch.Generator().manual_seed(0)).metrics["loss_w_policy"]
              for b in (cached, from_raw)]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-9)


def test_two_processes_split_the_shards_and_match_one(tmp_path, tiny_pipeline_dirs):
    import subprocess
    import sys

    from safetensors.torch import load_file

    src = write_dataset(tmp_path / "src", SPEC)
    model_dir = str(tiny_pipeline_dirs["sd15"])
    common = ["data", "cache", "--model", model_dir, str(src), "--resolution", "32", "--pairs-per-shard", "2"]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "ncppo.cli",
                          *common[:4], str(src), str(tmp_path / "two"), *common[5:]],
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "cache (rank 1)" in run.stderr and "cache (rank 0)" in run.stderr
    from ncppo.cli import main

    assert main([*common[:4], str(src), str(tmp_path / "one"), *common[5:]]) == 0
    two, one = LatentCache(tmp_path / "two"), LatentCache(tmp_path / "one")
    assert len(two) == len(one) == 7 and two.index["num_shards"] == 4
    for shard in one.index["shards"]:
        a, b = load_file(str(tmp_path / "one" / shard["file"])), load_file(str(tmp_path / "two" / shard["file"]))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key])


@pytest.fixture(scope="module")
def pixart_dir(tmp_path_factory):
    from ncppo.models.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("pixart") / "pixart", "pixart")


def test_a_pixart_cache_keeps_the_t5_mask_and_trains_as_raw_pairs(tmp_path, pixart_dir, monkeypatch):
    from .conftest import perturb_lora

    model = PreferenceModel.from_pretrained(pixart_dir, lora=LoraSettings(rank=2))
    pairs = PreferencePairs(write_dataset(tmp_path / "src", SPEC))
    build_cache(model, pairs, tmp_path / "c", resolution=32, batch_size=3, pairs_per_shard=4, progress=False)
    cached = list(LatentCache(tmp_path / "c").batches(4, shuffle=False))
    raw = pairs.collate(list(range(7)), 32)
    latents = model.encode_images(raw.pixel_values_w, sample=False)
    fresh = model.encode_batch(PreferenceBatch(latents_w=latents, latents_l=latents, prompts=raw.prompts)).condition_w
    mask = torch.cat([b.prompt_attention_mask for b in cached])
    assert mask.dtype == fresh.attention_mask.dtype and torch.equal(mask, fresh.attention_mask)
    assert (mask.sum(1) > 0).all() and (mask.sum(1) < mask.shape[1]).all()  # the prompt's tokens, then padding
    torch.testing.assert_close(torch.cat([b.prompt_embeds for b in cached]), fresh.encoder_hidden_states)

    perturb_lora(model.unet, scale=0.05)
    first = cached[0]
    part = pairs.collate([0, 1, 2, 3], 32)
    from_raw = PreferenceBatch(latents_w=model.encode_images(part.pixel_values_w, sample=False),
                               latents_l=model.encode_images(part.pixel_values_l, sample=False), prompts=part.prompts)
    objective = make_objective("ncp-dpo")

    def loss(batch):
        return training_step(model, objective, batch, generator=torch.Generator().manual_seed(0)).metrics["loss_w_policy"]

    torch.testing.assert_close(loss(first), loss(from_raw), rtol=1e-5, atol=1e-9)
    unmasked = loss(first.replace(prompt_attention_mask=torch.ones_like(first.prompt_attention_mask)))
    assert abs(unmasked - loss(first)) > 1e-6  # the mask is what the step attends with

    real_encode = cache_module._encode  # a cache from before the mask was stored is refused by name
    monkeypatch.setattr(cache_module, "_encode", lambda *a: {k: v for k, v in real_encode(*a).items()
                                                             if k != "prompt_attention_mask"})
    build_cache(model, pairs, tmp_path / "old", resolution=32, progress=False)
    with pytest.raises(DataError, match="a PixArt cache built before ncppo stored the T5 padding mask.*--overwrite"):
        next(LatentCache(tmp_path / "old").batches(2, shuffle=False))
