"""Rollout throughput: prefalign's LocalEngine against `model.generate` on the same model and prompts.

Both sample n completions per prompt at temperature 1 with no top-k / top-p, and both produce exactly
max_new_tokens per completion (`ignore_eos=True` here, `min_new_tokens=max_new_tokens` for transformers),
so the two count the same tokens. Reported: generated tokens per second (median of repeats), the ratio, and
each engine's model FLOP/s (2 x parameters per generated token; prefill not counted) as a fraction of this
CPU's fp32 matmul rate (torch.mm 2048x2048, same threads): the roofline that bounds any decode loop.

    python benchmarks/rollout.py                      # short task prompts only
    PREFALIGN_DATA_DIR=../shared/data python benchmarks/rollout.py   # plus GSM8K-length prompts
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from dpo_throughput import matmul_rate  # the same roofline measurement as the DPO benchmark
from transformers import LlamaConfig, LlamaForCausalLM

from prefalign.rollout.engine import LocalEngine
from prefalign.rollout.types import SamplingParams
from prefalign.tasks.tokenizer import build_char_tokenizer


def build_model(tokenizer) -> LlamaForCausalLM:
    """A ~1.7M-parameter Llama: the size of prefalign's built-in base model, with room for long prompts."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=192,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config).eval()


def render(tokenizer, contents: list[str]) -> list[list[int]]:
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)[
            "input_ids"
        ]
        for content in contents
    ]


def short_prompts(tokenizer, count: int) -> list[list[int]]:
    return render(tokenizer, [f"{(7 * index) % 100}+{(13 * index + 5) % 100}" for index in range(count)])


def gsm8k_prompts(tokenizer, count: int) -> list[list[int]] | None:
    data_dir = os.environ.get("PREFALIGN_DATA_DIR")
    if not data_dir:
        print("skipping GSM8K-length prompts: set PREFALIGN_DATA_DIR to the folder holding gsm8k/test.jsonl")
        return None
    path = Path(data_dir) / "gsm8k" / "test.jsonl"
    if not path.is_file():
        print(f"skipping GSM8K-length prompts: {path} not found")
        return None
    with path.open() as lines:
        questions = [json.loads(line)["question"] for line, _ in zip(lines, range(count), strict=False)]
    return render(tokenizer, questions)


def run_ours(engine: LocalEngine, prompts, n: int, max_new_tokens: int, seed: int) -> tuple[int, float]:
    params = SamplingParams(n=n, temperature=1.0, max_new_tokens=max_new_tokens, seed=seed, ignore_eos=True)
    start = time.perf_counter()
    results = engine.generate(prompts, params)
    seconds = time.perf_counter() - start
    return sum(len(sample.token_ids) for samples in results for sample in samples), seconds


def run_hf(model, tokenizer, prompts, n: int, max_new_tokens: int, seed: int) -> tuple[int, float]:
    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):  # left padding, as generate expects for decoder-only models
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt) :] = 1
    torch.manual_seed(seed)
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(
            input_ids,
            attention_mask=attention_mask,
            do_sample=True,
            num_return_sequences=n,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    seconds = time.perf_counter() - start
    # min_new_tokens = max_new_tokens: every row generates exactly max_new_tokens, no padding among them.
    return output.shape[0] * (output.shape[1] - width), seconds


def measure(model, tokenizer, engine, prompts, n: int, args) -> dict[str, float]:
    ours, theirs = [], []
    tokens = {}
    for repeat in range(args.repeats):  # interleaved, so load from other processes hits both alike
        tokens["ours"], seconds = run_ours(engine, prompts, n, args.max_new_tokens, seed=repeat)
        ours.append(seconds)
        tokens["hf"], seconds = run_hf(model, tokenizer, prompts, n, args.max_new_tokens, seed=repeat)
        theirs.append(seconds)
    if tokens["ours"] != tokens["hf"]:
        raise RuntimeError(f"token counts differ: ours {tokens['ours']}, transformers {tokens['hf']}")
    ours_rate = tokens["ours"] / statistics.median(ours)
    hf_rate = tokens["hf"] / statistics.median(theirs)
    return {"tokens": tokens["ours"], "ours": ours_rate, "hf": hf_rate, "ratio": ours_rate / hf_rate}


def print_table(
    title: str, prompts, rows: dict[int, dict[str, float]], flops_per_token: float, rate: float,
) -> None:
    lengths = [len(prompt) for prompt in prompts]
    print(
        f"\n{title}: {len(prompts)} prompts, {min(lengths)}-{max(lengths)} tokens (mean "
        f"{statistics.mean(lengths):.0f})"
    )
    print(f"{'n':>4} {'tokens':>7} {'prefalign tok/s':>16} {'transformers tok/s':>19} {'ratio':>6} "
          f"{'ours/mm':>8} {'theirs/mm':>10}")
    for n, row in rows.items():
        ours_share, theirs_share = (row[key] * flops_per_token / rate for key in ("ours", "hf"))
        print(
            f"{n:>4} {row['tokens']:>7} {row['ours']:>16.0f} {row['hf']:>19.0f} {row['ratio']:>5.2f}x "
            f"{ours_share:>8.2f} {theirs_share:>10.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--samples", type=int, nargs="+", default=[1, 4, 8, 16], help="values of n")
    parser.add_argument("--repeats", type=int, default=3)
    # One thread: on a shared 2-core machine, two OpenMP threads that lose their cores to other
    # processes stall each other at every barrier, and timings swing by 10x and more.
    parser.add_argument("--threads", type=int, default=1)
    # 256 = every row of the largest case (16 prompts x n = 16) in one batch, as model.generate runs them.
    parser.add_argument("--batch-size", type=int, default=256, help="LocalEngine batch_size (sequences)")
    parser.add_argument(
        "--profile", action="store_true", help="also profile one engine call at n = 8 on task prompts",
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    tokenizer = build_char_tokenizer()
    tokenizer.model_max_length = 1024  # GSM8K questions run past the default 256 characters
    model = build_model(tokenizer)
    engine = LocalEngine(model, tokenizer, batch_size=args.batch_size)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    # Per generated token the decode step multiplies by every weight matrix once (2 FLOPs per weight);
    # the input embedding is a lookup, not a matmul. Attention over the cache is left out (small here).
    flops_per_token = 2 * (parameters - model.get_input_embeddings().weight.numel())
    print(
        f"model: Llama, {parameters / 1e6:.2f}M parameters, fp32, {args.threads} threads; "
        f"{args.max_new_tokens} new tokens per sample; median of {args.repeats}; "
        f"LocalEngine batch_size={args.batch_size}"
    )

    prompt_sets = {"short task prompts": short_prompts(tokenizer, args.num_prompts)}
    long_prompts = gsm8k_prompts(tokenizer, args.num_prompts)
    if long_prompts is not None:
        prompt_sets["GSM8K questions"] = long_prompts

    run_ours(engine, prompt_sets["short task prompts"][:2], 2, 4, seed=0)  # warm-up: first calls are slow
    run_hf(model, tokenizer, prompt_sets["short task prompts"][:2], 2, 4, seed=0)
    rate = matmul_rate(args.threads)
    print(f"fp32 matmul rate (torch.mm 2048x2048, median): {rate / 1e9:.1f} GFLOP/s")
    for title, prompts in prompt_sets.items():
        rows = {n: measure(model, tokenizer, engine, prompts, n, args) for n in args.samples}
        print_table(title, prompts, rows, flops_per_token, rate)
    if args.profile:
        profile_engine(engine, prompt_sets["short task prompts"], args.max_new_tokens)


def profile_engine(engine: LocalEngine, prompts, max_new_tokens: int) -> None:
    """Where the engine's time goes at n = 8 on short prompts: matmuls against everything else."""
    from torch.profiler import ProfilerActivity, profile

    params = SamplingParams(n=8, temperature=1.0, max_new_tokens=max_new_tokens, seed=0, ignore_eos=True)
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        engine.generate(prompts, params)
    print("\nengine profile, short task prompts, n = 8 (self CPU time):")
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


if __name__ == "__main__":
    main()
