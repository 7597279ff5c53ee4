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


def test_a_bare_boolean_flag_means_true():
    from prefalign.commands.dpo import DPOCommandConfig
    from prefalign.config import load_config

    _, overrides, wants_help = parse_overrides(["--gradient_checkpointing", "-h"])
    assert overrides == {"gradient_checkpointing": "true"} and wants_help  # was: "-h" taken as its value
    _, overrides, _ = parse_overrides(["--gradient_checkpointing", "--lora"])
    config = load_config(DPOCommandConfig, None, overrides, from_string=True)
    assert config.model.gradient_checkpointing is True and config.model.lora is True


def test_transformers_warnings_are_shown_but_known_noise_is_not():
    import logging

    from transformers.utils import logging as transformers_logging

    from prefalign.cli import KNOWN_NOISE, KnownNoise, _quiet_libraries

    _quiet_libraries()
    assert transformers_logging.get_verbosity() == logging.WARNING  # was: ERROR, every warning hidden
    library = transformers_logging.get_logger("transformers")
    assert any(isinstance(existing, KnownNoise) for existing in library.filters)

    def record(message):
        return logging.LogRecord("transformers.modeling_utils", logging.WARNING, "", 0, message, None, None)

    noise = next(iter(KNOWN_NOISE))
    assert not KnownNoise().filter(record(f"Some weights of X {noise}: ['score.weight']"))
    assert KnownNoise().filter(record("If you want to use `BertLMHeadModel` as a standalone, add is_decoder"))
