"""`prefalign score --model DIR --data FILE`: a copy of the data with reward-model scores.

Prompt/completion rows get a `reward` column; preference rows (chosen/rejected, explicit or implicit prompt)
get `reward_chosen` and `reward_rejected`. Every original column is kept.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefalign.config import validate
from prefalign.errors import ConfigError
from prefalign.files import atomic_file, writing
from prefalign.options import check_device, option
from prefalign.rewards.scorer import RewardModelScorer


@dataclass
class ScoreConfig:
    model: str = option(
        "runs/reward/final",
        "Reward-model folder: the final/ folder of `prefalign reward`, or any one-label sequence classifier.",
    )
    data: str = option(
        "",
        "File to score (JSONL/JSON/Parquet/CSV or a save_to_disk folder): prompt/completion rows get a "
        "`reward` column, preference rows `reward_chosen` and `reward_rejected`.",
    )
    columns: dict[str, str] = option(
        help="Rename source columns to ours, e.g. {question: prompt, answer: completion}.", factory=dict,
    )
    output: str = option(
        "",
        "Where the scored copy is written (.jsonl, .json, .parquet or .csv); empty = "
        "runs/score/<data name>.scored.jsonl.",
    )
    batch_size: int = option(64, "Sequences per forward pass.", low=1)
    device: str = option(
        "auto", "Where the model runs; auto = cuda when it is available, else cpu.", check=check_device,
    )
    normalize: bool = option(False, "Write (score - mean) / std with the training data's statistics.")
    num_threads: int = option(0, "torch CPU threads (0 = torch's default).", low=0)


def score(config: ScoreConfig) -> Path:
    """`prefalign score`: write a copy of the data with reward column(s); returns the output path."""
    from prefalign.data import load_rows, normalize_preference, normalize_sft
    from prefalign.data.sources import visible_columns
    from prefalign.runtime import distributed
    from prefalign.runtime.setup import set_threads

    validate(config)
    set_threads(config.num_threads)
    if not config.data:
        raise ConfigError("score needs --data FILE (the rows to score)")
    path = output_path(config)
    rows = load_rows([config.data], columns=config.columns)
    scorer = RewardModelScorer(
        config.model, batch_size=config.batch_size, device=config.device, normalize=config.normalize,
    )
    names = visible_columns(rows)
    output = rows.select_columns(names)
    if "chosen" in names or "rejected" in names:
        pairs = normalize_preference(rows)
        prompts = [row["prompt"] for row in pairs]
        output = output.add_column(
            "reward_chosen", distributed.map_shards(scorer.score, prompts, [row["chosen"] for row in pairs]),
        )
        output = output.add_column(
            "reward_rejected",
            distributed.map_shards(scorer.score, prompts, [row["rejected"] for row in pairs]),
        )
    else:
        singles = normalize_sft(rows)
        output = output.add_column(
            "reward",
            distributed.map_shards(
                scorer.score, [row["prompt"] for row in singles], [row["completion"] for row in singles],
            ),
        )
    if distributed.is_main_process():
        _write_rows(output, path)
        print(f"scored {len(output)} rows with {config.model}: {path}")
    return path


def output_path(config: ScoreConfig) -> Path:
    """Where the scored copy goes, checked before anything is loaded: a known format, and never the input
    itself (the scored copy must not replace the rows it was made from)."""
    path = Path(
        config.output or f"runs/score/{Path(config.data.rstrip('/')).name.split('.')[0]}.scored.jsonl"
    )
    if not path.name.lower().endswith((".parquet", ".csv", ".json", ".jsonl")):
        raise ConfigError(f"score: output {str(path)!r} must end in .jsonl, .json, .parquet or .csv")
    data = Path(config.data)
    if path.resolve() == data.resolve() or (path.is_file() and data.is_file() and path.samefile(data)):
        raise ConfigError(
            f"score: --output {config.output!r} is the input file {config.data!r}; the scored copy must not "
            f"replace the data it scores: choose another --output (e.g. {_beside(path)!r}), or leave it "
            "empty for runs/score/<data name>.scored.jsonl"
        )
    return path


def _beside(path: Path) -> str:
    return str(path.with_name(f"{path.name.split('.')[0]}-scored{path.suffix}"))


def _write_rows(dataset: Any, path: Path) -> None:
    """The scored copy, written atomically (a crash leaves no half-written file where the output goes)."""
    name = path.name.lower()
    with writing(path, "choose another --output"), atomic_file(path) as staging:
        if name.endswith(".parquet"):
            dataset.to_parquet(str(staging))
        elif name.endswith(".csv"):
            dataset.to_csv(str(staging), index=False)
        elif name.endswith(".json"):
            staging.write_text(json.dumps(dataset.to_list(), indent=1))
        else:
            with staging.open("w") as handle:
                for record in dataset.to_list():
                    handle.write(json.dumps(record) + "\n")
