"""The command line: option forms, --help for every command, clear errors with suggestions."""

from __future__ import annotations

from prefalign.cli import COMMANDS, main, parse_overrides


def test_parse_overrides_forms():
    arguments = ["--config", "x.yaml", "--a", "1", "--b=2", "--resume", "--c", "3"]
    expected = {"a": "1", "b": "2", "resume": "true", "c": "3"}
    assert parse_overrides(arguments) == ("x.yaml", expected, False)


def test_cli_help_and_errors(capsys):
    assert main(["sft", "--help"]) == 0
    assert "--train.learning_rate" in capsys.readouterr().out
    assert main(["stf"]) == 2
    assert "did you mean 'sft'" in capsys.readouterr().err
    assert main(["sft", "--train.batch_size", "x"]) == 2
    assert "train.batch_size" in capsys.readouterr().err


def test_every_command_loads_with_help(capsys):
    for name in COMMANDS:
        assert main([name, "--help"]) == 0, name
    assert "options:" in capsys.readouterr().out
