import pytest

from ncppo.training.config import ConfigError, load_config, parse_overrides

BASE = ["model.pretrained=/m", "data.source=/d"]


def test_yaml_and_overrides(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "output_dir: out\nmodel: {pretrained: /m, lora_rank: 8}\ndata: {source: /d}\n"
        "objective: {name: dpo, beta: 2500}\noptim: {learning_rate: 1.0e-8}\n")
    cfg = load_config(tmp_path / "c.yaml", ["objective.name=ncp-dpo", "max_steps=10", "optim.learning_rate=3e-8",
                                            "report_to=[jsonl]"])
    assert cfg.objective.name == "ncp-dpo" and cfg.objective.beta == 2500.0 and isinstance(cfg.objective.beta, float)
    assert cfg.max_steps == 10 and cfg.optim.learning_rate == 3e-8 and cfg.model.lora_rank == 8
    assert cfg.report_to == ["jsonl"]


def test_unknown_keys_suggest_a_name():
    with pytest.raises(ConfigError, match="unknown config key 'objective.bta'; did you mean 'objective.beta'"):
        load_config(None, [*BASE, "objective.bta=1"])
    with pytest.raises(ConfigError, match="unknown config key 'max_step'; did you mean 'max_steps'"):
        load_config(None, [*BASE, "max_step=1"])


def test_wrong_types_and_choices():
    with pytest.raises(ConfigError, match="max_steps: expected int, got 'ten'"):
        load_config(None, [*BASE, "max_steps=ten"])
    with pytest.raises(ConfigError, match="gradient_checkpointing: expected bool"):
        load_config(None, [*BASE, "gradient_checkpointing=3"])
    with pytest.raises(ConfigError, match="objective: unknown objective 'ncp_dpo'; expected one of .*Did you mean 'ncp-dpo'"):
        load_config(None, [*BASE, "objective.name=ncp_dpo"])
    with pytest.raises(ConfigError, match="model.finetune: 'none' is not one of lora, full"):
        load_config(None, [*BASE, "model.finetune=none"])
    with pytest.raises(ConfigError, match="objective: unknown encoder timestep 't\\+1'"):
        load_config(None, [*BASE, "objective.encoder_timestep=t+1"])
    with pytest.raises(ConfigError, match="model: expected a mapping"):
        load_config(None, [*BASE[1:], "model=3"])
    with pytest.raises(ConfigError, match="model.pretrained"):
        load_config(None, ["data.source=/d"])
    with pytest.raises(ConfigError, match="not key=value"):
        parse_overrides(["max_steps"])


def test_effective_batch_must_be_reachable():
    cfg = load_config(None, [*BASE, "batch_size=4", "effective_batch=2048"])
    assert cfg.resolved_accumulation(num_processes=4) == 128
    with pytest.raises(ConfigError, match="effective_batch=2048 is not a multiple of batch_size x processes = 4 x 3"):
        cfg.resolved_accumulation(num_processes=3)


def test_shipped_configs_load():
    from pathlib import Path

    root = Path(__file__).parents[1] / "configs"
    configs = sorted(root.glob("*.yaml")) + sorted((root / "toy").glob("*.yaml"))
    assert len(configs) >= 12 and len(list((root / "toy").glob("*.yaml"))) == 6  # the six methods at toy scale
    for path in configs:
        cfg = load_config(path)
        assert cfg.objective.name in ("dpo", "ncp-dpo", "sft", "cpo", "ncp-sft", "ncp-cpo")
        # relative paths are read from the file's folder: every shipped run writes under the repository's outputs/
        assert Path(cfg.output_dir).parent in (root.parent / "outputs", root.parent / "outputs" / "toy"), path
        if path.parent.name == "toy":
            assert cfg.model.pretrained == str(root.parent / "outputs" / "demo" / "base_model")


def test_resume_output_and_guard_options():
    assert load_config(None, [*BASE]).resume is True
    assert load_config(None, [*BASE, "resume=false"]).resume is False
    assert load_config(None, [*BASE, "resume=force"]).resume == "force"
    assert load_config(None, [*BASE, "resume=yes"]).resume is True  # YAML's booleans keep working
    with pytest.raises(ConfigError, match="resume: expected true, false or force, got 'forse'"):
        load_config(None, [*BASE, "resume=forse"])
    cfg = load_config(None, BASE)
    assert (cfg.overwrite_output_dir, cfg.max_skipped_step_fraction, cfg.skipped_step_check_after,
            cfg.diagnostics_window) == (False, 0.1, 10, 20)
    assert load_config(None, [*BASE, "max_skipped_step_fraction=null"]).max_skipped_step_fraction is None
    with pytest.raises(ConfigError, match=r"max_skipped_step_fraction: must be in \[0, 1\] or null, got 1.5"):
        load_config(None, [*BASE, "max_skipped_step_fraction=1.5"])
    with pytest.raises(ConfigError, match="diagnostics_window: must be >= 1, got 0"):
        load_config(None, [*BASE, "diagnostics_window=0"])


def test_yaml_pitfalls_no_and_single_strings(tmp_path):
    (tmp_path / "c.yaml").write_text("model: {pretrained: /m, lora_targets: to_q}\ndata: {source: /d}\n"
                                     "mixed_precision: no\nreport_to: jsonl\nvalidation_prompts: a cat, oil painting\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.mixed_precision == "no"  # YAML read the bare word as false
    assert cfg.model.lora_targets == ["to_q"] and cfg.report_to == ["jsonl"]
    assert cfg.validation_prompts == ["a cat, oil painting"]  # a prompt is never split at its commas
    cfg = load_config(None, [*BASE, "mixed_precision=no", "report_to=jsonl,csv", "model.lora_targets=to_q, to_k"])
    assert cfg.mixed_precision == "no" and cfg.report_to == ["jsonl", "csv"] and cfg.model.lora_targets == ["to_q", "to_k"]
    assert load_config(None, [*BASE, "mixed_precision=bf16"]).mixed_precision == "bf16"
    with pytest.raises(ConfigError, match="mixed_precision: expected str, got True"):
        load_config(None, [*BASE, "mixed_precision=yes"])  # 'yes' means no precision: still an error
    with pytest.raises(ConfigError, match="report_to: 'wandbb' is not one of"):
        load_config(None, [*BASE, "report_to=wandbb"])


def test_every_config_key_is_described_with_its_default():
    import dataclasses

    from ncppo.training.config import TrainConfig
    from ncppo.training.reference import config_options, describe_options

    options = {o["key"]: o for o in config_options()}
    def leaves(instance, prefix=""):
        for f in dataclasses.fields(instance):
            value = getattr(instance, f.name)
            yield from leaves(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else [prefix + f.name]

    assert sorted(options) == sorted(leaves(TrainConfig()))
    assert "data.columns.caption" in options and "data.image_dir" in options
    undocumented = [k for k, o in options.items() if not o["help"]]
    assert not undocumented, f"config keys without a meaning in their dataclass's docstring: {undocumented}"
    text = describe_options()
    assert "  optim.learning_rate (float, default: 1e-08)\n      the base learning rate" in text
    assert "  mixed_precision (str, default: no)  one of: no, fp16, bf16" in text
    assert "  report_to (list of str, default: [jsonl, csv])" in text and "tracker_project (str, default: ncppo)" in text
    assert "``" not in text and ":class:" not in text


def test_choices_match_the_modules_that_own_them():
    # the table stays a literal so that `ncppo train --help` loads without torch; the owners decide
    from ncppo.data.schema import TIE_POLICIES
    from ncppo.flow import WEIGHTINGS
    from ncppo.models.preference_model import FINETUNE_MODES, REFERENCE_PASSES
    from ncppo.training.config import _CHOICES

    assert _CHOICES["data.tie_policy"] == TIE_POLICIES
    assert tuple(sorted(_CHOICES["model.timestep_weighting"])) == tuple(sorted(WEIGHTINGS))
    assert _CHOICES["model.finetune"] == tuple(m for m in FINETUNE_MODES if m != "none")  # none: not trainable
    assert _CHOICES["model.reference_pass"] == REFERENCE_PASSES


def test_transformer_options_are_config_keys():
    cfg = load_config(None, [*BASE, "model.guidance=2", "model.timestep_weighting=uniform",
                             "objective.encoder_blocks=[0, 2]"])
    assert cfg.model.guidance == 2.0 and isinstance(cfg.model.guidance, float)
    assert cfg.model.timestep_weighting == "uniform"
    assert cfg.objective.options()["encoder_blocks"] == (0, 2)
    from ncppo.training.setup import build_objective

    assert build_objective(cfg.objective).space.encoder.blocks == (0, 2)
    count = load_config(None, [*BASE, "objective.encoder_blocks=3"]).objective.encoder_blocks
    assert count == 3 and isinstance(count, int)  # a count, not the fraction 3.0
    fraction = load_config(None, [*BASE, "objective.encoder_blocks=0.25"]).objective.encoder_blocks
    assert fraction == 0.25 and isinstance(fraction, float)
    default = load_config(None, BASE)
    assert (default.model.guidance, default.model.timestep_weighting, default.objective.encoder_blocks) == (None,) * 3
    with pytest.raises(ConfigError, match=r"objective: encoder blocks as a fraction of the depth must lie in \(0, 1\]"):
        load_config(None, [*BASE, "objective.encoder_blocks=1.5"])
    with pytest.raises(ConfigError, match="objective: encoder depth must be >= 1 block, got 0"):
        load_config(None, [*BASE, "objective.encoder_blocks=0"])
    with pytest.raises(ConfigError, match=r"objective.encoder_blocks: expected int \| float \| list \| null, got 'half'"):
        load_config(None, [*BASE, "objective.encoder_blocks=half"])
    with pytest.raises(ConfigError, match="model.timestep_weighting: 'logit-normal' is not one of uniform, "
                                          "logit_normal; did you mean 'logit_normal'"):
        load_config(None, [*BASE, "model.timestep_weighting=logit-normal"])
    with pytest.raises(ConfigError, match="model.guidance: must be a finite number >= 0 or null, got -1.0"):
        load_config(None, [*BASE, "model.guidance=-1"])


def test_the_transformer_keys_are_described():
    from ncppo.training.reference import describe_options

    text = describe_options()
    assert "  model.guidance (float | null, default: null)\n      the guidance scale a FLUX.1-dev-class" in text
    assert ("  model.timestep_weighting (str | null, default: null)  one of: uniform, logit_normal\n"
            "      a flow model's") in text
    assert "  objective.encoder_blocks (int | float | list of int | null, default: null)\n      a transformer's" in text


def test_a_source_in_another_shape_trains_through_data_columns(tmp_path):
    """``data.columns`` is the data commands' column mapping: a YAML config reads a renamed-column parquet."""
    import yaml

    from ncppo.training.setup import build_data

    from .data_helpers import WINNER_FIRST, write_shape

    source = write_shape("mapped", tmp_path / "src")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({
        "output_dir": "out", "model": {"pretrained": "m"},
        "data": {"source": "src", "columns": {"caption": "text", "image_0": "img_a", "image_1": "img_b",
                                              "label_0": "pref_a", "label_1": "pref_b"}}}))
    config = load_config(str(tmp_path / "run.yaml"))
    data = build_data(config.data)
    assert data.pairs.meta.caption.to_pylist() == [c for c, _, _ in WINNER_FIRST]
    assert load_config(None, **config.to_dict()).data.columns == config.data.columns  # a run's record reloads
    # without the mapping the same source is a named error, not a silent misread
    with pytest.raises(Exception, match="caption"):
        build_data(load_config(None, output_dir=str(tmp_path / "o"), model={"pretrained": "m"},
                               data={"source": str(source)}).data)
    with pytest.raises(ConfigError, match="data.columns: unknown key.*did you mean 'caption'"):
        load_config(None, model={"pretrained": "m"}, data={"source": "s", "columns": {"captoin": "text"}})
