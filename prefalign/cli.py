"""`prefalign <command> [--config file.yaml] [--key value ...]`: a thin layer over the Python API.

Each command is a function taking its config dataclass; this file only parses arguments into that
config (the command checks it, prefalign.config.validate, before any work). Commands are imported lazily so
`prefalign env` and `--help` stay fast.

Exit codes: 0 done, 2 a mistake the message explains (a PrefalignError: no traceback), 130 interrupted, 1 an
unexpected error: that is a bug in prefalign, so its traceback is printed with a request for a bug report.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys
import traceback
from dataclasses import dataclass
from typing import Any

from prefalign.config import help_text, is_config, load_config, validate
from prefalign.errors import PrefalignError


@dataclass(frozen=True)
class Command:
    module: str
    function: str
    config: str
    summary: str
    positional: str = ""  # the config field (a list) that bare arguments fill: `prefalign report RUN RUN`

    def load(self):
        module = importlib.import_module(self.module)
        return getattr(module, self.function), getattr(module, self.config)


COMMANDS: dict[str, Command] = {
    "sft": Command(
        "prefalign.commands.sft", "sft", "SFTConfig", "supervised fine-tuning on prompt/completion data",
    ),
    "sample": Command(
        "prefalign.commands.sample", "sample", "SampleConfig",
        "rejection sampling: n samples per prompt, scored, as pairs or best-of-n",
    ),
    "base": Command(
        "prefalign.commands.base", "base", "BaseConfig",
        "build (or reuse) the built-in task's tiny base model",
    ),
    "dpo": Command(
        "prefalign.commands.dpo", "dpo", "DPOCommandConfig",
        "DPO and its family (IPO, cDPO, robust, hinge, SimPO, RPO) on preference pairs",
    ),
    "grpo": Command(
        "prefalign.commands.grpo", "grpo", "GRPOConfig",
        "GRPO (and Dr. GRPO, DAPO, GSPO): group-relative RL with reward functions and/or a reward model",
    ),
    "ppo": Command(
        "prefalign.commands.ppo", "ppo", "PPOConfig",
        "PPO with a learned critic (GAE, KL penalty to the reference, clipped updates); reward functions "
        "and/or a reward model",
    ),
    "eval": Command(
        "prefalign.commands.eval", "evaluate", "EvalConfig",
        "accuracy, pass@k and KL of a model on a prompt set",
    ),
    "reward": Command(
        "prefalign.commands.reward", "reward", "RewardConfig",
        "train a reward model on preference pairs (Bradley-Terry); --eval-only to evaluate one",
    ),
    "score": Command(
        "prefalign.commands.score", "score", "ScoreConfig",
        "score a file of completions (or pairs) with a reward model; writes a copy with reward columns",
    ),
    "eval-reward": Command(
        "prefalign.commands.reward", "eval_reward", "EvalRewardConfig",
        "pairwise accuracy (95% CI), margin and length correlation of a reward model",
    ),
    "demo": Command(
        "prefalign.commands.demo", "demo", "DemoConfig",
        "the whole stage on the built-in task, with a report",
    ),
    "report": Command(
        "prefalign.commands.report", "report", "ReportConfig",
        "figures and report.md from run folders: prefalign report RUN [RUN ...] (several runs overlaid)",
        positional="runs",
    ),
    "env": Command("prefalign.commands.env", "env", "EnvConfig", "versions and hardware, for bug reports"),
}

# Commands that train a model and end with a summary (prefalign.commands.summary).
TRAINING_COMMANDS = ("sft", "dpo", "reward", "grpo", "ppo")

# Commands that run in one process only, and why (under torchrun they refuse with this reason).
SINGLE_PROCESS = {
    "base": "it builds one small model on one device",
    "demo": "its stages are sized for one CPU process",
    "env": "it describes this machine",
}

USAGE = (
    "usage: prefalign <command> [--config FILE.yaml] [--key value ...]   (prefalign <command> "
    "--help lists every key)"
)


def parse_overrides(arguments: list[str], positional: str = "") -> tuple[str | None, dict[str, Any], bool]:
    """--config path, {key: raw string}, and whether --help was asked. A bare --flag (last, or followed by
    another option or -h) means true: `prefalign dpo --gradient_checkpointing` turns checkpointing on. With
    `positional` (a list field), bare arguments are its values: `prefalign report a b` = `--runs [a, b]`."""
    config_path, overrides, wants_help = None, {}, False
    bare: list[str] = []
    index = 0
    while index < len(arguments):
        argument = arguments[index]
        if argument in ("-h", "--help"):
            wants_help = True
            index += 1
            continue
        if not argument.startswith("--") and positional:
            bare.append(argument)
            index += 1
            continue
        if not argument.startswith("--"):
            raise PrefalignError(f"unexpected argument {argument!r}: options look like --key value. {USAGE}")
        key, has_value, value = argument[2:].partition("=")
        if not has_value:
            following = arguments[index + 1] if index + 1 < len(arguments) else None
            if following is not None and not following.startswith("--") and following != "-h":
                value = arguments[index + 1]
                index += 1
            else:
                value = "true"
        if key == "config":
            config_path = value
        else:
            overrides[key] = value
        index += 1
    if bare and positional in overrides:
        raise PrefalignError(f"give the {positional} as arguments or with --{positional}, not both")
    if bare:
        overrides[positional] = bare
    return config_path, overrides, wants_help


# transformers' messages that say nothing a prefalign user can act on (each: why it is noise here). Every
# other warning of transformers is shown: it may be the only sign that a user's model loaded wrong.
KNOWN_NOISE: dict[str, str] = {
    # A reward model or critic gets a fresh score head on purpose (prefalign reward says so itself).
    "were not initialized from the model checkpoint": "the score head a reward model is given on purpose",
    "You should probably TRAIN this model": "the same message's second half",
    # Gradient checkpointing turns the KV cache off itself (models.loading.prepare_model).
    "is incompatible with gradient checkpointing": "prefalign sets use_cache=False with checkpointing",
    # Generation is prefalign's own engine; transformers' generate defaults do not apply.
    "Setting `pad_token_id` to `eos_token_id`": "padding is masked; prefalign's engine does not use generate",
}

# Python warnings (warnings.warn) known to be noise: deprecations inside the libraries' own calls to each
# other (peft asks transformers for `is_gradient_checkpointing`), which a user cannot act on.
KNOWN_WARNINGS: dict[str, str] = {
    "`is_gradient_checkpointing` is deprecated": "peft's call into transformers, not the user's",
    "`gradient_checkpointing_enable` is deprecated": "the name transformers 5 still supports; renamed in v6",
}


class KnownNoise(logging.Filter):
    """Drops the transformers messages listed in KNOWN_NOISE."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(pattern in message for pattern in KNOWN_NOISE)


def _quiet_libraries() -> None:
    """Our own progress bar and log lines are enough: silence the libraries' per-file loading bars and the
    transformers messages known to be noise (KNOWN_NOISE); its other warnings are shown."""
    import os
    import warnings

    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    for pattern in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=f".*{re.escape(pattern)}")
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    disable_progress_bars()
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_warning()
    library_logger = transformers_logging.get_logger("transformers")
    for target in (library_logger, *library_logger.handlers):
        if not any(isinstance(existing, KnownNoise) for existing in target.filters):
            target.addFilter(KnownNoise())


def section_notes(config_class: type) -> str:
    """Each section's own help (model, data, train, ...): where its defaults come from, for --help."""
    import dataclasses

    defaults = config_class()
    return "\n".join(
        f"  {field.name}: {field.metadata['help']}" for field in dataclasses.fields(config_class)
        if field.metadata.get("help") and is_config(getattr(defaults, field.name))
    )


def main(argv: list[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if not arguments or arguments[0] in ("-h", "--help", "help"):
        print(USAGE + "\n\ncommands:")
        for name, command in COMMANDS.items():
            print(f"  {name:<12} {command.summary}")
        return 0
    name, rest = arguments[0], arguments[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=1)
        print(
            f"prefalign: unknown command {name!r}" + (f"; did you mean {close[0]!r}?" if close else "")
            + f"\n{USAGE}",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    try:
        function, config_class = COMMANDS[name].load()
        config_path, overrides, wants_help = parse_overrides(rest, COMMANDS[name].positional)
        if name in TRAINING_COMMANDS:  # --report: not a config key (prefalign.commands.report)
            from prefalign.commands.report import REPORT_HELP, report_option, write_run_report

            wants_report = report_option(overrides)
        if wants_help:
            extra = f"\n{REPORT_HELP}" if name in TRAINING_COMMANDS else ""
            print(
                f"prefalign {name}: {COMMANDS[name].summary}\n\nsections:\n{section_notes(config_class)}\n\n"
                f"options:\n{help_text(config_class)}{extra}"
            )
            return 0
        config = validate(load_config(config_class, config_path, overrides, from_string=True))
        from prefalign.runtime import distributed

        if name in SINGLE_PROCESS:
            distributed.refuse(name, SINGLE_PROCESS[name])
        # Every rank has checked its config before the process group starts (a launcher's processes).
        distributed.start()
        result = function(config)
        if (
            name in TRAINING_COMMANDS and hasattr(result, "run_dir") and hasattr(result, "metrics")
            and distributed.is_main_process()
        ):
            from prefalign.commands.summary import training_summary

            print(training_summary(name, result), flush=True)
            if wants_report:
                write_run_report(result.run_dir)
    except PrefalignError as error:
        if _speaks():
            print(f"prefalign {name}: error{_rank_tag()}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"prefalign {name}: interrupted; checkpoints already written are whole", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 - not a user's mistake (those are PrefalignError): show everything
        traceback.print_exc()
        print(
            f"prefalign {name}: internal error{_rank_tag()}: this is a bug in prefalign, not in your "
            "command. Please report it with the command line, the traceback above and the output of "
            "`prefalign env`.",
            file=sys.stderr,
        )
        return 1
    finally:
        if "prefalign.runtime.distributed" in sys.modules:
            sys.modules["prefalign.runtime.distributed"].stop()
    return 0


def _speaks() -> bool:
    """Whether this process prints an error: every process under a running process group (an error may be
    one rank's own), only the launcher's rank 0 before it starts (every rank checks the same config)."""
    return _process_group() is not None or os.environ.get("RANK", "0") == "0"


def _rank_tag() -> str:
    group = _process_group()
    return f" (process {group[0]} of {group[1]})" if group else ""


def _process_group() -> tuple[int, int] | None:
    """(rank, world size) while a process group runs, else None (without importing torch for `--help`)."""
    distributed = sys.modules.get("prefalign.runtime.distributed")
    if distributed is None or distributed.world_size() == 1:
        return None
    return distributed.rank(), distributed.world_size()


if __name__ == "__main__":
    sys.exit(main())
