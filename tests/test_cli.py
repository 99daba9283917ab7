import re

from ncppo.cli import main


def test_tiny_model_command_and_load_error(tmp_path, capsys):
    assert main(["tiny-model", str(tmp_path / "m"), "--kind", "sdxl"]) == 0
    assert (tmp_path / "m" / "model_index.json").is_file()
    assert (tmp_path / "m" / "text_encoder_2").is_dir()
    from ncppo.models.loading import load_pipeline

    assert type(load_pipeline(tmp_path / "m")).__name__ == "StableDiffusionXLPipeline"


def test_tiny_model_never_replaces_a_foreign_folder(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "thesis.tex").write_text("years of work")
    assert main(["tiny-model", str(tmp_path / "m")]) == 2
    assert "a folder that no ncppo command wrote" in capsys.readouterr().err
    assert (tmp_path / "m" / "thesis.tex").read_text() == "years of work"
    assert main(["tiny-model", str(tmp_path / "m"), "--overwrite"]) == 0
    assert not (tmp_path / "m" / "thesis.tex").exists() and (tmp_path / "m" / "model_index.json").is_file()
    assert main(["tiny-model", str(tmp_path / "m"), "--kind", "sdxl"]) == 0  # its own earlier output: replaced
    assert (tmp_path / "m" / "text_encoder_2").is_dir()


def test_objectives_listing(capsys):
    assert main(["objectives"]) == 0
    listed = capsys.readouterr().out
    for name in ("sft", "dpo", "cpo", "ncp-sft", "ncp-dpo", "ncp-cpo"):
        assert re.search(rf"^{re.escape(name)}\s", listed, re.M)


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(monkeypatch, capsys):
    import pytest

    import ncppo.cli
    from ncppo.errors import UsageError

    def fail(error):
        def command(_args):
            raise error
        return command

    parser = ncppo.cli.build_parser()
    monkeypatch.setattr(ncppo.cli, "build_parser", lambda: parser)
    monkeypatch.setattr(parser, "parse_args", lambda argv: type("A", (), {"func": staticmethod(fail(UsageError("bad")))})())
    assert main([]) == 2 and capsys.readouterr().err == "ncppo: error: bad\n"
    monkeypatch.setattr(parser, "parse_args", lambda argv: type("A", (), {"func": staticmethod(fail(ValueError("shape")))})())
    with pytest.raises(ValueError, match="shape"):  # an internal ValueError is a bug: not swallowed
        main([])


def test_the_readme_python_api_names_import_lazily_from_ncppo():
    import subprocess
    import sys

    code = ("import sys, ncppo; assert 'torch' not in sys.modules; "
            "from ncppo import PreferenceModel, LoraSettings, PreferenceBatch, make_objective, training_step, "
            "Trainer, TrainConfig, load_config, PreferencePairs, load_pipeline, GenerationSpec, make_reward; "
            "assert make_reward('oracle').name == 'oracle'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_sampling_defaults_come_from_the_library():
    from ncppo.cli import build_parser
    from ncppo.evaluation import GenerationSpec

    for command in (["generate", "--model", "m", "--out", "o"], ["curve", "run", "--reward", "oracle", "--out", "o"]):
        args = build_parser().parse_args([*command, "--prompts", "p.txt"])
        assert (args.steps, args.guidance) == (GenerationSpec.num_inference_steps, GenerationSpec.guidance_scale)
        assert (args.images_per_prompt, args.seed) == (GenerationSpec.images_per_prompt, GenerationSpec.seed)


def test_generate_with_a_folder_that_is_no_lora_is_one_line(tiny_pipeline_dirs, tmp_path, capsys):
    (tmp_path / "lora").mkdir()
    (tmp_path / "p.txt").write_text("a red circle\n")
    assert main(["generate", "--model", str(tiny_pipeline_dirs["sd15"]), "--lora", str(tmp_path / "lora"), "--prompts",
                 str(tmp_path / "p.txt"), "--out", str(tmp_path / "out"), "--steps", "1"]) == 2
    assert "not a diffusers-format LoRA" in capsys.readouterr().err
