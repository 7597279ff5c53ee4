"""The run folder's rules: what a run writes there, and when a run may start, replace or resume in it.

- A new run starts in a missing or empty folder, or in one where nothing of a run's would be replaced (the
  iterative recipe writes a round's pairs.jsonl before that round's DPO run starts there). A finished or
  interrupted run is refused: `train.resume` continues it, `train.overwrite` starts it again.
- `train.overwrite` replaces only a folder that is a prefalign run, and only what the run wrote
  (`RUN_OUTPUTS`): files a user put there stay, and a folder that is not a run is never emptied.
- `train.resume` continues from the newest checkpoint with the config the run started with: only what
  cannot change a training step may differ (`RESUME_MAY_CHANGE`); config.yaml keeps the original values.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import yaml

from prefalign.config import TrainConfig
from prefalign.errors import ConfigError
from prefalign.files import STAGING_PREFIX, atomic_file, staging_prefix
from prefalign.runtime.checkpoint import CHECKPOINT_PREFIX, list_checkpoints

logger = logging.getLogger("prefalign")

CONFIG_FILE = "config.yaml"

# Everything a run writes at the top of its folder (names, or patterns for the iterative recipe's rounds),
# from runtime/setup, runtime/loop and the trainers: sft, dpo (+ dpo_pairs), the reward model, grpo and
# iterative DPO. Add a name here when a trainer writes a new file into the run folder.
RUN_OUTPUTS = (
    CONFIG_FILE,  # setup.prepare_run_dir
    "metrics.jsonl",  # runtime.metrics; iterative DPO's per-round records
    "checkpoints",  # runtime.checkpoint
    "final",  # every trainer's model folder
    "data_stats.json",  # every trainer
    "ref_logps.safetensors",  # dpo_pairs.precompute_reference
    "completions.jsonl",  # grpo
    "eval_reward.json",  # the reward model
    "report.md",  # iterative DPO
    "report",  # the figures and report.md every training command writes at the end (commands.report)
    "round-*",  # iterative DPO: each round's DPO run, pairs and sampling statistics
)

# Per-step logs: records past a resumed checkpoint's step are dropped, so each step appears once.
STEP_LOGS = ("metrics.jsonl", "completions.jsonl")

# The config keys a resumed run may change: none of them alters what a training step computes or in which
# order. Logging, checkpoint and eval cadence (evaluation is no-grad and draws from its own seeded
# generator), threads, the progress bar, trackers, a wall-clock limit (GRPO's max_time), and the folder
# itself (moved or copied). Any other change is refused, naming the keys.
RESUME_MAY_CHANGE = frozenset({
    "train.output_dir", "train.resume", "train.overwrite",
    "train.log_every", "train.save_every", "train.keep_checkpoints", "train.eval_every",
    "train.num_threads", "train.progress", "train.report_to",
    "max_time", "log_completions_every", "num_completions_to_log",  # GRPO and PPO
})  # fmt: skip

# Keys whose value means "fit at run time", the fitted value being written back to config.yaml (GRPO's
# max_new_tokens = 0: what the model's context leaves). On resume an unset key takes the run's fitted value.
RESOLVED_AT_RUN_TIME = {"max_new_tokens": 0}


def run_dir_for(train: TrainConfig, command: str) -> Path:
    return Path(train.output_dir or f"runs/{command}")


def stored_config(folder: Path) -> dict[str, Any] | None:
    """The folder's config.yaml when it is a resolved prefalign config (a mapping with a `train` section)."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("train"), dict) else None


def run_outputs(folder: Path) -> list[Path]:
    """What a run wrote in `folder` (RUN_OUTPUTS, the trackers' folder, staging leftovers of interrupted
    atomic writes); everything else in it belongs to the user."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stems = [name.split(".")[0] for name in RUN_OUTPUTS if "*" not in name]
    stored = stored_config(folder) or {}
    tracker = [folder.name] if stored.get("train", {}).get("report_to") else []  # accelerate: <run>/<name>
    return sorted(
        path for path in folder.iterdir()
        if any(fnmatch.fnmatch(path.name, pattern) for pattern in (*RUN_OUTPUTS, *tracker))
        or any(path.name.startswith(staging_prefix(stem)) for stem in stems)
    )  # fmt: skip


def is_run(folder: Path) -> bool:
    """A folder a prefalign run wrote: a resolved config.yaml, and next to it another thing a run writes
    (metrics.jsonl, checkpoints/, final/, ...) or nothing at all (a run stopped before its first step)."""
    folder = Path(folder)
    if stored_config(folder) is None:
        return False
    outputs = run_outputs(folder)
    return len(outputs) > 1 or not any(path.name != CONFIG_FILE for path in folder.iterdir())


def last_step(folder: Path) -> int:
    """The last optimizer step metrics.jsonl records (0 when none)."""
    steps = [record.get("step", 0) for record in read_log(Path(folder) / "metrics.jsonl")]
    return max((step for step in steps if isinstance(step, int)), default=0)


def read_log(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a log; a line torn by a kill mid-write is skipped."""
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _new_folder(command: str) -> str:
    """A run folder name that does not exist yet, to suggest in messages."""
    index = 2
    while Path(f"runs/{command}-{index}").exists():
        index += 1
    return f"runs/{command}-{index}"


def _listed(paths: list[Path], limit: int = 4) -> str:
    names = [path.name + ("/" if path.is_dir() else "") for path in paths[:limit]]
    return ", ".join(names) + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def check_new_run(folder: Path, command: str) -> None:
    """A new run may start in `folder` unless a run is there already or it holds files a run would
    replace."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    elsewhere = f"set train.output_dir to a new folder (e.g. {_new_folder(command)})"
    if is_run(folder):
        if (folder / "final").exists():
            raise ConfigError(
                f"run folder {str(folder)!r} already holds a finished run; {elsewhere}, or pass "
                "--train.overwrite true to replace it (files you added there are kept), or "
                "--train.resume true to see its result"
            )
        checkpoints = list_checkpoints(folder)
        if checkpoints or (folder / "metrics.jsonl").exists():
            kept = f"checkpoint step {_step_of(checkpoints[-1])}" if checkpoints else "no checkpoint"
            resume = "--train.resume true to continue it, " if checkpoints else ""
            raise ConfigError(
                f"run folder {str(folder)!r} holds an unfinished run (metrics up to step "
                f"{last_step(folder)}, {kept}): pass {resume}--train.overwrite true to start it again (files "
                f"you added there are kept), or {elsewhere}"
            )
        return
    clobbered = run_outputs(folder)
    if clobbered:
        raise ConfigError(
            f"{str(folder)!r} is not a prefalign run folder, but it holds {_listed(clobbered)}, which a run "
            f"would replace; {elsewhere}"
        )


def clear_run(folder: Path, command: str) -> None:
    """train.overwrite: remove what a previous run wrote in `folder`, keeping everything else; a folder that
    is not a run (and not empty) is refused, never emptied."""
    folder = Path(folder)
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    if not is_run(folder):
        entries = sorted(folder.iterdir())
        raise ConfigError(
            f"--train.overwrite: {str(folder.resolve())!r} is not a prefalign run folder (no config.yaml "
            f"written by a run, beside its metrics.jsonl, checkpoints/ or final/) and it holds "
            f"{_listed(entries)}: overwrite only replaces a run's own files, it never empties another "
            f"folder. Set train.output_dir to a new folder (e.g. {_new_folder(command)})"
        )
    outputs = run_outputs(folder)
    kept = [path for path in folder.iterdir() if path not in outputs]
    logger.warning(
        "--train.overwrite: replacing the run in %s (removed %s%s)", folder, _listed(outputs),
        f"; kept {_listed(sorted(kept))}" if kept else "",
    )
    for path in outputs:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _step_of(checkpoint: Path) -> int:
    return int(checkpoint.name[len(CHECKPOINT_PREFIX):])


def check_resume(config: Any, folder: Path) -> None:
    """train.resume: there is a checkpoint to resume from, and `config` trains as the run's config.yaml
    did (RESUME_MAY_CHANGE aside). Keys the run fitted at run time (RESOLVED_AT_RUN_TIME) and left unset
    in `config` take the run's values."""
    folder = Path(folder)
    checkpoints = list_checkpoints(folder)
    if not checkpoints:
        raise ConfigError(
            f"--train.resume: no checkpoint in {str(folder / 'checkpoints')!r}, so there is nothing to "
            "resume (checkpoints are written every train.save_every steps); run without --train.resume to "
            "start, or point train.output_dir at the run to continue"
        )
    stored = stored_config(folder)
    if stored is None:
        return
    for key, unset in RESOLVED_AT_RUN_TIME.items():
        if hasattr(config, key) and getattr(config, key) == unset and stored.get(key, unset) != unset:
            setattr(config, key, stored[key])
    changes = config_changes(stored, config)
    refused = [change for change in changes if change[0] not in RESUME_MAY_CHANGE]
    if refused:
        listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in refused)
        raise ConfigError(
            f"--train.resume: the config differs from the one the run in {str(folder)!r} started with, in "
            f"what changes training ({listed}). A resumed run must go on as it started: put these back (the "
            f"run's {CONFIG_FILE} holds them), or start a new run in another train.output_dir. Only "
            f"{', '.join(sorted(RESUME_MAY_CHANGE))} may change on resume."
        )
    if changes:
        logger.info(
            "resume: %s (config.yaml keeps the run's values)",
            "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changes),
        )


def config_changes(stored: dict[str, Any], config: Any) -> list[tuple[str, Any, Any]]:
    """(dotted key, stored value, value in `config`) for every leaf that differs; keys the stored config
    lacks (written by an older version) are not compared."""
    changes = []
    for key, value in _leaves(config):
        old: Any = stored
        for part in key.split("."):
            old = old.get(part, _MISSING) if isinstance(old, dict) else _MISSING
        new = yaml.safe_load(yaml.safe_dump(value))  # the form config.yaml holds it in (tuples as lists, ...)
        if old is not _MISSING and not _same(old, new):
            changes.append((key, old, new))
    return changes


_MISSING = object()


def _leaves(config: Any, prefix: str = ""):
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            yield from _leaves(value, f"{prefix}{field.name}.")
        else:
            yield f"{prefix}{field.name}", value


def _same(old: Any, new: Any) -> bool:
    if isinstance(old, float) and isinstance(new, float) and math.isnan(old) and math.isnan(new):
        return True
    return old == new


def trim_step_logs(folder: Path, step: int) -> None:
    """Drop the records past `step` (written after the checkpoint a run resumes from) from the step logs,
    and any line torn by a kill mid-write."""
    for name in STEP_LOGS:
        path = Path(folder) / name
        if not path.is_file():
            continue
        lines = path.read_text().splitlines()
        kept = [line for line in lines if _at_or_before(line, step)]
        if len(kept) < len(lines):
            logger.info("%s: dropped %d records past step %d", path, len(lines) - len(kept), step)
            with atomic_file(path) as staging:
                staging.write_text("".join(line + "\n" for line in kept))


def _at_or_before(line: str, step: int) -> bool:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return False
    recorded = record.get("step", 0) if isinstance(record, dict) else 0
    return not isinstance(recorded, int) or recorded <= step


def remove_interrupted_saves(folder: Path) -> None:
    """Remove the staging folders of checkpoints whose save was interrupted (kill -9 leaves them)."""
    checkpoints = Path(folder) / "checkpoints"
    leftovers = (
        [p for p in checkpoints.iterdir() if p.name.startswith(STAGING_PREFIX + CHECKPOINT_PREFIX)]
        if checkpoints.is_dir() else []
    )
    for path in leftovers:
        logger.info("removing %s, a checkpoint whose save was interrupted", path)
        shutil.rmtree(path) if path.is_dir() else path.unlink()
