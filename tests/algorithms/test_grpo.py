"""GRPO through its entry point on a tiny random model: config errors, metrics and the run folder, reference
handling, failing rewards, too-long prompts, exact resume (updates: test_grpo_updates.py)."""

from __future__ import annotations

import json
import math

import datasets
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, BloomConfig, BloomForCausalLM

from prefalign.algorithms.grpo import grpo
from prefalign.algorithms.grpo_config import DEFAULT_MAX_NEW_TOKENS
from prefalign.config import DataConfig, ModelConfig
from prefalign.data import tokenize_prompts
from prefalign.errors import ConfigError, DataError, TrainingError
from prefalign.evaluation.policy import evaluate_policy
from prefalign.models.loading import apply_lora
from prefalign.recipes.base_model import BaseConfig
from prefalign.rewards import WeightedRewards
from prefalign.runtime.metrics import read_metrics
from prefalign.tasks.arithmetic import prompt_dataset
from prefalign.tasks.model import new_model
from prefalign.tasks.tokenizer import build_char_tokenizer
from tests.algorithms.grpo_support import (
    INTERRUPT,
    TIMING_KEYS,
    TINY,
    CopyWatch,
    G,
    Interrupt,
    digit_share,
    eos_likely,
    make_config,
    prompts,
)
from tests.helpers import saved_classifier

# ----------------------------------------------------------------------------- config


def test_k1_as_a_loss_term_warns(tmp_path, model_dir, caplog):
    def run(kl_estimator):
        config = make_config(
            model_dir, tmp_path / kl_estimator, beta=0.1, kl_estimator=kl_estimator, train={"max_steps": 1}
        )
        grpo(config, dataset=prompts(), save=False)

    with caplog.at_level("WARNING", logger="prefalign"):
        run("k3")
        assert "zero expected gradient" not in caplog.text
        run("k1")
    assert "kl_estimator=k1 as a loss term has zero expected gradient" in caplog.text


def test_config_errors(tmp_path, model_dir):
    missing = str(tmp_path / "never-loaded")  # the checks run before the policy is loaded
    for overrides, message in [
        ({"num_generations": 1}, "at least 2"),
        ({"num_generations": 3}, "not a multiple of"),
        ({"temperature": 0.0}, "temperature"),
    ]:
        with pytest.raises(ConfigError, match=message):
            grpo(make_config(missing, tmp_path / "run", **overrides), dataset=prompts())
    assert not (tmp_path / "run").exists()  # refused before the run folder was made
    with pytest.raises(ConfigError, match="needs a reward"):
        grpo(make_config(model_dir, tmp_path / "no-reward", reward_functions=[]), dataset=prompts())
    with pytest.raises(ConfigError, match="reward_weights"):
        grpo(make_config(model_dir, tmp_path / "weights", reward_weights=[1.0, 2.0]), dataset=prompts())


def test_beta_zero_loads_no_reference(tmp_path, model_dir, tokenizer):
    """beta = 0: no frozen copy of the policy is made (or scores anything) and no KL is logged; beta > 0:
    one copy is the reference; beta = 0 with eval prompts: one copy, for the evaluations' eval/kl only."""
    for beta, evaluated, copies in ((0.0, False, 0), (0.1, False, 1), (0.0, True, 1)):
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        watch = CopyWatch()
        model.register_forward_pre_hook(watch)
        config = make_config(
            model_dir, tmp_path / f"beta-{beta}-{evaluated}", beta=beta, train={"max_steps": 1}
        )
        eval_dataset = prompt_dataset("held_out", limit=4) if evaluated else None
        metrics = grpo(
            config, dataset=prompts(), eval_dataset=eval_dataset, model=model, tokenizer=tokenizer, save=False
        ).metrics
        assert watch.copies == copies, beta
        assert ("kl" in metrics[0]) == (beta > 0), beta
        assert ("eval/kl" in metrics[-1]) == evaluated, beta


def test_evaluations_log_the_kl_to_the_starting_policy_at_beta_zero(tmp_path, model_dir, tokenizer):
    """eval/kl at each evaluation, β = 0: the final one equals evaluate_policy's KL of the saved policy to
    the model the run started from, worked out apart from the run."""
    eval_dataset = prompt_dataset("held_out", limit=8)
    config = make_config(model_dir, tmp_path / "run", beta=0.0, eval_k=2, train={"eval_every": 2})
    result = grpo(config, dataset=prompts(), eval_dataset=eval_dataset)
    evaluations = [m for m in result.metrics if "eval/accuracy" in m]
    assert [m["step"] for m in evaluations] == [2, 3] and all("eval/kl" in m for m in evaluations)
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    start = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenized, _ = tokenize_prompts(eval_dataset, tokenizer, DataConfig(max_length=32))
    expected = evaluate_policy(
        final, tokenizer, tokenized, WeightedRewards(["test_digit_share"]), k=2, max_new_tokens=4,
        seed=config.train.seed,
        reference=start,
    )  # fmt: skip
    assert evaluations[-1]["eval/kl"] == pytest.approx(expected["kl"], rel=1e-5, abs=1e-6)
    assert abs(expected["kl"]) > 1e-3  # the policy moved (lr 1e-2): a KL to itself would be ~0


def test_the_gold_monitor_is_logged_and_leaves_training_alone(tmp_path, model_dir):
    """monitor/<name>/mean is the monitor function's mean over the step's sampled completions (recomputed
    from completions.jsonl, which holds all of them here), and the run's losses and rewards are the same as
    without the monitor."""
    runs = {}
    for name, monitors in (("plain", []), ("monitored", ["test_text_length"])):
        config = make_config(
            model_dir, tmp_path / name, monitor_functions=monitors, num_completions_to_log=8,
            train={"batch_size": 8},
        )  # fmt: skip
        runs[name] = grpo(config, dataset=prompts(), save=False).metrics
    lines = (tmp_path / "monitored" / "completions.jsonl").read_text().splitlines()
    logged = [json.loads(line) for line in lines]
    for record in runs["monitored"]:
        step_texts = [entry["completion"] for entry in logged if entry["step"] == record["step"]]
        assert len(step_texts) == 8
        assert record["monitor/test_text_length/mean"] == pytest.approx(
            sum(len(text) for text in step_texts) / 8 / 10
        )
    for plain, monitored in zip(runs["plain"], runs["monitored"], strict=True):
        assert "monitor/test_text_length/mean" not in plain
        for key in ("loss", "grad_norm", "reward", "rewards/test_digit_share/mean", "entropy"):
            assert monitored[key] == plain[key], key
    with pytest.raises(ConfigError, match="monitor_functions: unknown reward function 'no_such'"):
        grpo(make_config(model_dir, tmp_path / "typo", monitor_functions=["no_such"]), dataset=prompts())


# ----------------------------------------------------------------------------- a whole run


def test_run_logs_trl_metrics_completions_and_saves(tmp_path, model_dir):
    config = make_config(model_dir, tmp_path / "run", beta=0.05, train={"eval_every": 2})
    result = grpo(config, dataset=prompts(), eval_dataset=prompt_dataset("held_out", limit=8))
    assert result.step == 3
    first = read_metrics(tmp_path / "run")[0]
    expected = {
        "reward", "reward_std", "rewards/test_digit_share/mean", "frac_reward_zero_std", "kl", "entropy",
        "clip_ratio/low_mean", "clip_ratio/high_mean", "completions/mean_length", "completions/clipped_ratio",
        "tokens_per_second", "step_time", "generation_share", "loss", "grad_norm",
    }  # fmt: skip
    assert expected <= set(first)
    # The reference stays frozen while the policy trains: once it has moved, the KL is positive (a reference
    # that followed the policy would log 0). Step 1's values are checked against a recomputation below.
    assert all(m["kl"] > 0.0 for m in result.metrics[1:] if "kl" in m)
    assert 0.0 < first["generation_share"] < 1.0
    assert any("eval/accuracy" in m for m in result.metrics if m["step"] == 2)
    logged = [json.loads(line) for line in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()]
    assert len(logged) == 3 * 4 and {"prompt", "completion", "reward", "advantage"} <= set(logged[0])
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()


def test_lora_reference_is_the_adapters_off_policy(tmp_path, model_dir):
    lora = ModelConfig(name_or_path=model_dir, device="cpu", lora=True, lora_r=4)
    config = make_config(
        model_dir, tmp_path / "lora", model=lora, beta=0.1, importance_sampling_level="sequence",
        train={"max_steps": 2},
    )
    result = grpo(config, dataset=prompts())
    # LoRA's B starts at zero: at step 1 the adapted policy equals the base, so the KL is exactly 0.
    assert result.metrics[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert result.metrics[1]["kl"] > 0.0
    # GSPO logs the clip metrics too
    assert {"clip_ratio/low_mean", "clip_ratio/high_mean"} <= set(result.metrics[0])
    assert (tmp_path / "lora" / "final" / "adapter_model.safetensors").exists()


# ----------------------------------------------------------------------------- bad rewards and prompts


def test_a_reward_that_raises_drops_its_groups_and_counts_them(tmp_path, model_dir, caplog):
    config = make_config(
        model_dir, tmp_path / "raise", reward_functions=["test_fails_three"],
        train={"max_steps": 2, "batch_size": 16},
    )
    result = grpo(config, dataset=prompts())
    failed = sum(m["rewards/failed_samples"] for m in result.metrics)
    dropped = sum(m["rewards/dropped_groups"] for m in result.metrics)
    assert failed == dropped * G and dropped > 0
    assert all(m["groups_trained"] + m["rewards/dropped_groups"] == 4 for m in result.metrics)
    assert "reward function 'test_fails_three' on prompt" in caplog.text and "multiples of 3" in caplog.text


def test_a_reward_that_is_always_nan_stops_with_a_clear_error(tmp_path, model_dir):
    config = make_config(model_dir, tmp_path / "nan", reward_functions=["test_nan"])
    with pytest.raises(
        TrainingError, match=r"no usable group .* optimizer step 1 .*'test_nan'.*not a finite number"
    ):
        grpo(config, dataset=prompts())


def test_prompts_longer_than_the_context_are_dropped_and_counted_or_rejected(tmp_path, model_dir):
    rows = prompts(8).to_list()
    # 26 characters + 4 template tokens = 30 fits data.max_length = 32, but not with 4 new tokens in a
    # context of 32.
    rows[0]["prompt"] = [{"role": "user", "content": "1+1 " * 6 + "+1"}]
    config = make_config(model_dir, tmp_path / "long", train={"max_steps": 1})
    grpo(config, dataset=datasets.Dataset.from_list(rows))
    stats = json.loads((tmp_path / "long" / "data_stats.json").read_text())
    assert stats["train"]["dropped_context"] == 1
    data = DataConfig(max_length=32, too_long_prompt="error")
    strict = make_config(model_dir, tmp_path / "long-strict", data=data)
    with pytest.raises(DataError, match="train prompt 0 is 30 tokens; .* exceeds the model's context of 32"):
        grpo(strict, dataset=datasets.Dataset.from_list(rows))


def test_max_new_tokens_zero_fits_the_context_and_is_written_to_the_config(tmp_path, model_dir, tokenizer):
    rows = datasets.Dataset.from_list(prompts(8).to_list())
    tokenized, _ = tokenize_prompts(rows, build_char_tokenizer(), DataConfig())
    longest = max(len(ids) for ids in tokenized["prompt_ids"])
    config = make_config(model_dir, tmp_path / "auto", max_new_tokens=0, train={"max_steps": 1})
    grpo(config, dataset=rows)
    assert config.max_new_tokens == 32 - longest  # the tiny model's context is 32 tokens
    written = yaml.safe_load((tmp_path / "auto" / "config.yaml").read_text())
    assert written["max_new_tokens"] == 32 - longest
    # A context with room to spare, or none known (Bloom's ALiBi puts no length in its config), keeps the
    # default.
    torch.manual_seed(0)
    bloom = BloomConfig(
        vocab_size=len(tokenizer), hidden_size=32, n_layer=1, n_head=2, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    assert getattr(bloom, "max_position_embeddings", None) is None
    policies = {
        "roomy": new_model(BaseConfig(**TINY, max_position_embeddings=1024), tokenizer),
        "unknown": BloomForCausalLM(bloom),
    }
    for name, model in policies.items():
        eos_likely(model, tokenizer, bias=20.0)  # completions end at once: no need to sample 256 tokens
        config = make_config(model_dir, tmp_path / name, max_new_tokens=0, train={"max_steps": 1})
        grpo(config, dataset=rows, model=model, tokenizer=tokenizer, save=False)
        assert config.max_new_tokens == DEFAULT_MAX_NEW_TOKENS, name
        written = yaml.safe_load((tmp_path / name / "config.yaml").read_text())
        assert written["max_new_tokens"] == DEFAULT_MAX_NEW_TOKENS, name
    with pytest.raises(ConfigError, match="max_new_tokens must be at least 1"):
        grpo(make_config(model_dir, tmp_path / "negative", max_new_tokens=-1), dataset=rows)


def test_overlong_buffer_longer_than_the_fitted_max_new_tokens_is_a_config_error(tmp_path, model_dir):
    # max_new_tokens 0 resolves to what the 32-token context leaves (under 32), less than the buffer of 100.
    config = make_config(model_dir, tmp_path / "overlong", max_new_tokens=0, overlong_buffer=100)
    with pytest.raises(
        ConfigError,
        match=r"overlong_buffer 100 is longer than max_new_tokens \d+ \(fitted to the model's context",
    ):
        grpo(config, dataset=prompts(8))


# ----------------------------------------------------------------------------- resume


def test_resume_repeats_the_uninterrupted_run(tmp_path, model_dir):
    def config_for(folder, **train):
        return make_config(
            model_dir, folder, beta=0.05, reward_functions=["test_interrupting"],
            train={"max_steps": 4, "save_every": 2, **train},
        )

    INTERRUPT.update(at_call=None, calls=0)
    whole = grpo(config_for(tmp_path / "whole"), dataset=prompts())

    # the third rollout's scoring "kills" the process after the step-2 checkpoint
    INTERRUPT.update(at_call=3, calls=0)
    with pytest.raises(Interrupt):
        grpo(config_for(tmp_path / "cut"), dataset=prompts())
    INTERRUPT.update(at_call=None)
    resumed = grpo(config_for(tmp_path / "cut", resume=True), dataset=prompts())

    assert [m["step"] for m in resumed.metrics] == [3, 4]
    for expected, got in zip(whole.metrics[2:], resumed.metrics, strict=True):
        for key, value in expected.items():
            if key not in TIMING_KEYS:
                assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert [m["step"] for m in read_metrics(tmp_path / "cut")] == [1, 2, 3, 4]


def test_reward_model_scores_the_completions(tmp_path, model_dir, tokenizer):
    folder = saved_classifier(tmp_path / "reward-model")
    config = make_config(
        model_dir, tmp_path / "rm", reward_functions=[], reward_model=str(folder), train={"max_steps": 1}
    )
    metrics = grpo(config, dataset=prompts(), save=False).metrics[0]
    name = "rewards/reward_model/mean"  # short and stable, not the folder (trackers nest on '/')
    assert not any(key.startswith("rewards/reward_model:") for key in metrics)
    assert math.isfinite(metrics[name]) and metrics["reward"] == pytest.approx(metrics[name])
    assert metrics["frac_reward_zero_std"] == 0.0  # a continuous score separates every group


def test_lora_policy_trains_only_adapters(tmp_path, model_dir, tokenizer):
    model = apply_lora(AutoModelForCausalLM.from_pretrained(model_dir), ModelConfig(lora=True, lora_r=4))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    config = make_config(model_dir, tmp_path / "lora-only", train={"max_steps": 1})
    grpo(config, dataset=prompts(), model=model, tokenizer=tokenizer, save=False)
    assert all(torch.equal(frozen[n], p) for n, p in model.named_parameters() if n in frozen)


def test_a_callable_reward_function_runs_and_is_saved_by_name(tmp_path, model_dir):
    steps_seen = []

    def shaped(prompts, completions, trainer_state, **columns):  # TRL's trainer_state, as GRPOTrainer passes
        steps_seen.append(trainer_state.global_step)
        return digit_share(prompts, completions, **columns)

    config = make_config(model_dir, tmp_path / "callable", reward_functions=[shaped], train={"max_steps": 2})
    result = grpo(config, dataset=prompts())
    saved = yaml.safe_load((tmp_path / "callable" / "config.yaml").read_text())
    assert saved["reward_functions"] == [
        "tests.algorithms.test_grpo:test_a_callable_reward_function_runs_and_is_saved_by_name.<locals>.shaped"
    ]
    assert steps_seen == [0, 1] and "rewards/shaped/mean" in result.metrics[0]
    assert (tmp_path / "callable" / "final" / "model.safetensors").exists()
