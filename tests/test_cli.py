import json
import re

from ncppo.cli import main


def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    history = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 4 and all(h["loss"] > 0 for h in history)
    # the report's numbers come from this run's metrics
    assert f"| 1 | {history[0]['loss']:.4g} |" in report
    reload_error = float(re.search(r"reloaded U-Net\| on a probe input: ([0-9.e+-]+)", report).group(1))
    effect = float(re.search(r"the LoRA's effect\): ([0-9.e+-]+)", report).group(1))
    assert reload_error < 1e-5 < effect  # the exported LoRA is the trained one, and it changed the model
    assert (out / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "pairs" / "train-00000.parquet").is_file()
    assert (out / "samples.png").stat().st_size > 0
    assert json.loads((out / "config.json").read_text())["objective"] == "ncp-dpo"


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
