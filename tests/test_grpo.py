"""The GRPO loop on a tiny random model: config errors, metrics, reference handling, accumulation,
old log-probs, dynamic sampling, failing rewards, too-long prompts, and exact resume."""

from __future__ import annotations

import json
import math

import datasets
import pytest
import torch
import yaml

from prefalign.algorithms.grpo import (
    DEFAULT_MAX_NEW_TOKENS,
    GRPOConfig,
    aligned,
    build_rewards,
    check_config,
    collate_rollout,
    default_max_new_tokens,
    grpo,
    optimizer_step,
    reference_scorer,
)
from prefalign.config import DataConfig, ModelConfig, TrainConfig
from prefalign.data import tokenize_prompts
from prefalign.errors import ConfigError, DataError, TrainingError
from prefalign.models.forward import completion_logps, grouped_completion_logps
from prefalign.models.loading import apply_lora
from prefalign.recipes.base_model import BaseConfig
from prefalign.rewards import register_reward_function
from prefalign.rollout.engine import LocalEngine
from prefalign.rollout.types import SamplingParams
from prefalign.runtime.metrics import read_metrics
from prefalign.tasks.arithmetic import prompt_dataset
from prefalign.tasks.model import new_model
from prefalign.tasks.tokenizer import build_char_tokenizer

G = 4
TIMING_KEYS = {"step_time", "generation_time", "generation_share", "tokens_per_second"}


def digit_share(prompts, completions, **_columns):
    """Share of digits in the completion: varies between samples of a random model."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [sum(ch.isdigit() for ch in text) / max(len(text), 1) for text in texts]


class Interrupt(BaseException):
    """Stands for the process being killed (not an Exception, so no reward wrapper swallows it)."""


INTERRUPT = {"at_call": None, "calls": 0}


def interrupting_digit_share(prompts, completions, **columns):
    INTERRUPT["calls"] += 1
    if INTERRUPT["calls"] == INTERRUPT["at_call"]:
        raise Interrupt
    return digit_share(prompts, completions)


def some_groups_constant(prompts, completions, answer, **_columns):
    """Constant 1.0 when the answer is a multiple of 3 (zero-std groups), the digit share otherwise."""
    shares = digit_share(prompts, completions)
    return [1.0 if int(a) % 3 == 0 else share for share, a in zip(shares, answer, strict=True)]


def fails_on_multiples_of_three(prompts, completions, answer, **_columns):
    for a in answer:
        if int(a) % 3 == 0:
            raise ValueError("multiples of 3 are not supported")
    return digit_share(prompts, completions)


def always_nan(prompts, completions, **_columns):
    return [math.nan] * len(completions)


for _name, _function in {
    "test_digit_share": digit_share,
    "test_interrupting": interrupting_digit_share,
    "test_some_constant": some_groups_constant,
    "test_fails_three": fails_on_multiples_of_three,
    "test_nan": always_nan,
}.items():
    register_reward_function(_name, _function)


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("tiny-policy")
    config = BaseConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_position_embeddings=32)
    new_model(config, tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def make_config(model_dir, output_dir, **overrides) -> GRPOConfig:
    train = dict(output_dir=str(output_dir), learning_rate=1e-2, batch_size=8, max_steps=3, progress=False, seed=3)
    train.update(overrides.pop("train", {}))
    defaults = dict(
        model=ModelConfig(name_or_path=model_dir, device="cpu"),
        data=DataConfig(max_length=32, max_eval_samples=8),
        train=TrainConfig(**train),
        reward_functions=["test_digit_share"],
        num_generations=G,
        max_new_tokens=4,
        log_completions_every=1,
        num_completions_to_log=4,
    )
    defaults.update(overrides)
    return GRPOConfig(**defaults)


def prompts(limit=32):
    return prompt_dataset("train", limit=limit)


# ----------------------------------------------------------------------------- config


def test_k1_as_a_loss_term_warns(tmp_path, model_dir, caplog):
    with caplog.at_level("WARNING", logger="prefalign"):
        check_config(make_config(model_dir, tmp_path, beta=0.1, kl_estimator="k3"))
        assert "zero expected gradient" not in caplog.text
        check_config(make_config(model_dir, tmp_path, beta=0.1, kl_estimator="k1"))
    assert "kl_estimator=k1 as a loss term has zero expected gradient" in caplog.text


def test_config_errors(tmp_path, model_dir):
    with pytest.raises(ConfigError, match="at least 2"):
        check_config(make_config(model_dir, tmp_path, num_generations=1))
    with pytest.raises(ConfigError, match="not a multiple of"):
        check_config(make_config(model_dir, tmp_path, num_generations=3))
    with pytest.raises(ConfigError, match="temperature"):
        check_config(make_config(model_dir, tmp_path, temperature=0.0))
    with pytest.raises(ConfigError, match="needs a reward"):
        build_rewards(make_config(model_dir, tmp_path, reward_functions=[]))
    with pytest.raises(ConfigError, match="reward_weights"):
        build_rewards(make_config(model_dir, tmp_path, reward_weights=[1.0, 2.0]))


def test_beta_zero_loads_no_reference(tmp_path, model_dir, tokenizer):
    model = new_model(BaseConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), tokenizer)
    assert reference_scorer(make_config(model_dir, tmp_path, beta=0.0), model, None) is None
    assert reference_scorer(make_config(model_dir, tmp_path, beta=0.1), model, None) is not None


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
    # Step 1: the policy is the reference, so every token's k3 is 0; ρ = 1 clips nothing.
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)
    assert first["clip_ratio/low_mean"] == 0.0 and first["clip_ratio/high_mean"] == 0.0
    assert 0.0 < first["generation_share"] < 1.0
    assert any("eval/accuracy" in m for m in result.metrics if m["step"] == 2)
    logged = [json.loads(line) for line in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()]
    assert len(logged) == 3 * 4 and {"prompt", "completion", "reward", "advantage"} <= set(logged[0])
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()


def test_lora_reference_is_the_adapters_off_policy(tmp_path, model_dir):
    lora = ModelConfig(name_or_path=model_dir, device="cpu", lora=True, lora_r=4)
    config = make_config(model_dir, tmp_path / "lora", model=lora, beta=0.1, importance_sampling_level="sequence", train={"max_steps": 2})
    result = grpo(config, dataset=prompts())
    # LoRA's B starts at zero: at step 1 the adapted policy equals the base, so the KL is exactly 0.
    assert result.metrics[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert result.metrics[1]["kl"] > 0.0
    assert {"clip_ratio/low_mean", "clip_ratio/high_mean"} <= set(result.metrics[0])  # GSPO logs the clip metrics too
    assert (tmp_path / "lora" / "final" / "adapter_model.safetensors").exists()


# ----------------------------------------------------------------------------- pieces of the update


def rollout_examples(model_dir, tokenizer, num_prompts=3, seed=0):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    rows = [list(ids) for ids in tokenizer.apply_chat_template(
        [[{"role": "user", "content": f"{10 ** a}+5"}] for a in range(num_prompts)], add_generation_prompt=True
    )["input_ids"]]  # fmt: skip
    groups = LocalEngine(model, tokenizer).generate(rows, SamplingParams(n=G, max_new_tokens=6, seed=seed, ignore_eos=True))
    advantages = [1.0, -0.5, 0.25, -0.75]
    # Prompts of different lengths; completions cut to 3..6 tokens (a prefix keeps its log-probs), so both
    # paddings are exercised.
    examples = [
        {"prompt_ids": rows[i], "completion_ids": s.token_ids[:3 + j], "old_logps": s.logprobs[:3 + j], "advantage": advantages[j], "trained": True}
        for i, group in enumerate(groups) for j, s in enumerate(group)
    ]  # fmt: skip
    return model, examples


def test_engine_logprobs_line_up_with_the_training_forward(model_dir, tokenizer):
    model, examples = rollout_examples(model_dir, tokenizer)
    batch = collate_rollout(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        scored = completion_logps(model, batch)
    old = aligned(batch["old_logps"], scored.mask)
    torch.testing.assert_close(old, scored.token_logps, atol=1e-5, rtol=0)  # so ρ starts at 1 when μ > 1


def per_row(scored) -> list[list[float]]:
    """Each row's completion-token log-probs as a list (the two forwards lay their columns out differently)."""
    values, mask = scored.token_logps.tolist(), scored.mask.tolist()
    return [[v for v, m in zip(row, row_mask, strict=True) if m] for row, row_mask in zip(values, mask, strict=True)]


def test_shared_prompt_forward_matches_the_full_forward(model_dir, tokenizer):
    """Each prompt once, its cache shared by its G rows: the same log-probs and the same gradients."""
    model, examples = rollout_examples(model_dir, tokenizer)
    batch = collate_rollout(examples, tokenizer.pad_token_id)
    results = []
    for forward in (
        lambda: completion_logps(model, batch),
        lambda: grouped_completion_logps(model, batch["prompt_ids"], batch["completion_ids"], tokenizer.pad_token_id),
    ):
        model.zero_grad()
        scored = forward()
        weights = aligned([[1.0 + 0.1 * t for t in range(len(ids))] for ids in batch["completion_ids"]], scored.mask)
        (scored.token_logps * weights).sum().backward()  # position-dependent, so a shifted column would show
        results.append((per_row(scored), torch.cat([p.grad.flatten() for p in model.parameters()])))
    (full_values, full_gradient), (shared_values, shared_gradient) = results
    assert [len(row) for row in shared_values] == [len(e["completion_ids"]) for e in examples]
    for full_row, shared_row in zip(full_values, shared_values, strict=True):
        assert shared_row == pytest.approx(full_row, abs=1e-5)
    assert full_gradient.abs().max() > 0
    torch.testing.assert_close(shared_gradient, full_gradient, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("loss_type", "share_prompt"), [("grpo", True), ("dapo", True), ("dr_grpo", True), ("dapo", False)])
def test_accumulation_gives_the_gradient_of_one_batch(tmp_path, model_dir, tokenizer, loss_type, share_prompt):
    """Micro-batches of 5, 5 and 2 completions update exactly like one batch of 12 (plain SGD, no clipping)."""
    updates = []
    for micro in (12, 5):
        model, examples = rollout_examples(model_dir, tokenizer)
        config = make_config(model_dir, tmp_path, loss_type=loss_type, share_prompt=share_prompt, max_new_tokens=6, train={"batch_size": micro, "max_grad_norm": 0.0})
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer_step(model, optimizer, scheduler, examples, config, tokenizer.pad_token_id, use_rollout_logps=False)
        updates.append(torch.cat([(before[n] - p.detach()).flatten() for n, p in model.named_parameters()]))
    assert updates[0].abs().max() > 0
    torch.testing.assert_close(updates[1], updates[0], atol=1e-6, rtol=1e-4)


def test_several_iterations_use_rollout_logprobs_and_clip(tmp_path, model_dir):
    config = make_config(model_dir, tmp_path / "mu", num_iterations=4, epsilon_low=0.01, epsilon_high=0.01, train={"max_steps": 4})
    result = grpo(config, dataset=prompts())
    # Pass 1 starts at π = π_old (ρ = 1); later passes move π away from the stored log-probs and clip.
    assert result.metrics[0]["clip_ratio/low_mean"] + result.metrics[0]["clip_ratio/high_mean"] == 0.0
    later = [m["clip_ratio/low_mean"] + m["clip_ratio/high_mean"] for m in result.metrics[1:]]
    assert max(later) > 0.0


def test_epochs_count_passes_over_the_prompts_with_several_iterations(tmp_path, model_dir):
    # 8 prompts, 8 completions a step = 2 prompts (G = 4): one epoch is 4 rollout batches, and with μ = 2
    # each feeds 2 optimizer steps, so 8 steps (not 4, which would see only half the prompts).
    config = make_config(model_dir, tmp_path / "epochs", num_iterations=2, train={"max_steps": 0, "epochs": 1.0})
    result = grpo(config, dataset=prompts(8), save=False)
    assert result.step == 8


# ----------------------------------------------------------------------------- DAPO options


def test_dynamic_sampling_drops_equal_groups_and_logs_a_short_batch(tmp_path, model_dir):
    rows = prompt_dataset("train", limit=64)
    config = make_config(model_dir, tmp_path / "dyn", reward_functions=["test_some_constant"], dynamic_sampling=True, max_sampling_rounds=1, train={"max_steps": 2, "batch_size": 16})
    result = grpo(config, dataset=rows)
    for metrics in result.metrics:
        assert metrics["dynamic_sampling/rounds"] == 1
        # Four prompts a step; groups whose answer is a multiple of 3 all score 1.0 and are dropped.
        assert metrics["groups_trained"] == 4 - metrics["frac_reward_zero_std"] * 4
    assert any(m["dynamic_sampling/short_batch"] == 1.0 for m in result.metrics)


def test_truncated_completions_can_be_masked(tmp_path, model_dir):
    config = make_config(model_dir, tmp_path / "trunc", max_new_tokens=1, mask_truncated_completions=True, train={"max_steps": 1})
    result = grpo(config, dataset=prompts())
    metrics = result.metrics[0]
    # With one new token almost every completion is cut; masked ones contribute no loss and no gradient.
    assert metrics["completions/clipped_ratio"] > 0.5
    if metrics["completions/clipped_ratio"] == 1.0:
        assert metrics["loss"] == 0.0 and metrics["grad_norm"] == 0.0


# ----------------------------------------------------------------------------- bad rewards and prompts


def test_a_reward_that_raises_drops_its_groups_and_counts_them(tmp_path, model_dir, caplog):
    config = make_config(model_dir, tmp_path / "raise", reward_functions=["test_fails_three"], train={"max_steps": 2, "batch_size": 16})
    result = grpo(config, dataset=prompts())
    failed = sum(m["rewards/failed_samples"] for m in result.metrics)
    dropped = sum(m["rewards/dropped_groups"] for m in result.metrics)
    assert failed == dropped * G and dropped > 0
    assert all(m["groups_trained"] + m["rewards/dropped_groups"] == 4 for m in result.metrics)
    assert "reward function 'test_fails_three' on prompt" in caplog.text and "multiples of 3" in caplog.text


def test_a_reward_that_is_always_nan_stops_with_a_clear_error(tmp_path, model_dir):
    config = make_config(model_dir, tmp_path / "nan", reward_functions=["test_nan"])
    with pytest.raises(TrainingError, match=r"no usable group .* optimizer step 1 .*'test_nan'.*not a finite number"):
        grpo(config, dataset=prompts())


def test_prompts_longer_than_the_context_are_dropped_and_counted_or_rejected(tmp_path, model_dir):
    rows = prompts(8).to_list()
    # 26 characters + 4 template tokens = 30 fits data.max_length = 32, but not with 4 new tokens in a context of 32.
    rows[0]["prompt"] = [{"role": "user", "content": "1+1 " * 6 + "+1"}]
    config = make_config(model_dir, tmp_path / "long", train={"max_steps": 1})
    grpo(config, dataset=datasets.Dataset.from_list(rows))
    stats = json.loads((tmp_path / "long" / "data_stats.json").read_text())
    assert stats["train"]["dropped_context"] == 1
    strict = make_config(model_dir, tmp_path / "long-strict", data=DataConfig(max_length=32, too_long_prompt="error"))
    with pytest.raises(DataError, match="train prompt 0 is 30 tokens; .* exceeds the model's context of 32"):
        grpo(strict, dataset=datasets.Dataset.from_list(rows))


def test_max_new_tokens_zero_fits_the_context_and_is_written_to_the_config(tmp_path, model_dir):
    rows = prompts(8).to_list()
    longest = max(len(ids) for ids in tokenize_prompts(datasets.Dataset.from_list(rows), build_char_tokenizer(), DataConfig())[0]["prompt_ids"])
    config = make_config(model_dir, tmp_path / "auto", max_new_tokens=0, train={"max_steps": 1})
    grpo(config, dataset=datasets.Dataset.from_list(rows))
    assert config.max_new_tokens == 32 - longest  # the tiny model's context is 32 tokens
    written = yaml.safe_load((tmp_path / "auto" / "config.yaml").read_text())
    assert written["max_new_tokens"] == 32 - longest
    assert default_max_new_tokens({"prompt_ids": [[1] * 10]}, None) == DEFAULT_MAX_NEW_TOKENS
    assert default_max_new_tokens({"prompt_ids": [[1] * 10]}, 1024) == DEFAULT_MAX_NEW_TOKENS
    with pytest.raises(ConfigError, match="max_new_tokens must be at least 1"):
        check_config(make_config(model_dir, tmp_path, max_new_tokens=-1))


def test_overlong_buffer_longer_than_the_fitted_max_new_tokens_is_a_config_error(tmp_path, model_dir):
    # max_new_tokens 0 resolves to what the 32-token context leaves (under 32), less than the buffer of 100.
    config = make_config(model_dir, tmp_path / "overlong", max_new_tokens=0, overlong_buffer=100)
    with pytest.raises(ConfigError, match=r"overlong_buffer 100 is longer than max_new_tokens \d+ \(fitted to the model's context"):
        grpo(config, dataset=prompts(8))


# ----------------------------------------------------------------------------- resume


def test_resume_repeats_the_uninterrupted_run(tmp_path, model_dir):
    def config_for(folder, **train):
        return make_config(model_dir, folder, beta=0.05, reward_functions=["test_interrupting"], train={"max_steps": 4, "save_every": 2, **train})

    INTERRUPT.update(at_call=None, calls=0)
    whole = grpo(config_for(tmp_path / "whole"), dataset=prompts())

    INTERRUPT.update(at_call=3, calls=0)  # the third rollout's scoring "kills" the process after the step-2 checkpoint
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
    pytest.importorskip("prefalign.rewards.scorer")
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    folder = tmp_path / "reward-model"
    classifier = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, num_labels=1, pad_token_id=tokenizer.pad_token_id,
    ))  # fmt: skip
    classifier.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    config = make_config(model_dir, tmp_path / "rm", reward_functions=[], reward_model=str(folder), train={"max_steps": 1})
    metrics = grpo(config, dataset=prompts(), save=False).metrics[0]
    name = f"rewards/reward_model:{folder}/mean"
    assert math.isfinite(metrics[name]) and metrics["reward"] == pytest.approx(metrics[name])
    assert metrics["frac_reward_zero_std"] == 0.0  # a continuous score separates every group


def test_lora_policy_trains_only_adapters(tmp_path, model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = apply_lora(AutoModelForCausalLM.from_pretrained(model_dir), ModelConfig(lora=True, lora_r=4))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    config = make_config(model_dir, tmp_path / "lora-only", train={"max_steps": 1})
    grpo(config, dataset=prompts(), model=model, tokenizer=tokenizer, save=False)
    assert all(torch.equal(frozen[n], p) for n, p in model.named_parameters() if n in frozen)


def test_cli_runs_grpo_and_reports_config_errors(tmp_path, model_dir, capsys):
    from prefalign.cli import main

    assert main(["grpo", "--num_generations", "1"]) == 2
    assert "num_generations (G) must be at least 2" in capsys.readouterr().err
    out = tmp_path / "cli"
    arguments = ["--model.name_or_path", model_dir, "--data.max_length", "32", "--max_eval_samples", "8", "--max_new_tokens", "4",
                 "--num_generations", "4", "--batch_size", "8", "--max_steps", "1", "--output_dir", str(out), "--progress", "false"]  # fmt: skip
    assert main(["grpo", *arguments]) == 0
    assert (out / "final" / "config.json").exists() and len(read_metrics(out)) == 2  # the step, then the final eval
