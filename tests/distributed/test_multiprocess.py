"""DDP and FSDP2 under torchrun (2 gloo processes on the CPU) against one process, through the CLI on the
built-in task (its data, a tiny random model in fp32): the same per-step losses and gradient norms, the same
gradients after step 1 (a sum across ranks, not an average), each step logged once, one loadable final/
folder; a killed rank ends the job and the run resumes with 2 processes or 1; FSDP holds half the training
state per process; commands that cannot run distributed say so."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prefalign.runtime.metrics import read_metrics
from tests.helpers import save_tiny_model

pytestmark = pytest.mark.distributed

WORKER = str(Path(__file__).with_name("worker.py"))
ROOT = Path(__file__).resolve().parents[2]


def launch(
    arguments: list[str], processes: int, env: dict[str, str] | None = None, timeout: int = 240,
    script: list[str] | None = None,
):
    """`prefalign <arguments>` through tests/distributed/worker.py (or `script`, a Python file and its
    arguments): plain Python for 1 process, torchrun for more. Returns the CompletedProcess (stdout and
    stderr captured)."""
    program = script or [WORKER]
    environment = {
        **os.environ, "PYTHONPATH": str(ROOT), "PREFALIGN_DIST_TIMEOUT": "60", "OMP_NUM_THREADS": "1",
        **(env or {}),
    }  # fmt: skip
    if processes == 1:
        command = [sys.executable, *program, *arguments]
    else:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
            "--master_port", str(29500 + os.getpid() % 1000), *program, *arguments,
        ]  # fmt: skip
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=timeout)


def succeed(arguments, processes, env=None):
    result = launch(arguments, processes, env)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(save_tiny_model(tmp_path_factory.mktemp("model") / "tiny"))


def command_line(command: str, model_dir: str, output_dir: Path, max_steps: int = 4) -> list[str]:
    """A small fp32 run of `command` on the built-in data: 8 examples per step (2 micro-batches of 4 in one
    process, 1 of 4 per rank in two), an odd-sized eval split (7) evaluated twice."""
    common = [
        command, "--model.name_or_path", model_dir, "--model.dtype", "float32",
        "--train.output_dir", str(output_dir), "--train.max_steps", str(max_steps),
        "--train.num_threads", "1", "--train.progress", "false", "--train.log_every", "1",
        "--train.eval_every", "2", "--data.max_eval_samples", "7", "--data.max_length", "48",
        # Not the built-in task's thousands of rows: tokenizing them would be most of a run.
        "--data.max_samples", "256",
        "--report", "false",
    ]  # fmt: skip
    if command == "grpo":
        # 4 prompts x 4 completions per step; dynamic sampling drops groups whose rewards are all equal.
        return [
            *common, "--train.batch_size", "8", "--train.grad_accum", "2", "--num_generations", "4",
            "--max_new_tokens", "6", "--dynamic_sampling", "true", "--train.learning_rate", "1e-3",
            "--reward_functions", "tests.distributed.rewards:starts_with_digit",
        ]  # fmt: skip
    if command == "ppo":
        # 16 completions per rollout (one per prompt), the adaptive KL controller on (its KL is the batch's).
        return [
            *common, "--train.batch_size", "8", "--train.grad_accum", "2", "--max_new_tokens", "6",
            "--kl_target", "0.5", "--train.learning_rate", "1e-3",
            "--reward_functions", "tests.distributed.rewards:starts_with_digit",
        ]  # fmt: skip
    extra = {
        "dpo": ["--mixed_precision", "off"],
        "reward": ["--mixed_precision", "no"],  # its ~46,000 built-in pairs took 17 s to tokenize
    }.get(command, [])
    return [*common, "--train.batch_size", "4", "--train.grad_accum", "2", *extra]


def steps_of(run_dir: Path) -> list[dict]:
    return [record for record in read_metrics(run_dir) if "loss" in record]


def assert_same_steps(two: list[dict], one: list[dict], keys=("loss", "grad_norm")) -> None:
    assert [r["step"] for r in two] == [r["step"] for r in one]
    for a, b in zip(two, one, strict=True):
        for key in keys:
            # 1e-5 relative; GRPO's loss is ~0 by construction (advantages sum to zero per group): an
            # absolute floor far below any real loss.
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key, a[key], b[key])


@pytest.mark.parametrize("command", ["sft", "dpo", "reward", "grpo", "ppo"])
def test_two_processes_train_like_one(tmp_path, model_dir, command):
    check_two_like_one(tmp_path, model_dir, command)


def test_several_micro_batches_per_process_sync_once_per_step(tmp_path, model_dir):
    """2 examples per micro-batch, 4 micro-batches per step: 2 per process. DDP's forward must run inside
    no_sync (before the fix, 2 processes gave a gradient norm of 3.23 against one process's 2.05). FSDP's
    case is test_fsdp_trains_like_one_process[sft]."""
    check_two_like_one(tmp_path, model_dir, "sft", ["--train.batch_size", "2", "--train.grad_accum", "4"])


@pytest.mark.parametrize(
    ("command", "extra"),
    [
        # 2 micro-batches of 2 per process (a reduce-scatter each), activations recomputed in backward.
        ("sft", ["--model.gradient_checkpointing", "true", "--train.batch_size", "2", "--train.grad_accum",
                 "4"]),
        ("dpo", []),
        ("reward", []),
        # LoRA: the reference is the policy with its adapters off and π_old a forward before the first of
        # μ = 2 updates, both on the gathered whole weights (each rank's share of groups).
        ("grpo", ["--model.lora", "true", "--beta", "0.1", "--num_iterations", "2"]),
    ],
)
def test_fsdp_trains_like_one_process(tmp_path, model_dir, command, extra):
    """FSDP2 on 2 gloo processes (fp32): the same steps and step-1 gradients (gathered from the shards) as one
    process, and a gathered final/ folder plain transformers (or peft) loads."""
    check_two_like_one(tmp_path, model_dir, command, ["--distributed.strategy", "fsdp", *extra])


def test_fsdp_grpo_with_group_shares_one_apart_runs_idle_micro_batches(tmp_path, model_dir):
    """3 prompt groups per step on 2 processes: rank 0 trains 2 micro-batches, rank 1 one and an idle one
    (FSDP's forwards are collectives); the steps still equal one process's."""
    extra = [
        "--train.batch_size", "4", "--train.grad_accum", "3", "--dynamic_sampling", "false",
        "--distributed.strategy", "fsdp",
    ]  # fmt: skip
    check_two_like_one(tmp_path, model_dir, "grpo", extra)


def check_two_like_one(tmp_path, model_dir, command, extra=()):
    """`command` (with `extra` arguments) in 1 process and in 2: the same per-step numbers, step-1 gradients,
    evaluation steps, and final/ weights."""
    runs = {}
    for processes in (1, 2):
        grads = tmp_path / f"grads-{processes}"
        grads.mkdir()
        run_dir = tmp_path / f"run-{processes}"
        arguments = command_line(command, model_dir, run_dir) + list(extra)
        succeed(arguments, processes, {"PREFALIGN_TEST_GRADS": str(grads)})
        runs[processes] = (run_dir, grads)
    (one_dir, one_grads), (two_dir, two_grads) = runs[1], runs[2]
    one, two = steps_of(one_dir), steps_of(two_dir)
    assert len(one) == 4
    assert_same_steps(two, one)
    if command == "grpo":  # dynamic sampling met all-equal groups, decided the same on both ranks
        assert any(r["frac_reward_zero_std"] > 0 for r in one)
        assert_same_steps(two, one, keys=("reward", "frac_reward_zero_std", "completions/mean_length"))
    if command == "ppo":  # the rollout's metrics and the controller's beta are the whole batch's
        assert_same_steps(two, one, keys=("objective/kl", "objective/scores", "beta"))
    # Step 1's gradients, directly: rank 0's and rank 1's are the all-reduced sum, equal to one process's.
    expected = load_file(str(one_grads / "rank-0.safetensors"))
    for rank in (0, 1):
        got = load_file(str(two_grads / f"rank-{rank}.safetensors"))
        assert got.keys() == expected.keys()
        for name, tensor in expected.items():
            torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-8, msg=f"rank {rank} {name}")
    # Each step logged once, the evaluations on the odd split (7 rows) at steps 2 and 4, one final/ folder.
    records = read_metrics(two_dir)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    evals = [r for r in records if any(key.startswith("eval/") for key in r)]
    assert [r["step"] for r in evals] == [r["step"] for r in read_metrics(one_dir) if "eval/" in "".join(r)]
    written = {path.name for path in (two_dir / "final").iterdir()}
    assert {"config.json", "adapter_config.json"} & written and (two_dir / "config.yaml").exists()
    if command == "reward":
        from transformers import AutoModelForSequenceClassification as auto_class
    else:
        from transformers import AutoModelForCausalLM as auto_class
    two_final = auto_class.from_pretrained(two_dir / "final")  # a LoRA adapter folder loads on its base
    one_final = auto_class.from_pretrained(one_dir / "final")
    for (name, a), (_, b) in zip(two_final.named_parameters(), one_final.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_killed_rank_ends_the_job_and_the_run_resumes_on_two_or_one(tmp_path, model_dir, strategy):
    """Checkpoints through torch.distributed.checkpoint: FSDP's are sharded (each rank writes its shards) and
    reshard on load, so the run resumes on 2 processes or on 1."""
    options = ["--train.save_every", "2", "--distributed.strategy", strategy]
    whole = tmp_path / "whole"
    arguments = command_line("sft", model_dir, whole, max_steps=6) + options
    succeed(arguments, 2)
    killed = tmp_path / "killed"
    arguments = command_line("sft", model_dir, killed, max_steps=6) + options
    started = time.monotonic()
    result = launch(arguments, 2, {"PREFALIGN_TEST_DIE_AT": "5:1"})  # rank 1 dies at step 5
    assert result.returncode != 0
    assert time.monotonic() - started < 60
    assert [r["step"] for r in steps_of(killed)] == [1, 2, 3, 4]  # rank 0 got no further alone
    alone = tmp_path / "alone"
    shutil.copytree(killed, alone)
    succeed(arguments + ["--train.resume", "true"], 2)
    resumed = steps_of(killed)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    # Same world size: the uninterrupted run, bit for bit.
    pairs = [[(r["loss"], r["grad_norm"]) for r in steps] for steps in (resumed, steps_of(whole))]
    assert pairs[0] == pairs[1]
    a, b = (load_file(str(run / "final" / "model.safetensors")) for run in (killed, whole))
    assert all(torch.equal(a[name], b[name]) for name in b)
    # The same checkpoint resumed by one process: the same steps, to float rounding.
    single = [arg if arg != str(killed) else str(alone) for arg in arguments]
    succeed(single + ["--train.resume", "true"], 1)
    assert_same_steps(steps_of(alone), steps_of(whole))


def test_a_bad_config_is_refused_once_before_any_work(tmp_path, model_dir):
    result = launch(["sft", "--model.name_or_path", model_dir, "--train.learning_rate", "-1",
                     "--train.output_dir", str(tmp_path / "run")], 2)  # fmt: skip
    assert result.returncode != 0
    assert result.stderr.count("prefalign sft: error") == 1, result.stderr[-3000:]
    assert "train.learning_rate" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_step_that_two_processes_cannot_share_is_refused_with_the_numbers(tmp_path, model_dir):
    result = launch(command_line("sft", model_dir, tmp_path / "run")[:-4] + ["--train.batch_size", "3"], 2)
    assert result.returncode != 0
    assert "2 processes cannot share a step of batch_size x grad_accum = 3 x 1 = 3" in result.stderr


@pytest.mark.parametrize("command", ["demo", "base"])
def test_single_process_commands_refuse_a_launcher(command):
    result = launch([command], 2)
    assert result.returncode != 0
    assert f"`prefalign {command}` runs in one process" in result.stderr


def test_sample_writes_one_file_in_prompt_order(tmp_path, model_dir):
    outputs = {}
    for processes in (1, 2):
        out = tmp_path / f"sample-{processes}"
        succeed([
            "sample", "--model.name_or_path", model_dir, "--data.max_samples", "12", "--sampling.n", "4",
            "--sampling.max_new_tokens", "6", "--output_dir", str(out), "--sampling.strategy", "best_of_n",
        ], processes)  # fmt: skip
        outputs[processes] = [json.loads(line) for line in (out / "best_of_n.jsonl").read_text().splitlines()]
    assert outputs[2] == outputs[1] and len(outputs[1]) > 0


def test_accelerate_launch_starts_the_processes_and_its_own_precision_is_refused(tmp_path, model_dir):
    """`accelerate launch --multi_gpu` starts 2 gloo processes on a CPU machine (the demo then refuses, so
    prefalign saw WORLD_SIZE=2); its mixed precision is refused rather than silently ignored."""
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--dynamo_backend", "no", "--main_process_port",
                  str(29600 + os.getpid() % 1000)]  # fmt: skip
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "PREFALIGN_DIST_TIMEOUT": "60"}

    def run(*arguments):
        return subprocess.run(
            [*accelerate, *arguments], env=environment, capture_output=True, text=True, timeout=240,
        )

    demo = run("--mixed_precision", "no", "-m", "prefalign", "demo")
    assert demo.returncode != 0, demo.stderr[-2000:]
    assert "started as 2 processes (WORLD_SIZE=2)" in demo.stderr
    bf16 = run("--mixed_precision", "bf16", "-m", "prefalign", "sft", "--model.name_or_path", model_dir,
               "--train.output_dir", str(tmp_path / "run"))  # fmt: skip
    assert bf16.returncode != 0 and "asked for mixed precision 'bf16'" in bf16.stderr, bf16.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_fsdp_holds_half_the_training_state_of_ddp_per_process():
    """A ~58M-parameter Llama-shaped model in fp32, one step: per process, the bytes of parameters +
    gradients + AdamW state under FSDP2 on 2 processes are at most 0.55x those under DDP (tensor bytes, local
    shards)."""
    memory = str(Path(__file__).with_name("memory.py"))
    totals = {}
    for strategy in ("ddp", "fsdp"):
        result = launch([], 2, script=[memory, "--strategy", strategy])
        assert result.returncode == 0, result.stderr[-3000:]
        lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
        assert len(lines) == 2 and all(line["model_parameters"] >= 50_000_000 for line in lines)
        totals[strategy] = max(line["total"] for line in lines)
        assert all(line["gradients"] > 0 and line["optimizer"] > 0 for line in lines)
    assert totals["fsdp"] <= 0.55 * totals["ddp"], totals
