"""PPO on the RL core: the per-token reward layout, V_t read before y_t, accumulation equivalence, and a tiny
end-to-end run whose mean reward rises (bit-exact kill -9 resume: tests/runtime/test_resume.py)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

from prefalign import PPOConfig, ppo
from prefalign.algorithms.ppo import completion_score, token_rewards
from prefalign.config import DataConfig, ModelConfig, TrainConfig
from prefalign.data import collate_sft, tokenize_prompts
from prefalign.evaluation.policy import evaluate_policy
from prefalign.models.value_head import laid_out, token_values
from prefalign.rewards import WeightedRewards, register_reward_function
from prefalign.runtime.metrics import read_metrics
from prefalign.tasks.arithmetic import prompt_dataset
from tests.helpers import save_tiny_model


def test_per_token_rewards_put_the_kl_at_every_token_and_the_score_at_the_last():
    rewards, kl = token_rewards([-1.0, -2.0, -0.5], [-1.5, -1.0, -0.5], score=0.8, beta=0.1)
    # kl_t = old − ref = (0.5, −1.0, 0.0); r_t = −0.1·kl_t, and + 0.8 at the last token.
    assert rewards == pytest.approx([-0.05, 0.1, 0.8])
    assert kl == pytest.approx(-0.5)
    assert token_rewards([], [], score=1.0, beta=0.1) == ([], 0)
    # No EOS: the penalty replaces the score (N+ details); with no penalty set the reward stays.
    assert completion_score(0.7, ended=False, missing_eos_penalty=-1.0) == -1.0
    assert completion_score(0.7, ended=True, missing_eos_penalty=-1.0) == 0.7
    assert completion_score(0.7, ended=False, missing_eos_penalty=None) == 0.7


def test_values_are_read_at_the_position_before_each_completion_token():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, num_labels=1, pad_token_id=0,
    )
    critic = LlamaForSequenceClassification(config).eval()
    rows = [
        {"prompt_ids": [5, 6, 7], "completion_ids": [8, 9]},
        {"prompt_ids": [5], "completion_ids": [10, 11, 12]},
    ]
    batch = collate_sft(rows, 0)
    flat = token_values(critic, batch)
    expected = []
    for row in rows:
        ids = torch.tensor([row["prompt_ids"] + row["completion_ids"]])
        values = critic.score(critic.model(input_ids=ids).last_hidden_state)[0, :, 0]
        first = len(row["prompt_ids"])
        # V for y_t (at position first + t) comes from the state at first + t − 1.
        expected += values[first - 1 : first - 1 + len(row["completion_ids"])].tolist()
    assert flat.tolist() == pytest.approx(expected, abs=1e-5)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert laid_out(flat, mask)[0, 2] == 0 and laid_out(flat, mask)[1].tolist() == pytest.approx(expected[2:])


def digit_share(prompts, completions, **_columns):
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [sum(ch.isdigit() for ch in text) / max(len(text), 1) for text in texts]


register_reward_function("test_ppo_digits", digit_share)


def make_config(model_dir, output_dir, **changes) -> PPOConfig:
    train = {"output_dir": str(output_dir), "learning_rate": 3e-3, "batch_size": 16, "max_steps": 4,
             "progress": False, "log_every": 1, **changes.pop("train", {})}  # fmt: skip
    return PPOConfig(
        model=ModelConfig(name_or_path=model_dir, device="cpu"), data=DataConfig(max_length=32),
        train=TrainConfig(**train), reward_functions=["test_ppo_digits"], max_new_tokens=6, num_iterations=2,
        missing_eos_penalty=None, generation_batch_size=16, **changes,
    )  # fmt: skip


def test_mean_reward_rises_and_the_run_folder_holds_policy_and_critic(tmp_path):
    model_dir = str(save_tiny_model(tmp_path / "model"))
    config = make_config(model_dir, tmp_path / "run", train={"max_steps": 40}, kl_target=1.0,
                         monitor_functions=["exact_match"])  # fmt: skip
    result = ppo(config, dataset=prompt_dataset("train", limit=512))
    scores = [m["objective/scores"] for m in result.metrics if "objective/scores" in m]
    assert sum(scores[-10:]) / 10 > sum(scores[:10]) / 10 + 0.08, scores
    last = result.metrics[-1]
    for key in ("objective/kl", "objective/entropy", "policy/entropy_avg", "objective/non_score_reward",
                "objective/rlhf_reward", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg",
                "loss/value_avg", "val/clipfrac_avg", "val/ratio", "val/num_eos_tokens", "beta",
                "monitor/exact_match/mean"):  # fmt: skip
        assert key in last and math.isfinite(last[key]), key
    betas = [m["beta"] for m in read_metrics(tmp_path / "run")]
    assert betas[0] == 0.05 and len(set(betas)) > 1  # the adaptive controller moved β
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
    assert (tmp_path / "run" / "final" / "critic" / "config.json").exists()


def test_accumulation_gives_the_update_of_one_batch(tmp_path):
    """The same rollout batch (16 completions) as one micro-batch or four: the same losses and weights."""
    model_dir = str(save_tiny_model(tmp_path / "model"))
    runs = {}
    for name, train in {"one": {"batch_size": 16}, "four": {"batch_size": 4, "grad_accum": 4}}.items():
        config = make_config(model_dir, tmp_path / name, train={**train, "max_steps": 2})
        config.share_prompt = name == "one"  # the padded and the shared-prompt forward must agree too
        result = ppo(config, dataset=prompt_dataset("train", limit=64))
        runs[name] = result
    for one, four in zip(runs["one"].metrics, runs["four"].metrics, strict=True):
        for key in ("loss", "loss/policy_avg", "loss/value_avg", "grad_norm", "objective/scores"):
            assert four[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key
    from safetensors.torch import load_file

    one = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    four = load_file(str(tmp_path / "four" / "final" / "model.safetensors"))
    # atol: AdamW (lr 3e-3) divides by sqrt(v), so a weight whose gradient is near zero turns float32
    # rounding of the two layouts into update differences (6e-6 on 1 of 2,048 weights in one draw).
    for name, tensor in one.items():
        torch.testing.assert_close(four[name], tensor, rtol=1e-4, atol=1e-5)


def test_evaluations_log_the_kl_to_the_starting_policy(tmp_path):
    """eval/kl (the name GRPO logs too) at each evaluation; the final one equals evaluate_policy's KL of the
    saved policy to the model the run started from, worked out apart from the run."""
    model_dir = str(save_tiny_model(tmp_path / "model"))
    eval_dataset = prompt_dataset("held_out", limit=8)
    config = make_config(model_dir, tmp_path / "run", train={"max_steps": 4, "eval_every": 2})
    result = ppo(config, dataset=prompt_dataset("train", limit=64), eval_dataset=eval_dataset)
    evaluations = [m for m in result.metrics if "eval/accuracy" in m]
    assert [m["step"] for m in evaluations] == [2, 4] and all("eval/kl" in m for m in evaluations)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenized, _ = tokenize_prompts(eval_dataset, tokenizer, DataConfig(max_length=32))
    expected = evaluate_policy(
        AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final"), tokenizer, tokenized,
        WeightedRewards(["test_ppo_digits"]), k=0, max_new_tokens=6, seed=config.train.seed,
        reference=AutoModelForCausalLM.from_pretrained(model_dir),
    )  # fmt: skip
    assert evaluations[-1]["eval/kl"] == pytest.approx(expected["kl"], rel=1e-5, abs=1e-6)
    assert abs(expected["kl"]) > 1e-3  # the policy moved: a KL to itself would be ~0
