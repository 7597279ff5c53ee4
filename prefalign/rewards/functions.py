"""The registry of reward functions, their weighted combination, and scoring of sample groups.

A reward function (or any scorer, such as a reward model) is a callable with TRL's signature,
`fn(prompts, completions, **columns) -> list[float | None]`. Rules every caller relies on:

- None means "not applicable to this sample": it is left out of the weighted sum, as in TRL. A sample
  where every scorer returned None has no score (it is counted, never scored 0).
- A scorer that raises, returns NaN / inf, or returns something that is not a number fails for that
  sample only: the failure names the scorer, the prompt index and the reason, the sample gets no score,
  and the other samples keep theirs. When a call over the whole batch raises, the scorer is called again
  one sample at a time to find which samples fail.
- A scorer only receives the columns its signature names (all of them when it takes `**kwargs`), so a
  plain `fn(prompts, completions, answer)` works next to TRL-style functions.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from prefalign.errors import ConfigError
from prefalign.tasks.arithmetic import exact_match_reward

RewardFunction = Callable[..., list]

logger = logging.getLogger("prefalign")

REWARD_FUNCTIONS: dict[str, RewardFunction] = {"exact_match": exact_match_reward}


def register_reward_function(name: str, function: RewardFunction) -> None:
    REWARD_FUNCTIONS[name] = function


def get_reward_function(name: str) -> RewardFunction:
    if name in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[name]
    # 'reward_model:<folder>': a reward model's score (rewards/scorer.py)
    if name.startswith("reward_model:"):
        from prefalign.rewards.scorer import reward_model_function

        return reward_model_function(name.partition(":")[2])
    if ":" in name:
        return _import_function(name)
    raise ConfigError(
        f"unknown reward function {name!r}: use one of {sorted(REWARD_FUNCTIONS)} or an "
        "import path 'module:function'"
    )


def _import_function(name: str) -> RewardFunction:
    """'module:function' (or 'module:Class.method'), the module looked up as `python -m` does: the current
    folder first, then sys.path. Importing a module runs its code, as any import does."""
    module_name, _, attribute = name.partition(":")
    here = os.getcwd()
    added = here not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, here)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and module_name.split(".")[0] != error.name.split(".")[0]:
            raise ConfigError(
                f"reward function {name!r}: importing module {module_name!r} failed: {error}"
            ) from error
        tried = [here] + [path or here for path in sys.path if (path or here) != here]
        shown = ", ".join(tried[:6]) + (f" and {len(tried) - 6} more" if len(tried) > 6 else "")
        raise ConfigError(
            f"reward function {name!r}: no module {module_name!r} was found; looked in the current folder "
            f"and sys.path: {shown}. Run from the folder that holds {module_name.split('.')[0]}.py, or add "
            "its folder to PYTHONPATH."
        ) from error
    except Exception as error:  # noqa: BLE001 - the module's own code failed while importing
        raise ConfigError(
            f"reward function {name!r}: importing module {module_name!r} raised "
            f"{type(error).__name__}: {error}"
        ) from error
    finally:
        if added and here in sys.path:
            sys.path.remove(here)
    function: Any = module
    try:
        for part in attribute.split("."):
            function = getattr(function, part)
    except AttributeError as error:
        where = getattr(module, "__file__", module_name)
        raise ConfigError(
            f"reward function {name!r}: module {module_name!r} ({where}) has no {attribute!r}"
        ) from error
    if not callable(function):
        raise ConfigError(
            f"reward function {name!r}: {attribute!r} is a {type(function).__name__}, not callable"
        )
    return function


@dataclass
class RewardFailure:
    """A sample whose reward could not be computed: it is dropped and counted, never scored 0."""

    function: str
    prompt_index: int  # the prompt's row (for a flat call: the position in the call)
    reason: str
    sample_index: int | None = None  # which of that prompt's samples, when scoring groups

    def describe(self) -> str:
        sample = f", sample {self.sample_index}" if self.sample_index is not None else ""
        return f"reward function {self.function!r} on prompt {self.prompt_index}{sample}: {self.reason}"


def describe_failures(failures: Sequence[RewardFailure], limit: int = 5) -> str:
    """'3 samples failed: <first few>' for logs and error messages."""
    shown = "; ".join(failure.describe() for failure in failures[:limit])
    more = f"; and {len(failures) - limit} more" if len(failures) > limit else ""
    return f"{len(failures)} reward failure(s) (samples dropped, not scored 0): {shown}{more}"


@dataclass
class GroupScores:
    """Scores of n samples per prompt. Every list is indexed [prompt][sample]."""

    # weighted total; None = no score (failed, or every scorer returned None)
    scores: list[list[float | None]]
    per_function: dict[str, list[list[float | None]]]
    failures: list[RewardFailure]
    failed: list[list[bool]]  # True where a scorer failed on that sample


@dataclass
class RewardState:
    """What reward functions receive as `trainer_state`, as TRL passes its `transformers.TrainerState`: the
    fields reward shaping reads (GRPO keeps `global_step` current)."""

    global_step: int = 0
    max_steps: int = 0
    epoch: float = 0.0


# Arguments TRL's GRPOTrainer passes a reward function besides the data's columns. prompts, completions and
# (where tokens exist) completion_ids are passed here as they are; trainer_state is a RewardState.
TRL_ARGUMENTS = ("prompts", "completions", "completion_ids", "trainer_state")


@dataclass
class WeightedRewards:
    """Several scorers combined with weights; None results are left out of the sum (as in TRL).

    `names` holds registry names, import paths 'module:function', or the callables themselves (a reward
    model scorer, say); a callable is named by its `name` attribute, else its `__name__`, else its class.
    Per-function scores (and metrics `rewards/<name>/mean`) use a short name trackers will not nest: a
    function's own name (`fn` for 'my_rewards:fn'), `reward_model` for a reward model, unique (`_2`, ...).
    Failures and warnings name a scorer in full (`labels`).
    """

    names: list[Any]
    weights: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.names:
            raise ConfigError("at least one reward function is needed (reward_functions)")
        if not self.weights:
            self.weights = [1.0] * len(self.names)
        if len(self.weights) != len(self.names):
            raise ConfigError(
                f"reward_weights has {len(self.weights)} values for {len(self.names)} reward functions"
            )
        bad = [weight for weight in self.weights if not _is_finite_number(weight)]
        if bad:
            raise ConfigError(
                f"reward_weights must be finite numbers, got {bad[0]!r} in {list(self.weights)}"
            )
        self.functions = [get_reward_function(name) if isinstance(name, str) else name for name in self.names]
        labels = [name if isinstance(name, str) else _callable_name(name) for name in self.names]
        self.labels = _unique(labels)
        self.names = _unique([_metric_name(label) for label in self.labels])
        self.trainer_state = RewardState()
        self._warned_empty: set[str] = set()

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Sequence[Any]):
        """-> (total: list[float | None], per_function: dict[name, list[float | None]], failures).

        total is None where every function returned None or any function failed for that sample.
        """
        per_function: dict[str, list[float | None]] = {}
        failures: list[RewardFailure] = []
        extras = {"trainer_state": self.trainer_state}
        for name, label, function in zip(self.names, self.labels, self.functions, strict=True):
            per_function[name] = _call_one(label, function, prompts, completions, columns, extras, failures)
            if completions and all(value is None for value in per_function[name]):
                failed_here = sum(failure.function == label for failure in failures)
                if not failed_here and name not in self._warned_empty:
                    self._warned_empty.add(name)
                    logger.warning(
                        "reward function %r returned None (not applicable) for all %d samples: it scored "
                        "nothing, so its metric rewards/%s/mean is left out", label, len(completions), name,
                    )
        failed = {failure.prompt_index for failure in failures}
        total: list[float | None] = []
        for index in range(len(completions)):
            parts = [(w, per_function[n][index]) for n, w in zip(self.names, self.weights, strict=True)]
            present = [(w, v) for w, v in parts if v is not None]
            total.append(None if index in failed or not present else sum(w * v for w, v in present))
        return total, per_function, failures

    def score_groups(
        self,
        prompts: Sequence[Any],
        groups: Sequence[Sequence[Any]],
        columns: dict[str, Sequence[Any]] | None = None,
        sample_columns: dict[str, Sequence[Sequence[Any]]] | None = None,
    ) -> GroupScores:
        """Score n completions per prompt in one call per scorer.

        prompts: one per group; groups[i]: prompt i's completions; columns: one value per prompt (such as
        `answer`), repeated for each of its completions; sample_columns: one value per completion, indexed
        [prompt][sample] (such as `completion_ids`). Failures name the prompt and sample index.
        """
        columns = columns or {}
        owner = [
            (group_index, sample_index)
            for group_index, group in enumerate(groups)
            for sample_index in range(len(group))
        ]
        flat_prompts = [prompts[group_index] for group_index, _ in owner]
        flat_completions = [completion for group in groups for completion in group]
        flat_columns = {
            name: [values[group_index] for group_index, _ in owner] for name, values in columns.items()
        }
        for name, values in (sample_columns or {}).items():
            flat_columns[name] = [values[group_index][sample_index] for group_index, sample_index in owner]
        total, per_function, failures = self(flat_prompts, flat_completions, **flat_columns)
        failed_flat = {failure.prompt_index for failure in failures}
        for failure in failures:  # flat position -> (prompt, sample)
            failure.prompt_index, failure.sample_index = owner[failure.prompt_index]
        offsets = [0]
        for group in groups:
            offsets.append(offsets[-1] + len(group))

        def regroup(values: Sequence[Any]) -> list[list[Any]]:
            return [list(values[offsets[i] : offsets[i + 1]]) for i in range(len(groups))]

        return GroupScores(
            scores=regroup(total),
            per_function={name: regroup(values) for name, values in per_function.items()},
            failures=failures,
            failed=regroup([index in failed_flat for index in range(len(flat_completions))]),
        )


def _callable_name(function: Any) -> str:
    return getattr(function, "name", None) or getattr(function, "__name__", None) or type(function).__name__


def _metric_name(label: str) -> str:
    """A short name with no '/' or ':' (trackers nest metrics on '/'): 'reward_model:runs/rm/final' ->
    'reward_model', 'my_rewards:fn' -> 'fn', 'pkg.mod:Class.method' -> 'method'."""
    if label.startswith("reward_model:") or label == "reward_model":
        return "reward_model"
    short = label.rpartition(":")[2].rpartition(".")[2] if ":" in label else label
    short = re.sub(r"[/:\\\s]+", "_", short).strip("_")
    return short or "reward"


def _unique(names: list[str]) -> list[str]:
    """Names as given, a repeat suffixed `_2`, `_3`, ...: per-function scores (and metrics) are keyed by name,
    so two scorers sharing one (two lambdas, two reward models) would otherwise overwrite each other."""
    unique: list[str] = []
    for name in names:
        candidate, count = name, 1
        while candidate in unique:
            count += 1
            candidate = f"{name}_{count}"
        unique.append(candidate)
    return unique


def _accepted_columns(function: Any, columns: dict[str, Sequence[Any]]) -> dict[str, Sequence[Any]]:
    """The columns `function` declares, or all of them when it takes **kwargs (or hides its signature)."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return columns
    if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters):
        return columns
    names = {parameter.name for parameter in parameters}
    return {name: values for name, values in columns.items() if name in names}


def _check_arguments(name: str, function: Any, given: list[str]) -> None:
    """A parameter the function requires and no one passes fails on every sample: say so once, up front."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    required = [p.name for p in parameters if p.kind in kinds and p.default is inspect.Parameter.empty]
    missing = [parameter for parameter in required if parameter not in given]
    if missing:
        raise ConfigError(
            f"reward function {name!r} requires argument(s) {', '.join(map(repr, missing))}, which are not "
            f"passed; it is called with keyword arguments {', '.join(given)} (TRL's names, plus the data's "
            "columns). Add the missing column(s) to the data, or give the parameter(s) a default."
        )


def _call_one(name, function, prompts, completions, columns, extras, failures) -> list[float | None]:
    _check_arguments(name, function, ["prompts", "completions", *columns, *extras])
    columns = _accepted_columns(function, columns)
    extras = _accepted_columns(function, extras)
    try:
        returned = function(prompts=list(prompts), completions=list(completions), **columns, **extras)
        if returned is None or isinstance(returned, (str, bytes, dict)) or not hasattr(returned, "__len__"):
            raise ConfigError(
                f"reward function {name!r} returned {_short(returned)}; it must return a list with one value "
                "(a number, or None for 'not applicable') per completion"
            )
        values = list(returned)
        if len(values) != len(completions):
            raise ConfigError(
                f"reward function {name!r} returned {len(values)} values for {len(completions)} completions; "
                "it must return one value (or None) per completion"
            )
    except ConfigError:
        raise
    except Exception:  # noqa: BLE001 - a user's function failing is reported, not fatal
        # Call it once per sample to find which ones fail; the others keep their rewards.
        values = [
            _call_single(name, function, prompts, completions, columns, extras, i, failures)
            for i in range(len(completions))
        ]
    cleaned: list[float | None] = []
    already_failed = {failure.prompt_index for failure in failures if failure.function == name}
    for index, value in enumerate(values):
        if index in already_failed:
            cleaned.append(None)
        elif value is not None and not _is_finite_number(value):
            failures.append(RewardFailure(name, index, f"returned {value!r}, not a finite number"))
            cleaned.append(None)
        else:
            cleaned.append(None if value is None else float(value))
    return cleaned


def _is_finite_number(value: Any) -> bool:
    """A number (bools count as 0/1; numpy and 0-d torch scalars too), not NaN or inf; never a string."""
    if isinstance(value, (str, bytes)):
        return False
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _call_single(name, function, prompts, completions, columns, extras, index, failures):
    try:
        single = {key: [value[index]] for key, value in columns.items()}
        one = {"prompts": [prompts[index]], "completions": [completions[index]]}
        values = list(function(**one, **single, **extras))
        if len(values) != 1:
            raise ValueError(f"returned {len(values)} values for 1 completion")
        return values[0]
    except Exception as error:  # noqa: BLE001
        failures.append(RewardFailure(name, index, f"raised {type(error).__name__}: {error}"))
        return None


def as_completion(prompt: Any, text: str) -> Any:
    """What a reward function receives as a completion: an assistant turn for a conversational prompt (a list
    of messages), as TRL's formats and the chat templates expect, else the plain text."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def build_scorers(
    functions: Sequence[Any],
    weights: Sequence[float],
    *,
    reward_model: str | None = None,
    reward_model_weight: float = 1.0,
    device: str = "auto",
    batch_size: int = 64,
    needed_by: str = "this command",
) -> WeightedRewards:
    """The weighted scorers of a config: reward functions (names or callables), plus a reward model folder
    (`builtin`-style names resolved) scored by `RewardModelScorer`, whose NaN/inf scores come back as
    per-sample failures. One weight per function; empty weights = all 1."""
    check_rewards(functions, weights, reward_model, needed_by)
    scorers = list(functions)
    weights = list(weights) or [1.0] * len(scorers)
    if reward_model:
        # Imported here: the scorer pulls in transformers, wanted only when a reward model is asked for.
        from prefalign.models.loading import resolve_model_path
        from prefalign.rewards.scorer import reward_model_function

        scorers.append(
            reward_model_function(resolve_model_path(reward_model), device=device, batch_size=batch_size)
        )
        weights.append(reward_model_weight)
    return WeightedRewards(scorers, weights)


def check_rewards(
    functions: Sequence[Any], weights: Sequence[float], reward_model: str | None, needed_by: str,
    prefix: str = "",
) -> None:
    """What build_scorers refuses, checked by the configs before anything loads: no reward at all, or a
    weight count that does not match the functions."""
    if weights and len(weights) != len(functions):
        raise ConfigError(
            f"{prefix}reward_weights has {len(weights)} values for {len(functions)} reward functions; give "
            "one weight per function"
        )
    if not functions and not reward_model:
        raise ConfigError(
            f"{needed_by} needs a reward: set {prefix}reward_functions and/or {prefix}reward_model"
        )
    for function in functions:
        if isinstance(function, str) and not function.startswith("reward_model:"):
            try:
                get_reward_function(function)  # an unknown name or a failed import, said before any work
            except ConfigError as error:
                raise ConfigError(f"{prefix}reward_functions: {error}") from None
