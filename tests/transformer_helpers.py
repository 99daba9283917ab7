"""Shared by the transformer tests: ``ncppo train`` of each of the six objectives on a tiny pipeline folder."""

import json
import math

import pytest

from ncppo.objectives import OBJECTIVE_NAMES


def tiny_model_dir(tmp_path_factory, kind: str):
    """``ncppo tiny-model DIR --kind KIND``'s folder (built once per test module by its fixture)."""
    from ncppo.cli import main

    out = tmp_path_factory.mktemp(kind) / kind
    assert main(["tiny-model", str(out), "--kind", kind]) == 0
    return out


def train_each_objective(model_dir, tmp_path) -> dict:
    """Two steps of each objective from raw pairs; checks finite losses and log 2 at DPO's first step; returns
    each objective's run folder."""
    from ncppo.training import Trainer, load_config

    from .data_helpers import write_dataset

    spec = [(f"a {c} shape {k}", f"w{k}{c}", f"l{k}{c}", k % 2) for k in range(3) for c in ("red", "blue")]
    data = write_dataset(tmp_path / "pairs", spec, rows_per_shard=5)
    runs = {}
    for name in OBJECTIVE_NAMES:
        run = tmp_path / f"run-{name}"
        cfg = load_config(None, [f"output_dir={run}", f"model.pretrained={model_dir}", "model.lora_rank=4",
                                 f"data.source={data}", "data.resolution=32", "batch_size=2", "max_steps=2",
                                 "optim.learning_rate=1e-3", "optim.scale_lr=false", f"objective.name={name}"])
        assert Trainer(cfg).train().steps == 2
        losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert len(losses) == 2 and all(math.isfinite(v) for v in losses), name
        if name.endswith("dpo"):
            assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # the first step: policy = reference
        runs[name] = run
    return runs
