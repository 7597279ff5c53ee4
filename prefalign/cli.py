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
import sys
import traceback
from dataclasses import dataclass

from prefalign.config import help_text, load_config
from prefalign.errors import PrefalignError


@dataclass(frozen=True)
class Command:
    module: str
    function: str
    config: str
    summary: str

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
    "env": Command("prefalign.commands.env", "env", "EnvConfig", "versions and hardware, for bug reports"),
}

USAGE = (
    "usage: prefalign <command> [--config FILE.yaml] [--key value ...]   (prefalign <command> "
    "--help lists every key)"
)


def parse_overrides(arguments: list[str]) -> tuple[str | None, dict[str, str], bool]:
    """--config path, {key: raw string}, and whether --help was asked. A bare --flag means true."""
    config_path, overrides, wants_help = None, {}, False
    index = 0
    while index < len(arguments):
        argument = arguments[index]
        if argument in ("-h", "--help"):
            wants_help = True
            index += 1
            continue
        if not argument.startswith("--"):
            raise PrefalignError(f"unexpected argument {argument!r}: options look like --key value. {USAGE}")
        key, has_value, value = argument[2:].partition("=")
        if not has_value:
            if index + 1 < len(arguments) and not arguments[index + 1].startswith("--"):
                value = arguments[index + 1]
                index += 1
            else:
                value = "true"
        if key == "config":
            config_path = value
        else:
            overrides[key] = value
        index += 1
    return config_path, overrides, wants_help


def _quiet_libraries() -> None:
    """Our own progress bar and log lines are enough; silence per-file loading bars of the libraries."""
    import os

    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()


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
        config_path, overrides, wants_help = parse_overrides(rest)
        if wants_help:
            print(f"prefalign {name}: {COMMANDS[name].summary}\n\noptions:\n{help_text(config_class)}")
            return 0
        config = load_config(config_class, config_path, overrides, from_string=True)
        function(config)
    except PrefalignError as error:
        print(f"prefalign {name}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"prefalign {name}: interrupted; checkpoints already written are whole", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 - not a user's mistake (those are PrefalignError): show everything
        traceback.print_exc()
        print(
            f"prefalign {name}: internal error: this is a bug in prefalign, not in your command. Please "
            "report it with the command line, the traceback above and the output of `prefalign env`.",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
