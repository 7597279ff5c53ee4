"""What the GRPO tests share: reward functions registered under test names, the tiny policy's config, and
plain recomputations of a GRPO step to compare the trainer against."""

from __future__ import annotations

import math

import torch
from transformers import AutoModelForCausalLM

import prefalign.algorithms.grpo as grpo_module
from prefalign.algorithms.grpo_config import GRPOConfig
from prefalign.config import DataConfig, ModelConfig, TrainConfig
from prefalign.rewards import register_reward_function
from prefalign.tasks.arithmetic import prompt_dataset

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


def text_length(prompts, completions, **_columns):
    """A tenth of the completion's length in characters (the gold monitor's test function)."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [len(text) / 10 for text in texts]


for _name, _function in {
    "test_digit_share": digit_share,
    "test_text_length": text_length,
    "test_interrupting": interrupting_digit_share,
    "test_some_constant": some_groups_constant,
    "test_fails_three": fails_on_multiples_of_three,
    "test_nan": always_nan,
    "test_char_codes_unless_three": char_codes_unless_three,
}.items():
    register_reward_function(_name, _function)


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
