"""GRPO through its entry point on a tiny random model: config errors, metrics and the run folder, reference
handling, accumulation, old log-probs, dynamic sampling, failing rewards, too-long prompts, exact resume."""

from __future__ import annotations

import json
import math

import datasets
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, BloomConfig, BloomForCausalLM

import prefalign.algorithms.grpo as grpo_module
from prefalign.algorithms.grpo import grpo
from prefalign.algorithms.grpo_config import DEFAULT_MAX_NEW_TOKENS, GRPOConfig
from prefalign.config import DataConfig, ModelConfig, TrainConfig
from prefalign.data import tokenize_prompts
from prefalign.errors import ConfigError, DataError, TrainingError
from prefalign.models.loading import apply_lora
from prefalign.recipes.base_model import BaseConfig
from prefalign.rewards import register_reward_function
from prefalign.runtime.metrics import read_metrics
from prefalign.tasks.arithmetic import prompt_dataset
from prefalign.tasks.model import new_model
from prefalign.tasks.tokenizer import build_char_tokenizer
from tests.helpers import saved_classifier

G = 4
TINY = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
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


def char_codes_unless_three(prompts, completions, answer, **_columns):
    """Constant 1.0 when the answer is a multiple of 3 (a zero-std group), else a value of the text that
    differs between different completions (its characters' codes)."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    pairs = zip(texts, answer, strict=True)
    return [1.0 if int(a) % 3 == 0 else sum(map(ord, text)) / 1000 for text, a in pairs]


for _name, _function in {
    "test_digit_share": digit_share,
    "test_interrupting": interrupting_digit_share,
    "test_some_constant": some_groups_constant,
    "test_fails_three": fails_on_multiples_of_three,
    "test_nan": always_nan,
    "test_char_codes_unless_three": char_codes_unless_three,
}.items():
    register_reward_function(_name, _function)


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("tiny-policy")
    new_model(BaseConfig(**TINY, max_position_embeddings=32), tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def make_config(model_dir, output_dir, **overrides) -> GRPOConfig:
    train = dict(
        output_dir=str(output_dir), learning_rate=1e-2, batch_size=8, max_steps=3, progress=False, seed=3
    )
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


class CopyWatch:
    """A forward pre-hook that does nothing but count the deep copies of the module it is registered on
    (copy.deepcopy copies a module's hooks with it): a frozen copy of the policy is a reference model."""

    def __init__(self):
        self.copies = 0

    def __call__(self, module, args):
        return None

    def __deepcopy__(self, memo):
        self.copies += 1
        return self


class StepSpy:
    """Records each optimizer step's micro-batches and the weights the policy had when the step scored them:
    GRPO's prepare_step (`step_totals`) runs right before a step's first forward pass, after the previous
    update. Nothing is changed; the tests recompute the step's numbers from these with their own forwards."""

    def __init__(self, monkeypatch, model):
        self.batches: list[list[dict]] = []
        self.weights: list[dict[str, torch.Tensor]] = []
        original = grpo_module.step_totals

        def spy(micro_batches):
            original(micro_batches)
            self.batches.append(micro_batches)
            self.weights.append({name: t.detach().clone() for name, t in model.state_dict().items()})

        monkeypatch.setattr(grpo_module, "step_totals", spy)

    def completions(self, step: int = 0):
        """(prompt_ids, completion_ids, advantage, trained, sampler_logps) of every completion of optimizer
        step `step`."""
        for batch in self.batches[step]:
            yield from zip(
                batch["prompt_ids"], batch["completion_ids"], batch["advantages"].tolist(),
                batch["trained"].tolist(), batch["sampler_logps"], strict=True,
            )  # fmt: skip


def plain_scores(model, prompt_ids, completion_ids, temperature: float):
    """Per-token log-probs and entropies (|y|,) of one completion at `temperature`, from a single unpadded
    forward of prompt + completion: the logits at position t score token t + 1, over the full vocabulary."""
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float() / temperature  # (|y|, vocab)
    log_probs = torch.log_softmax(logits, dim=-1)
    picked = log_probs.gather(1, torch.tensor(completion_ids).unsqueeze(1)).squeeze(1)
    return picked, -(log_probs.exp() * log_probs).sum(dim=-1)


def policy_with(model_dir, weights, tokenizer=None, eos_bias: float = 0.0):
    """A fresh copy of the tiny policy holding `weights` (None: its saved ones), optionally EOS-biased."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if weights is not None:
        model.load_state_dict(weights)
    return eos_likely(model, tokenizer, eos_bias) if eos_bias else model


@torch.no_grad()
def recompute_grpo_step(
    policy, old_policy, reference, spy: StepSpy, step: int, config: GRPOConfig
) -> dict[str, float]:
    """One optimizer step's loss and metrics worked out from the formulas with plain forwards of the models
    playing π, π_old (μ > 1: the policy before its rollout batch's first update) and π_ref: the k3 KL, the
    'grpo' (token mean per completion, then mean over the step's trained completions) or 'dapo' (token mean
    over the step's trained tokens) aggregation, and token means over the step's trained tokens for kl,
    entropy and the clip ratios."""
    assert config.loss_type in ("grpo", "dapo")
    low, high = 1 - config.epsilon_low, 1 + config.epsilon_high
    losses_, kls, entropies, clipped_low, clipped_high = [], [], [], [], []
    for prompt_ids, completion_ids, advantage, trained, _ in spy.completions(step):
        if not trained:
            continue
        logps, entropy = plain_scores(policy, prompt_ids, completion_ids, config.temperature)
        old, _ = plain_scores(old_policy, prompt_ids, completion_ids, config.temperature)
        ref, _ = plain_scores(reference, prompt_ids, completion_ids, config.temperature)
        ratio = torch.exp(logps - old)
        delta = ref - logps
        kl = torch.exp(delta) - delta - 1
        surrogate = torch.minimum(ratio * advantage, ratio.clamp(low, high) * advantage)
        losses_.append(-surrogate + config.beta * kl)
        kls.append(kl)
        entropies.append(entropy)
        clipped_low.append(((ratio < low) & (advantage < 0)).float())
        clipped_high.append(((ratio > high) & (advantage > 0)).float())
    per_sequence = config.loss_type == "grpo"
    loss = torch.stack([t.mean() for t in losses_]).mean() if per_sequence else torch.cat(losses_).mean()
    return {
        "loss": float(loss), "kl": float(torch.cat(kls).mean()),
        "entropy": float(torch.cat(entropies).mean()),
        "clip_ratio/low_mean": float(torch.cat(clipped_low).mean()),
        "clip_ratio/high_mean": float(torch.cat(clipped_high).mean()),
    }  # fmt: skip


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
    one copy is the reference."""
    for beta, copies in ((0.0, 0), (0.1, 1)):
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        watch = CopyWatch()
        model.register_forward_pre_hook(watch)
        config = make_config(model_dir, tmp_path / f"beta-{beta}", beta=beta, train={"max_steps": 1})
        metrics = grpo(config, dataset=prompts(), model=model, tokenizer=tokenizer, save=False).metrics[0]
        assert watch.copies == copies, beta
        assert ("kl" in metrics) == (beta > 0), beta


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


def test_second_pass_clips_and_its_kl_match_a_recomputation(tmp_path, model_dir, tokenizer, monkeypatch):
    """μ = 2 at temperature 0.7 with a KL term, 3 steps: steps 1 and 2 are the two passes over the first
    rollout batch (π_old = the policy before step 1), step 3 the first pass over the next one (π_old = the
    policy before step 3); π_ref is the starting policy throughout. Each step's loss, KL, entropy and clip
    ratios are recomputed from plain forwards of the weights in play: a wrong shift, mask, temperature,
    π_old or reference changes them."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    spy = StepSpy(monkeypatch, model)
    config = make_config(
        model_dir, tmp_path / "mu2", loss_type="grpo", beta=0.1, num_iterations=2, temperature=0.7,
        train={"max_steps": 3},
    )
    records = grpo(config, dataset=prompts(), model=model, tokenizer=tokenizer, save=False).metrics
    policies = [policy_with(model_dir, weights) for weights in spy.weights]
    for step, old in enumerate([0, 0, 2]):
        expected = recompute_grpo_step(policies[step], policies[old], policies[0], spy, step, config)
        for key, value in expected.items():
            assert records[step][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (step, key)
    first, second, third = records
    # First pass: π = π_old exactly, so nothing clips; π = π_ref, so the KL is 0 up to float noise.
    assert first["clip_ratio/region_mean"] == 0.0
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)
    # Second pass: the update moved π off π_old both ways, and away from the reference.
    assert second["clip_ratio/low_mean"] > 0.0 and second["clip_ratio/high_mean"] > 0.0
    assert second["kl"] > 1e-3
    # A new rollout batch: π_old is the policy again (nothing clips), the reference is still the start.
    assert third["clip_ratio/region_mean"] == 0.0 and third["kl"] > 1e-3
    # The sampler's log-probs at T = 0.7 are the training forward's at the same weights (π_old) ...
    assert first["rollout/logprob_diff_max"] < 1e-4 and third["rollout/logprob_diff_max"] < 1e-4
    # ... and the plain forward's, so both apply the temperature as the sampling did.
    with torch.no_grad():
        for prompt_ids, completion_ids, _, _, sampler_logps in spy.completions(0):
            logps, _ = plain_scores(policies[0], prompt_ids, completion_ids, config.temperature)
            torch.testing.assert_close(torch.tensor(sampler_logps), logps, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- accumulation and old log-probs


def eos_likely(model, tokenizer, bias: float = 3.5):
    """Add `bias` to the EOS logit of every forward pass (sampling and training alike), so completions end
    at different lengths instead of all running to max_new_tokens."""

    def hook(_module, _args, output):
        output.logits[..., tokenizer.eos_token_id] += bias
        return output

    model.register_forward_hook(hook)
    return model


def sgd_like(max_steps: int = 1, **train) -> dict:
    """Optimizer settings whose first step is a plain SGD step of rate 1. AdamW's first step moves each
    weight by lr · g / (|g| + ε); with ε = lr ≫ |g| that is g itself, so the weight change is the step's
    whole gradient, scale included (the usual first step, about lr · sign(g), would hide a scaled one).
    Later steps are a fixed function of the gradients so far (momentum), so equal gradients still give
    equal updates."""
    return dict(
        learning_rate=1e6, adam_epsilon=1e6, weight_decay=0.0, schedule="constant", warmup_ratio=0.0,
        max_grad_norm=0.0, max_steps=max_steps, **train,
    )


@pytest.mark.parametrize(
    ("loss_type", "share_prompt", "second_pass"),
    [
        ("grpo", True, False), ("dapo", True, False), ("dr_grpo", True, False), ("dapo", False, False),
        ("grpo", True, True), ("dapo", False, True),
    ],
)  # fmt: skip
def test_accumulation_gives_the_gradient_of_one_batch(
    tmp_path, model_dir, tokenizer, monkeypatch, loss_type, share_prompt, second_pass
):
    """Micro-batches of 3, 3 and 2 completions update exactly like one batch of 8: three prompts are sampled,
    dynamic sampling drops the one whose rewards are all equal (its answer is a multiple of 3), and the 8
    completions left have different lengths (EOS made likely). `second_pass`: μ = 2 and a k3 KL term
    (β = 0.1), so step 2 is a second pass over the same completions after an update, with ρ ≠ 1, clipping
    active and a positive KL, and each step's update is compared."""
    rows = prompts(64).to_list()
    multiples = [row for row in rows if int(row["answer"]) % 3 == 0]
    others = [row for row in rows if int(row["answer"]) % 3 != 0]
    dataset = datasets.Dataset.from_list([others[0], multiples[0], others[1]])
    extra = dict(num_iterations=2, beta=0.1) if second_pass else {}
    steps = 2 if second_pass else 1
    updates, records = [], []
    for micro, accumulation in ((12, 1), (3, 4)):
        model = eos_likely(AutoModelForCausalLM.from_pretrained(model_dir), tokenizer)
        spy = StepSpy(monkeypatch, model)
        config = make_config(
            model_dir, tmp_path / f"micro-{micro}", loss_type=loss_type, share_prompt=share_prompt,
            max_new_tokens=6, reward_functions=["test_char_codes_unless_three"], dynamic_sampling=True,
            max_sampling_rounds=1, train=sgd_like(steps, batch_size=micro, grad_accum=accumulation), **extra,
        )  # fmt: skip
        run_records = grpo(config, dataset=dataset, model=model, tokenizer=tokenizer, save=False).metrics
        weights = [*spy.weights, {name: t.detach().clone() for name, t in model.state_dict().items()}]
        names = [name for name, _ in model.named_parameters()]
        updates.append([
            torch.cat([(before[n] - after[n]).flatten() for n in names])
            for before, after in zip(weights[:-1], weights[1:], strict=True)
        ])  # fmt: skip
        records.append(run_records)
    assert [record["groups_trained"] for record in records[0] + records[1]] == [2] * 2 * steps  # 3, 3, 2
    assert records[0][0]["completions/min_length"] < records[0][0]["completions/max_length"]
    if second_pass:
        first, second = records[0]
        assert first["clip_ratio/region_mean"] == 0.0
        assert second["clip_ratio/low_mean"] > 0.0 and second["clip_ratio/high_mean"] > 0.0
        assert second["kl"] > 1e-3
    for step in range(steps):
        assert updates[0][step].abs().max() > 0
        torch.testing.assert_close(updates[1][step], updates[0][step], atol=1e-6, rtol=1e-4)
        assert records[1][step]["grad_norm"] == pytest.approx(records[0][step]["grad_norm"], rel=1e-4)
        if second_pass:
            for key in ("loss", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean"):
                assert records[1][step][key] == pytest.approx(records[0][step][key], rel=1e-4, abs=1e-6)


def test_several_iterations_use_rollout_logprobs_and_clip(tmp_path, model_dir):
    config = make_config(
        model_dir, tmp_path / "mu", num_iterations=4, epsilon_low=0.01, epsilon_high=0.01,
        train={"max_steps": 4},
    )
    result = grpo(config, dataset=prompts())
    # Pass 1 starts at π = π_old (ρ = 1); later passes move π away from the stored log-probs and clip.
    assert result.metrics[0]["clip_ratio/low_mean"] + result.metrics[0]["clip_ratio/high_mean"] == 0.0
    later = [m["clip_ratio/low_mean"] + m["clip_ratio/high_mean"] for m in result.metrics[1:]]
    assert max(later) > 0.0


def test_epochs_count_passes_over_the_prompts_with_several_iterations(tmp_path, model_dir):
    # 8 prompts, 8 completions a step = 2 prompts (G = 4): one epoch is 4 rollout batches, and with μ = 2
    # each feeds 2 optimizer steps, so 8 steps (not 4, which would see only half the prompts).
    config = make_config(
        model_dir, tmp_path / "epochs", num_iterations=2, train={"max_steps": 0, "epochs": 1.0}
    )
    result = grpo(config, dataset=prompts(8), save=False)
    assert result.step == 8


# ----------------------------------------------------------------------------- DAPO options


def test_dynamic_sampling_drops_equal_groups_and_logs_a_short_batch(tmp_path, model_dir):
    rows = prompt_dataset("train", limit=64)
    config = make_config(
        model_dir, tmp_path / "dyn", reward_functions=["test_some_constant"], dynamic_sampling=True,
        max_sampling_rounds=1, train={"max_steps": 2, "batch_size": 16},
    )
    result = grpo(config, dataset=rows)
    for metrics in result.metrics:
        assert metrics["dynamic_sampling/rounds"] == 1
        # Four prompts a step; groups whose answer is a multiple of 3 all score 1.0 and are dropped.
        assert metrics["groups_trained"] == 4 - metrics["frac_reward_zero_std"] * 4
    assert any(m["dynamic_sampling/short_batch"] == 1.0 for m in result.metrics)


def test_truncated_completions_can_be_masked(tmp_path, model_dir):
    config = make_config(
        model_dir, tmp_path / "trunc", max_new_tokens=1, mask_truncated_completions=True,
        train={"max_steps": 1},
    )
    result = grpo(config, dataset=prompts())
    metrics = result.metrics[0]
    # With one new token every completion is cut here; masked ones contribute no loss and no gradient.
    assert metrics["completions/clipped_ratio"] == 1.0
    assert metrics["loss"] == 0.0 and metrics["grad_norm"] == 0.0


@pytest.mark.parametrize(("loss_type", "share_prompt"), [("grpo", True), ("dapo", False)])
def test_masked_truncated_completions_leave_the_loss_and_update_of_the_others(
    tmp_path, model_dir, tokenizer, monkeypatch, loss_type, share_prompt
):
    """Some completions end with EOS, some are cut at max_new_tokens (EOS made likely; temperature 0.7). The
    logged loss and the update (one SGD step of rate 1: the gradient) equal those worked out by hand over
    the untruncated completions only, with plain forwards, normalised by their count (grpo) or their tokens
    (dapo); the truncated ones have nonzero advantages, so training on them would change both. Both training
    forwards: each prompt once for its group (share_prompt) and padded rows."""
    bias, max_new_tokens, temperature = 3.0, 3, 0.7
    model = eos_likely(AutoModelForCausalLM.from_pretrained(model_dir), tokenizer, bias)
    spy = StepSpy(monkeypatch, model)
    config = make_config(
        model_dir, tmp_path / "mixed", max_new_tokens=max_new_tokens, mask_truncated_completions=True,
        temperature=temperature, loss_type=loss_type, share_prompt=share_prompt, train=sgd_like(batch_size=8),
    )
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    [record] = grpo(config, dataset=prompts(), model=model, tokenizer=tokenizer, save=False).metrics
    update = torch.cat([(before[name] - p.detach()).flatten() for name, p in model.named_parameters()])
    completions = list(spy.completions(0))
    # Truncated: max_new_tokens tokens and no EOS at the end.
    cut = [len(ids) == max_new_tokens and ids[-1] != tokenizer.eos_token_id for _, ids, *_ in completions]
    assert 0 < sum(cut) < len(cut)
    assert record["completions/clipped_ratio"] == pytest.approx(sum(cut) / len(cut))
    kept = [c for c, is_cut in zip(completions, cut, strict=True) if not is_cut]
    assert any(c[2] != 0 for c, is_cut in zip(completions, cut, strict=True) if is_cut)

    def surrogate(chosen, policy=None):
        """−(1/N) Σ_i A_i mean_t ρ_it (grpo) or −(1/N_tok) Σ_i Σ_t A_i ρ_it (dapo) over `chosen`, with
        ρ = exp(log π − log π detached): 1 in value, ∇ log π in gradient."""
        terms = []
        for prompt_ids, ids, advantage, *_ in chosen:
            if policy is None:  # the value only: ρ = 1
                logps = torch.zeros(len(ids))
            else:
                logps = plain_scores(policy, prompt_ids, ids, temperature)[0]
            terms.append(-advantage * torch.exp(logps - logps.detach()))
        if loss_type == "grpo":
            return torch.stack([t.mean() for t in terms]).sum() / len(terms)
        return torch.cat(terms).sum() / sum(len(t) for t in terms)

    assert record["loss"] == pytest.approx(float(surrogate(kept)), abs=1e-6)

    def gradient(chosen) -> torch.Tensor:
        policy = policy_with(model_dir, None, tokenizer, eos_bias=bias)
        surrogate(chosen, policy).backward()
        return torch.cat([p.grad.flatten() for _, p in policy.named_parameters()])

    torch.testing.assert_close(update, gradient(kept), atol=1e-6, rtol=1e-4)
    assert not torch.allclose(update, gradient(completions), atol=1e-4)  # the masked ones would count
    # π = π_old here, so the loss compares the sampler's log-probs with the training forward's at T = 0.7.
    assert record["rollout/logprob_diff_max"] < 1e-4


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
