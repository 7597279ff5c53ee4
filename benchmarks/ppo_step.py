"""Wall time per PPO update (one rollout batch and its PPO epochs) and per optimizer step: prefalign's `ppo`
against TRL's `PPOTrainer` (trl.experimental.ppo).

Same tiny Llama policy (about 4M parameters, char tokenizer with a chat template), the same built-in task
prompts with the same token ids (tokenized by prefalign's chat-template path, handed to TRL as input_ids),
the same reward model (a one-label LlamaForSequenceClassification of the policy's size, in a folder; it also
initialises both critics: prefalign's default, and TRL's value_model is loaded from it), the same batch of
completions per update, fixed completion length (TRL's default stop_token=None never stops; prefalign
samples with ignore_eos, patched in here, so both score and train exactly --response-length tokens), PPO
epochs, one minibatch, learning rate 1e-5, temperature 1, fp32 on CPU. Each tool runs in its own subprocess
with one torch thread, alternating, `--repeats` times; the first `--warmup` updates of each run are left
out and medians are reported.

Two comparisons:
  defaults  each tool as a user gets it, with only the shared settings above set (TRL's PPOConfig says
            gradient_checkpointing=True; the worker reports whether the policy actually ran with it);
  matched   the same, but TRL with gradient_checkpointing=False.

One "update" = sample + score (reward model, reference, old log-probs, values, GAE) + --epochs optimizer
steps; "per opt step" = update / --epochs. prefalign's times come from its metrics (step_time per optimizer
step, the rollout's time shared among the steps of its phase; summed here per phase); TRL's between its
on_step_end callbacks (it calls no on_step_begin), with the rollout ending at the policy's first forward
with gradients (the model object is ours; its forward is wrapped to timestamp that).

TRL 1.16 no longer ships PPO (trl.experimental.ppo is in 1.0.0, gone by 1.16); put an older TRL on the TRL
workers' path only, without touching the environment:

    python -m pip install --no-deps --target /tmp/trl-ppo "trl==1.0.0"
    python benchmarks/ppo_step.py --trl-path /tmp/trl-ppo              # 32 completions x 32 tokens, 4 epochs
    python benchmarks/ppo_step.py --trl-path /tmp/trl-ppo --repeats 3 --updates 6
    python benchmarks/ppo_step.py --jobs prefalign,prefalign-unshared --repeats 4   # share_prompt A/B

`--jobs` picks the tools (alternating in that order each repeat); `prefalign-unshared` is prefalign with
share_prompt=False (PPO has one completion per prompt: there is no prompt to share). Peak RSS is each
worker process's maximum resident set (policy, reference, reward model and critic all loaded).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dpo_throughput import build_model  # the same random Llama as the DPO and GRPO benchmarks

HERE = Path(__file__).resolve()
JOBS = ["prefalign", "trl-defaults", "trl-matched", "prefalign-unshared"]


# ----------------------------------------------------------------------------- shared set-up (parent)


def build_reward_model(folder: Path, policy_folder: Path) -> None:
    """A random one-label LlamaForSequenceClassification of the policy's size, with its tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig.from_pretrained(policy_folder)
    config.num_labels, config.architectures = 1, None
    torch.manual_seed(1)
    LlamaForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(policy_folder).save_pretrained(folder)


def prompt_rows(count: int) -> list[dict]:
    from prefalign.tasks.arithmetic import prompt_dataset

    return prompt_dataset("train", limit=count).to_list()  # {"prompt": [user message], "answer": "68"}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ----------------------------------------------------------------------------- workers (one per subprocess)


def worker_prefalign(args, share_prompt: bool = True) -> dict:
    import dataclasses

    import datasets
    import torch

    import prefalign.algorithms.ppo as ppo_module
    from prefalign import PPOConfig, ppo
    from prefalign.config import DataConfig, ModelConfig, TrainConfig

    torch.set_num_threads(args.threads)
    fixed_length = ppo_module.SamplingParams

    def sampling_params(**keywords):  # generate exactly max_new_tokens, as TRL's stop_token=None does
        return dataclasses.replace(fixed_length(**keywords), ignore_eos=True)

    ppo_module.SamplingParams = sampling_params
    updates = args.warmup + args.updates
    config = PPOConfig(
        model=ModelConfig(name_or_path=args.model, device="cpu", dtype="float32"),
        data=DataConfig(max_length=1024),
        train=TrainConfig(
            output_dir=args.out, overwrite=True, learning_rate=1e-5, batch_size=args.batch,
            max_steps=updates * args.epochs, schedule="constant", progress=False, seed=args.seed,
        ),
        reward_functions=[], reward_model=args.reward_model, max_new_tokens=args.response_length,
        num_iterations=args.epochs, steps_per_generation=1, temperature=1.0, missing_eos_penalty=None,
        log_completions_every=0, share_prompt=share_prompt,
    )  # fmt: skip
    rows = datasets.Dataset.from_list(prompt_rows(args.batch * updates))
    result = ppo(config, dataset=rows, save=False)
    steps = [m for m in result.metrics if "step_time" in m]
    if len(steps) != updates * args.epochs:
        raise RuntimeError(f"expected {updates * args.epochs} optimizer steps, got {len(steps)}")
    phases = [steps[i : i + args.epochs] for i in range(0, len(steps), args.epochs)]
    update_time = [sum(m["step_time"] for m in phase) for phase in phases]
    rollout_time = [sum(m["generation_time"] for m in phase) for phase in phases]
    return {
        "update_time": update_time[args.warmup :],
        "rollout_time": rollout_time[args.warmup :],
        "mean_length": statistics.mean(p[0]["completions/mean_length"] for p in phases[args.warmup :]),
        "untimed_s": result.wall_time - sum(update_time),  # set-up, logging, ... outside step_time
        "peak_rss_mb": peak_rss_mb(),
    }


def worker_trl(args, matched: bool) -> dict:
    if args.trl_path:
        sys.path.insert(0, args.trl_path)
    import datasets
    import torch
    import trl  # after --trl-path
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback

    from prefalign.config import DataConfig
    from prefalign.data.tokenize import tokenize_prompts
    from prefalign.tasks.tokenizer import build_char_tokenizer

    try:
        from trl.experimental.ppo import PPOConfig, PPOTrainer
    except ImportError as error:
        raise SystemExit(
            f"TRL {trl.__version__} has no trl.experimental.ppo; pass --trl-path (see the docstring)"
        ) from error

    torch.set_num_threads(args.threads)
    tokenizer = build_char_tokenizer()
    tokenizer.padding_side = "left"  # TRL's PPO puts the response right after the (left-padded) queries
    updates = args.warmup + args.updates
    prompts, _ = tokenize_prompts(prompt_rows(args.batch * updates), tokenizer, DataConfig(max_length=1024))
    rows = datasets.Dataset.from_dict({"input_ids": prompts["prompt_ids"]})

    def load(kind, folder):
        return kind.from_pretrained(folder, dtype=torch.float32)

    policy, ref_policy = load(AutoModelForCausalLM, args.model), load(AutoModelForCausalLM, args.model)
    reward_model = load(AutoModelForSequenceClassification, args.reward_model)
    value_model = load(AutoModelForSequenceClassification, args.reward_model)

    class UpdateClock(TrainerCallback):
        def __init__(self):
            self.times, self.rollout, self.lengths = [], [], []
            self.started = self.first_grad = None

        def on_train_begin(self, *unused, **unused_keywords):
            self.started = time.perf_counter()

        def on_step_end(self, *unused, **unused_keywords):
            now = time.perf_counter()
            self.times.append(now - self.started)
            self.rollout.append((self.first_grad or now) - self.started)
            self.started, self.first_grad = now, None

    clock = UpdateClock()
    plain_forward = policy.forward

    def timed_forward(*positional, **keywords):
        if torch.is_grad_enabled() and clock.first_grad is None:
            clock.first_grad = time.perf_counter()
        output = plain_forward(*positional, **keywords)
        if torch.is_grad_enabled() and clock.first_grad is not None and "input_ids" in keywords:
            clock.lengths.append(keywords["input_ids"].shape[1])
        return output

    policy.forward = timed_forward
    settings = dict(
        output_dir=args.out, use_cpu=True, bf16=False, learning_rate=1e-5,
        per_device_train_batch_size=args.batch, gradient_accumulation_steps=1, num_mini_batches=1,
        num_ppo_epochs=args.epochs, total_episodes=args.batch * updates, response_length=args.response_length,
        temperature=1.0, local_rollout_forward_batch_size=max(64, args.batch), num_sample_generations=0,
        logging_steps=1, save_strategy="no", report_to=[], seed=args.seed, disable_tqdm=True,
        dataloader_num_workers=0,
    )  # fmt: skip
    if matched:
        settings["gradient_checkpointing"] = False
    trainer = PPOTrainer(
        args=PPOConfig(**settings), processing_class=tokenizer, model=policy, ref_model=ref_policy,
        reward_model=reward_model, train_dataset=rows, value_model=value_model, callbacks=[clock],
    )  # fmt: skip
    trainer.train()
    if len(clock.times) != updates:
        raise RuntimeError(f"expected {updates} updates, got {len(clock.times)}")
    return {
        "update_time": clock.times[args.warmup :],
        "rollout_time": clock.rollout[args.warmup :],
        # query_response length minus the left-padded query (TRL never stops: response_length tokens)
        "mean_length": float(args.response_length),
        "trl_version": trl.__version__,
        "gradient_checkpointing_config": bool(trainer.args.gradient_checkpointing),
        "gradient_checkpointing_used": bool(getattr(policy, "is_gradient_checkpointing", False)),
        "train_sequence_length": statistics.mean(clock.lengths) if clock.lengths else float("nan"),
        "peak_rss_mb": peak_rss_mb(),
    }


def run_worker(job: str, args, reward_model: str) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"ppo-step-{job}-") as out:
        command = [sys.executable, str(HERE), "--worker", job, "--model", args.model, "--out", out,
                   "--reward-model", reward_model, "--trl-path", args.trl_path]  # fmt: skip
        for key in ("batch", "response_length", "epochs", "updates", "warmup", "threads", "seed"):
            command += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        environment = {
            **os.environ, "PYTHONPATH": str(HERE.parent.parent), "TOKENIZERS_PARALLELISM": "false",
            "TRL_EXPERIMENTAL_SILENCE": "1",
        }  # fmt: skip
        completed = subprocess.run(command, capture_output=True, text=True, env=environment, check=False)
        if completed.returncode:
            raise RuntimeError(f"{job} worker failed:\n{completed.stderr[-4000:]}")
        return json.loads(completed.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- driver


def summarise(runs: list[dict], args) -> dict:
    updates = [t for run in runs for t in run["update_time"]]
    rollout = [t for run in runs for t in run["rollout_time"]]
    train = [u - r for run in runs for u, r in zip(run["update_time"], run["rollout_time"], strict=True)]
    mean_length = statistics.mean(run["mean_length"] for run in runs)
    update_s = statistics.median(updates)
    return {
        "update_s": update_s,
        "opt_step_s": update_s / args.epochs,
        "rollout_s": statistics.median(rollout),
        "train_s": statistics.median(train),
        "completion_tokens_per_s": args.batch * mean_length / update_s,
        "mean_length": mean_length,
        "peak_rss_mb": max(run["peak_rss_mb"] for run in runs),
        "updates_measured": len(updates),
        "spread": (min(updates), max(updates)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--worker", choices=JOBS)
    parser.add_argument(
        "--jobs", default="prefalign,trl-defaults,trl-matched",
        help=f"comma-separated, run alternating, of {', '.join(JOBS)} (prefalign-unshared: "
        "share_prompt=False)",
    )
    parser.add_argument("--model", default="")
    parser.add_argument("--reward-model", default="")
    parser.add_argument("--out", default="")
    parser.add_argument(
        "--trl-path", default=os.environ.get("PPO_BENCH_TRL_PATH", ""),
        help="folder put first on the TRL workers' sys.path (a TRL with trl.experimental.ppo)",
    )
    parser.add_argument("--batch", type=int, default=32, help="prompts = completions per update")
    parser.add_argument("--response-length", type=int, default=32, help="tokens per completion")
    parser.add_argument("--epochs", type=int, default=4, help="PPO epochs (num_iterations = num_ppo_epochs)")
    parser.add_argument("--updates", type=int, default=5, help="measured updates (rollouts) per run")
    parser.add_argument("--warmup", type=int, default=1, help="updates left out at the start of each run")
    parser.add_argument("--repeats", type=int, default=2, help="runs per tool, alternating")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--json", default="", help="write the summary here too")
    args = parser.parse_args()
    if args.worker:
        job = {
            "prefalign": worker_prefalign, "trl-defaults": lambda a: worker_trl(a, matched=False),
            "trl-matched": lambda a: worker_trl(a, matched=True),
            "prefalign-unshared": lambda a: worker_prefalign(a, share_prompt=False),
        }[args.worker]
        print(json.dumps(job(args)))
        return
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ppo-step-model-") as folder:
        args.model = str(Path(folder) / "policy")
        parameters = build_model(Path(args.model), args.hidden_size, args.num_layers, context=1024)
        reward_model = Path(folder) / "reward"
        build_reward_model(reward_model, Path(args.model))
        runs: dict[str, list[dict]] = {job: [] for job in args.jobs.split(",")}
        for repeat in range(args.repeats):
            for job in runs:
                print(f"repeat {repeat + 1}/{args.repeats}: {job}", file=sys.stderr, flush=True)
                runs[job].append(run_worker(job, args, str(reward_model)))
    summary = {job: summarise(found, args) for job, found in runs.items()}
    report(args, parameters, summary, runs, time.perf_counter() - started)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"settings": vars(args), "parameters": parameters, "summary": summary, "runs": runs}, indent=2,
        ))


def report(args, parameters: int, summary: dict, runs: dict, seconds: float) -> None:
    trl_jobs = [job for job in ("trl-defaults", "trl-matched") if job in runs]
    version = f"TRL {runs[trl_jobs[0]][0]['trl_version']}; " if trl_jobs else ""
    measured = next(iter(summary.values()))["updates_measured"]
    print(f"\nPPO update: {parameters / 1e6:.1f}M-parameter Llama policy, reward model and critic of the "
          f"same size, {args.batch} completions x {args.response_length} tokens, {args.epochs} PPO epochs "
          f"x 1 minibatch, {args.threads} thread(s), median of {measured} updates per tool "
          f"({version}whole run {seconds:.0f} s)")
    print(f"{'tool':<18} {'update s':>9} {'opt step s':>11} {'rollout s':>10} {'train s':>8} "
          f"{'compl tok/s':>12} {'mean len':>9} {'min-max update s':>17} {'peak RSS MB':>12}")
    for job, found in summary.items():
        low, high = found["spread"]
        print(f"{job:<18} {found['update_s']:>9.3f} {found['opt_step_s']:>11.3f} {found['rollout_s']:>10.3f} "
              f"{found['train_s']:>8.3f} {found['completion_tokens_per_s']:>12.1f} "
              f"{found['mean_length']:>9.1f} {f'{low:.2f}-{high:.2f}':>17} {found['peak_rss_mb']:>12.0f}")
    ours = summary.get("prefalign")
    others = [*trl_jobs, *(["prefalign-unshared"] if "prefalign-unshared" in runs else [])]
    for job in others if ours else []:
        theirs = summary[job]
        print(
            f"prefalign / {job}: update {ours['update_s'] / theirs['update_s']:.2f}x, rollout "
            f"{ours['rollout_s'] / theirs['rollout_s']:.2f}x, training "
            f"{ours['train_s'] / theirs['train_s']:.2f}x (below 1 = prefalign faster)"
        )
    for job in trl_jobs:
        run = runs[job][0]
        print(f"{job}: gradient_checkpointing in PPOConfig {run['gradient_checkpointing_config']}, on the "
              f"policy during training {run['gradient_checkpointing_used']}; training sequence length "
              f"{run['train_sequence_length']:.1f} (left-padded prompt + response)")
    for job in ("prefalign", "prefalign-unshared"):
        if job in runs:
            untimed = statistics.mean(run["untimed_s"] for run in runs[job])
            print(f"{job}: {untimed:.2f} s per run outside its step_time metrics (set-up, logging)")


if __name__ == "__main__":
    main()
