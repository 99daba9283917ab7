"""``ncppo --version``, defaults in ``--help``, and ``ncppo train --help`` listing every config key."""

import pytest

from ncppo.cli import build_parser, main


def test_version(capsys):
    import ncppo

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"ncppo {ncppo.__version__}\n"


def test_train_help_lists_every_config_key_with_meaning_and_default(capsys):
    from ncppo.training.reference import config_options

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for option in config_options():
        assert f"\n  {option['key']} (" in text, option["key"]
    assert "  optim.scale_lr (bool, default: true)\n      multiply the learning rate by the effective batch" in text
    assert "  model.lora_rank (int, default: 64)\n" in text and "  report_to (list of str, default: [jsonl, csv])" in text


def test_help_shows_defaults():
    text = build_parser()._subparsers._group_actions[0].choices["generate"].format_help()
    assert "(default: 0)" in text  # --seed
    assert "(default: None)" not in text and "(default 20) (default: 20)" not in text
