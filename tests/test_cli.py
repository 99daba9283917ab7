import re

from ncppo.cli import main


def test_tiny_model_command_and_load_error(tmp_path, capsys):
    assert main(["tiny-model", str(tmp_path / "m"), "--kind", "sdxl"]) == 0
    assert (tmp_path / "m" / "model_index.json").is_file()
    assert (tmp_path / "m" / "text_encoder_2").is_dir()
    from ncppo.models.loading import load_pipeline

    assert type(load_pipeline(tmp_path / "m")).__name__ == "StableDiffusionXLPipeline"


def test_objectives_listing(capsys):
    assert main(["objectives"]) == 0
    listed = capsys.readouterr().out
    for name in ("sft", "dpo", "cpo", "ncp-sft", "ncp-dpo", "ncp-cpo"):
        assert re.search(rf"^{re.escape(name)}\s", listed, re.M)
