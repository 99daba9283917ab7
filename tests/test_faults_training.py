"""Fault reproductions for the trainer: bad data, kills at exact code points (real SIGKILLs in a child
process), two runs in one folder, a full disk, changed settings on resume, mixed output folders, and the
diagnostics a user can act on."""

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
import types

import pytest
import torch
import yaml

from ncppo.errors import OutputDirError, StateError
from ncppo.training import DiskFullError, TooManySkippedSteps, Trainer, load_config
from ncppo.training.checkpoint import FILES, checkpoint_dirs

from .data_helpers import write_dataset

SPEC = [(f"a {c} shape {k}", f"w{k}{c}", f"l{k}{c}", k % 2) for k in range(6) for c in ("red", "blue")]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "pairs", SPEC, rows_per_shard=5)


def _values(tmp_path, model_dir, dataset, **extra):
    values = {"output_dir": str(tmp_path / "run"), "model": {"pretrained": str(model_dir), "lora_rank": 4},
              "data": {"source": str(dataset), "resolution": 32}, "batch_size": 2,
              "objective": {"name": "dpo", "beta": 5.0e6}, "optim": {"learning_rate": 1.0e-3, "scale_lr": False},
              "max_steps": 1, "checkpoint_every_steps": 1, "report_to": ["jsonl", "csv"]}
    for key, value in extra.items():
        section, _, leaf = key.partition("__")
        if leaf:
            values.setdefault(section, {})[leaf] = value
        else:
            values[key] = value
    return values


def _config(tmp_path, model_dir, dataset, *overrides, **extra):
    """The test's base values, then ``extra``, then ``key=value`` overrides (as the command line applies them)."""
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(_values(tmp_path, model_dir, dataset, **extra)))
    return load_config(path, list(overrides))


def _write_config(tmp_path, model_dir, dataset, **extra):
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(_values(tmp_path, model_dir, dataset, **extra)))
    return path


def _steps(run_dir, name="metrics.jsonl"):
    if name.endswith(".jsonl"):
        return [json.loads(line)["step"] for line in (run_dir / name).read_text().splitlines()]
    lines = (run_dir / name).read_text().splitlines()
    assert lines[0].startswith("step,"), lines[:1]
    return [int(float(line.split(",")[0])) for line in lines[1:]]


def _error_line(err: str) -> str:
    """The command's error: one line (progress bars aside), no traceback."""
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("ncppo: error:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def _child(config_path, patch: str, *overrides, wait=True):
    """``ncppo train`` in a child process with ``patch`` applied first (the exact code point of a kill)."""
    script = textwrap.dedent(patch) + textwrap.dedent(f"""
        import sys
        from ncppo.cli import main
        sys.exit(main(["train", {str(config_path)!r}, *{list(overrides)!r}]))
    """)
    cmd = [sys.executable, "-c", script]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, f"the child was not killed (rc {done.returncode}): {done.stderr[-2000:]}"
    return done


# -- 12.4: bad data is reported, and a run on bad data does not end as a success ---------------------
def test_all_bad_images_stop_the_run_with_the_skip_report(tmp_path, tiny_pipeline_dirs, capsys):
    uids = {u for _, a, b, _ in SPEC for u in (a, b)}
    bad = write_dataset(tmp_path / "bad", SPEC, rows_per_shard=6, images={u: b"not an image" for u in uids})
    from ncppo.cli import main

    config = _write_config(tmp_path, tiny_pipeline_dirs["sd15"], bad, max_steps=3)
    assert main(["train", str(config)]) == 2
    err = _error_line(capsys.readouterr().err)
    assert err.startswith("ncppo: error: train: stopping at step 3: 3 of 3 optimiser steps (100%) had no valid pair")
    assert "bad image" in err and "max_skipped_step_fraction=0.1" in err
    assert not (tmp_path / "run" / "lora").exists() and not (tmp_path / "run" / "summary.json").exists()
    # a longer run stops as soon as the check starts, not at max_steps
    cfg = _config(tmp_path, tiny_pipeline_dirs["sd15"], bad, max_steps=1000, skipped_step_check_after=4,
                  output_dir=str(tmp_path / "long"))
    with pytest.raises(TooManySkippedSteps, match="stopping at step 4: 4 of 4"):
        Trainer(cfg).train()


def test_some_bad_images_are_reported_at_start_and_in_the_summary(tmp_path, tiny_pipeline_dirs, dataset, capsys):
    from ncppo.data.pairs import PreferencePairs
    from ncppo.training.sources import derived_seed as _seed

    pairs = PreferencePairs(dataset)
    first = int(pairs.plan(2, shuffle=True, seed=_seed(0, 0), drop_last=True)[0][0])  # in step 1's batch
    bad_uid = pairs.meta.uid_w[first].as_py()
    data = write_dataset(tmp_path / "some-bad", SPEC, rows_per_shard=5, images={bad_uid: b"broken"})
    cfg = _config(tmp_path, tiny_pipeline_dirs["sd15"], data, checkpoint_every_steps=None)
    result = Trainer(cfg).train()  # step 1's batch keeps its other pair
    assert result.steps == 1
    out = capsys.readouterr().out
    assert "data skipped          = no rows skipped" in out  # at start only the metadata is checked
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data"]["skips"]["by_reason"] == {"bad image": 1}
    assert "cannot decode image" in summary["data"]["skips"]["examples"]["bad image"][0]
    assert summary["skipped_steps"] == {"no_valid_pair": 0, "nonfinite": 0}
    end = out[out.index("***** Training finished *****"):]
    assert "skipped 1: 1 bad image" in end


# -- 12.8: fault windows ---------------------------------------------------------------------------
KILL_ON_METRICS_REWRITE = """
    import builtins, io, os, signal
    real_open, real_replace = io.open, os.replace

    def killing_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if "w" in mode and "metrics." in os.path.basename(str(file)):
            os.kill(os.getpid(), signal.SIGKILL)  # the file is open for the rewrite (truncated if in place)
        return f

    def killing_replace(src, dst, *args, **kwargs):
        if "metrics." in os.path.basename(str(dst)):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst, *args, **kwargs)

    builtins.open = io.open = killing_open
    os.replace = killing_replace
"""


def test_a_kill_during_the_metrics_rewrite_on_resume_loses_nothing(tmp_path, tiny_pipeline_dirs, dataset):
    run = tmp_path / "run"
    Trainer(_config(tmp_path, tiny_pipeline_dirs["sd15"], dataset)).train()
    assert _steps(run) == _steps(run, "metrics.csv") == [1]
    config = _write_config(tmp_path, tiny_pipeline_dirs["sd15"], dataset, max_steps=2)
    _child(config, KILL_ON_METRICS_REWRITE)  # resumes from step 1: killed while it rewrites the metrics
    assert _steps(run) == [1]
    assert _steps(run, "metrics.csv") == [1]  # the header too
    result = Trainer(_config(tmp_path, tiny_pipeline_dirs["sd15"], dataset, max_steps=2)).train()
    assert result.steps == 2
    assert _steps(run) == _steps(run, "metrics.csv") == [1, 2]


def test_a_torn_last_metrics_line_is_dropped_and_a_bad_line_is_named(tmp_path, tiny_pipeline_dirs, dataset, capsys):
    run = tmp_path / "run"
    Trainer(_config(tmp_path, tiny_pipeline_dirs["sd15"], dataset, checkpoint_every_steps=None)).train()
    with open(run / "metrics.jsonl", "a") as f:  # what a kill in the middle of an append leaves
        f.write('{"step": 2, "loss": 0.69')
    with open(run / "metrics.csv", "a") as f:
        f.write("2,0.69")
    result = Trainer(_config(tmp_path, tiny_pipeline_dirs["sd15"], dataset, max_steps=2)).train()
    assert result.steps == 2
    assert _steps(run) == _steps(run, "metrics.csv") == [1, 2]
    assert "metrics.jsonl: dropped a torn last line" in capsys.readouterr().out
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[0] = lines[0][:20]  # damage before the last line is not a torn append: named, not guessed
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(StateError, match=rf"^{run / 'metrics.jsonl'}: line 1 is not a metrics row"):
        Trainer(_config(tmp_path, tiny_pipeline_dirs["sd15"], dataset, max_steps=3)).train()


KILL_MID_PRUNE = """
    import os, signal
    real_unlink = os.unlink

    def killing_unlink(path, *args, **kwargs):
        real_unlink(path, *args, **kwargs)
        if os.path.basename(str(path)) in ("trainable.safetensors", "optimizer.pt", "scheduler.pt"):
            os.kill(os.getpid(), signal.SIGKILL)  # one file of the pruned checkpoint is gone

    os.unlink = killing_unlink
"""


def test_a_kill_mid_prune_leaves_no_half_deleted_checkpoint(tmp_path, tiny_pipeline_dirs, dataset, capsys):
    from safetensors.torch import load_file

    from ncppo.evaluation.runs import run_checkpoints

    run = tmp_path / "run"
    config = _write_config(tmp_path, tiny_pipeline_dirs["sd15"], dataset, max_steps=4, keep_last_checkpoints=1)
    _child(config, KILL_MID_PRUNE)  # saving step 2 prunes step 1: killed during its deletion
    found = checkpoint_dirs(run)
    assert [p.name for p in found] == ["step-000002"]
    for info in run_checkpoints(run):  # what `ncppo curve` reads
        assert all((info.path / f).is_file() for f in FILES)
        load_file(str(info.path / "trainable.safetensors"))
    result = Trainer(_config(tmp_path, tiny_pipeline_dirs["sd15"], dataset, max_steps=3, keep_last_checkpoints=1)).train()
    assert result.steps == 3 and [p.name for p in checkpoint_dirs(run)] == ["step-000003"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000003"]  # leftovers cleaned
    assert "a prune that was interrupted" in capsys.readouterr().out
    assert _steps(run) == [1, 2, 3]


def test_only_complete_checkpoints_count(tmp_path):
    from ncppo.training.checkpoint import clean_leftovers

    root = tmp_path / "checkpoints"
    for name, files in (("step-000001", FILES), ("step-000002", FILES[1:]), ("step-000003", ("state.json",))):
        (root / name).mkdir(parents=True)
        for f in files:
            (root / name / f).write_text("x")
    (root / ".trash-step-000000-12345678").mkdir()
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-000001"]
    done = clean_leftovers(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["step-000001"]
    assert any("incomplete checkpoint step-000003 (missing trainable.safetensors" in d for d in done)


# -- 12.10: two runs in one folder -------------------------------------------------------------------
HOLD_AFTER_FIRST_ROW = """
    import time
    import ncppo.training.logging as L
    real_log = L.MetricLogger.log

    def log(self, step, metrics):
        real_log(self, step, metrics)
        print("RUNNING", flush=True)
        time.sleep(120)

    L.MetricLogger.log = log
"""


def test_a_second_run_in_the_same_folder_is_refused_with_the_first_ones_pid(tmp_path, tiny_pipeline_dirs, dataset):
    config = _write_config(tmp_path, tiny_pipeline_dirs["sd15"], dataset, checkpoint_every_steps=None)
    first = _child(config, HOLD_AFTER_FIRST_ROW, wait=False)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            line = first.stdout.readline()
            if not line or "RUNNING" in line:
                break
        assert first.poll() is None, "the first run ended early"
        with pytest.raises(OutputDirError, match=rf"another run \(pid {first.pid} on .*\) is writing to {tmp_path / 'run'}"):
            Trainer(_config(tmp_path, tiny_pipeline_dirs["sd15"], dataset)).train()
    finally:
        first.kill()
        first.wait(timeout=60)
    # the lock died with its holder; the killed run had no checkpoint, so its row is replaced, not mixed in
    result = Trainer(_config(tmp_path, tiny_pipeline_dirs["sd15"], dataset)).train()
    assert result.steps == 1 and _steps(tmp_path / "run") == [1]


# -- 12.11: one line where a traceback was ------------------------------------------------------------
def test_a_full_disk_during_a_checkpoint_is_one_line_naming_the_file(tmp_path, tiny_pipeline_dirs, dataset,
                                                                    monkeypatch, capsys):
    import ncppo.training.checkpoint as ckpt
    from ncppo.cli import main

    if not stat.S_ISCHR(os.stat("/dev/full").st_mode):
        pytest.skip("no /dev/full device (writes to it fail with ENOSPC)")
    real = torch.save

    def full_disk(obj, f, *args, **kwargs):  # step 2's optimizer state meets a full disk
        if not ("step-000002" in str(f) and str(f).endswith("optimizer.bin")):
            return real(obj, f, *args, **kwargs)
        return real(obj, "/dev/full", *args, **kwargs)  # written as accelerate writes it: to a path

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    config = _write_config(tmp_path, tiny_pipeline_dirs["sd15"], dataset, max_steps=2)
    assert main(["train", str(config)]) == 2
    err = _error_line(capsys.readouterr().err)
    # accelerate writes the checkpoint's files: the message names the checkpoint being written
    assert err.startswith(f"ncppo: error: no space left on device while writing "
                          f"{tmp_path / 'run' / 'checkpoints' / 'step-000002'} (")
    assert [p.name for p in checkpoint_dirs(tmp_path / "run")] == ["step-000001"]
    with pytest.raises(DiskFullError):  # from Python: an OSError (errno ENOSPC) and an NcppoError
        Trainer(_config(tmp_path, tiny_pipeline_dirs["sd15"], dataset, max_steps=2)).train()


# -- 16: changed settings, mixed folders, the resolved learning rate ------------------------------------
def test_a_resume_with_changed_settings_is_refused_unless_forced(tmp_path, tiny_pipeline_dirs, dataset, capsys):
    model = tiny_pipeline_dirs["sd15"]
    Trainer(_config(tmp_path, model, dataset)).train()
    ckpt = tmp_path / "run" / "checkpoints" / "step-000001"
    with pytest.raises(StateError, match=rf"^train: {ckpt} is from a run with other settings \(objective.beta: "
                                         r"5000000.0 -> 2500.0; optim.learning_rate: 0.001 -> 0.002; "
                                         r"resolved.learning_rate: 0.001 -> 0.002\); set resume: force"):
        Trainer(_config(tmp_path, model, dataset, "objective.beta=2500", "optim.learning_rate=2e-3")).train()
    with pytest.raises(StateError, match=r"\(model.lora_rank: 4 -> 8\)"):
        Trainer(_config(tmp_path, model, dataset, "model.lora_rank=8", "max_steps=2")).train()
    with pytest.raises(StateError, match=rf"^train: {ckpt} holds .*lora.* with shape .*model.lora_rank: 4 -> 8"):
        Trainer(_config(tmp_path, model, dataset, "model.lora_rank=8", "resume=force", "max_steps=2")).train()
    capsys.readouterr()
    # the budget, logging and checkpoint intervals may change; the resume says where it continues from
    result = Trainer(_config(tmp_path, model, dataset, "max_steps=2", "log_every=2", "checkpoint_every_steps=5")).train()
    assert result.steps == 2
    assert f"resuming from step 1 ({ckpt}" in capsys.readouterr().out
    forced = Trainer(_config(tmp_path, model, dataset, "objective.beta=2500", "resume=force", "max_steps=3")).train()
    assert forced.steps == 3
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["resumed_from"]["step"] == 2
    assert summary["resumed_from"]["changed_settings"] == ["objective.beta: 5000000.0 -> 2500.0"]
    assert [w["code"] for w in summary["warnings"]] == ["resume_force"]
    # the forced run's checkpoint records its settings: a plain resume with them is accepted
    assert Trainer(_config(tmp_path, model, dataset, "objective.beta=2500", "max_steps=3")).train().steps == 3


def test_a_damaged_checkpoint_is_named(tmp_path, tiny_pipeline_dirs, dataset):
    model = tiny_pipeline_dirs["sd15"]
    Trainer(_config(tmp_path, model, dataset)).train()
    ckpt = tmp_path / "run" / "checkpoints" / "step-000001"
    (ckpt / "trainable.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(StateError, match=rf"^train: {ckpt} cannot be restored into this run .*delete that folder"):
        Trainer(_config(tmp_path, model, dataset, "max_steps=2")).train()


def test_a_checkpoint_of_the_older_format_is_named(tmp_path, tiny_pipeline_dirs, dataset):
    model = tiny_pipeline_dirs["sd15"]
    Trainer(_config(tmp_path, model, dataset)).train()
    ckpt = tmp_path / "run" / "checkpoints" / "step-000001"
    (ckpt / "optimizer.bin").rename(ckpt / "optimizer.pt")  # what ncppo wrote before accelerate's save_state
    with pytest.raises(StateError, match=rf"^train: {ckpt} was written by an older ncppo .*its LoRA still loads"):
        Trainer(_config(tmp_path, model, dataset, "max_steps=2")).train()


def test_resume_false_and_overwrite_and_inputs(tmp_path, tiny_pipeline_dirs, dataset):
    model = tiny_pipeline_dirs["sd15"]
    run = tmp_path / "run"
    Trainer(_config(tmp_path, model, dataset, "seed=1")).train()
    with pytest.raises(OutputDirError, match=rf"the output folder {run} holds a training run \(newest checkpoint "
                                             r"step-000001\); with resume: false"):
        Trainer(_config(tmp_path, model, dataset, "resume=false")).train()
    before = (run / "metrics.jsonl").read_text()
    result = Trainer(_config(tmp_path, model, dataset, "resume=false", "overwrite_output_dir=true")).train()
    assert result.steps == 1 and _steps(run) == [1] and _steps(run, "metrics.csv") == [1]
    assert (run / "metrics.jsonl").read_text() != before  # seed 0's row, not seed 1's
    assert yaml.safe_load((run / "config.yaml").read_text())["seed"] == 0
    assert [p.name for p in checkpoint_dirs(run)] == ["step-000001"]
    assert not list(tmp_path.glob(".replaced-*"))
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    with pytest.raises(OutputDirError, match="is not empty and is a folder that no ncppo command wrote"):
        Trainer(_config(tmp_path, model, dataset, output_dir=str(other))).train()
    assert (other / "mine.txt").read_text() == "keep me"
    for inside in (dataset / "run", model / "run"):
        with pytest.raises(OutputDirError, match="is inside the input"):
            Trainer(_config(tmp_path, model, dataset, output_dir=str(inside))).train()
        assert not inside.exists()


def test_banner_resolved_learning_rate_and_end_summary(tmp_path, tiny_pipeline_dirs, dataset, capsys):
    model = tiny_pipeline_dirs["sd15"]
    cfg = _config(tmp_path, model, dataset, "optim.scale_lr=true", "gradient_accumulation_steps=2",
                  "checkpoint_every_steps=null", "objective.beta=5000")
    Trainer(cfg).train()
    out = capsys.readouterr()
    text = out.out
    banner = text[text.index("***** Running training *****"):]
    for expected in ("data                  = 12 pairs from", "processes             = 1",
                     "per-process batch     = 2 pairs", "gradient accumulation = 2 micro-steps",
                     "effective batch       = 4 pairs per optimiser step", "optimiser steps       = 1 (max_steps)",
                     "learning rate         = 0.001 x 4 (scale_lr: x effective batch) = 0.004",
                     "precision             = no", "objective             = dpo (beta=5000.0"):
        assert expected in banner, expected
    end = text[text.index("***** Training finished *****"):]
    assert "stopped by     = max_steps after 1 steps" in end and "final metrics  = loss 0.69" in end
    assert (f"ncppo generate --model {model} --lora {tmp_path / 'run' / 'lora'} --prompts PROMPTS.txt" in end)
    assert "loss=0.69314" in out.err  # near log 2: six significant digits in the bar
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["resolved"]
    assert resolved["learning_rate"] == pytest.approx(0.004) and resolved["effective_batch"] == 4
    assert resolved["gradient_accumulation_steps"] == 2 and resolved["num_processes"] == 1
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["learning_rate"] == pytest.approx(0.004) and summary["effective_batch"] == 4
    assert summary["final_metrics"]["step"] == 1 and "loss" in summary["mean_metrics"]
    assert set(summary["diagnostics"]) >= {"loss", "argument_rms", "grad_norm", "grad_norm_clipped", "eps_dominated_frac"}
    assert summary["data"]["pairs"] == len(SPEC) and summary["data"]["skips"]["total"] == 0


def test_a_time_budget_bar_shows_the_budget(tmp_path, tiny_pipeline_dirs, dataset, capsys):
    cfg = _config(tmp_path, tiny_pipeline_dirs["sd15"], dataset, "max_steps=100000", "max_train_minutes=0.01",
                  "checkpoint_every_steps=null")
    result = Trainer(cfg).train()
    assert result.stopped_by == "time_budget"
    err = capsys.readouterr().err
    assert "(budget 0.01 min)" in err and "/1 s" in err and "/100000" in err  # seconds of 0.6; steps in the postfix


# -- 14.4: diagnostics -----------------------------------------------------------------------------------
def test_flat_loss_and_eps_dominated_updates_warn_once(tmp_path, tiny_pipeline_dirs, dataset, capsys):
    cfg = _config(tmp_path, tiny_pipeline_dirs["sd15"], dataset, "objective.beta=1", "optim.adam_epsilon=10",
                  "diagnostics_window=2", "max_steps=3", "checkpoint_every_steps=null")
    Trainer(cfg).train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["argument_rms"] < 1e-3 and r["eps_dominated_frac"] > 0.99 for r in rows)
    assert all(r["grad_norm_clipped"] in (0, 1) for r in rows)
    printed = capsys.readouterr().out
    assert printed.count("warning: argument_rms has stayed below 0.001 for 2 logged steps") == 1
    assert printed.count("warning: most updates are below AdamW's eps: raise the loss scale or lower adam_epsilon") == 1
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [(w["code"], w["step"]) for w in summary["warnings"]] == [("flat_loss", 2), ("eps_dominated", 2)]
    assert summary["diagnostics"]["eps_dominated_frac"]["final"] > 0.99
    # the same run at a working beta and eps has neither
    healthy = _config(tmp_path, tiny_pipeline_dirs["sd15"], dataset, "diagnostics_window=2", "max_steps=2",
                      "checkpoint_every_steps=null", output_dir=str(tmp_path / "healthy"))
    Trainer(healthy).train()
    assert json.loads((tmp_path / "healthy" / "summary.json").read_text())["warnings"] == []


def test_eps_dominated_frac_counts_entries_below_eps():
    p = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.AdamW([p], lr=1e-3, eps=1e-8)
    for _ in range(3):
        p.grad = torch.tensor([1e-12, -1e-12, 1.0, -0.5])
        opt.step()
    from ncppo.training.diagnostics import eps_dominated_frac

    assert eps_dominated_frac(types.SimpleNamespace(optimizer=opt)) == 0.5  # sqrt(v_hat) = |g| (constant g): two entries below 1e-8
