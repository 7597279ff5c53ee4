"""Every bad value is refused before work starts (issue 15): the mistakes people make, through the command
line and the public functions. Each exits with a message that names the option, shows no traceback, and
loads no model and no data; then the cross-field rules one by one, and what an internal error (a bug)
prints."""

from __future__ import annotations

import pytest
import torch
import transformers

import prefalign
from prefalign.algorithms.dpo import DPOConfig
from prefalign.algorithms.grpo_config import GRPOConfig
from prefalign.algorithms.rejection_sampling_config import RejectionSamplingConfig, SampleConfig
from prefalign.algorithms.reward_model import RewardConfig
from prefalign.algorithms.sft import SFTConfig
from prefalign.cli import main
from prefalign.commands.demo import DemoConfig
from prefalign.commands.dpo import DPOCommandConfig
from prefalign.commands.eval import EvalConfig
from prefalign.commands.reward import EvalRewardConfig
from prefalign.commands.score import ScoreConfig
from prefalign.config import DataConfig, ModelConfig, TrainConfig, validate
from prefalign.errors import ConfigError
from prefalign.recipes.base_model import BaseConfig
from prefalign.recipes.iterative_dpo import IterativeDPOConfig

# Were a check skipped, loading this would fail with a message about the model, not about the option.
MISSING = "/nonexistent/prefalign-model"
MODEL = ["--model.name_or_path", MISSING]

# (arguments, words the message must hold)
MISTAKES = [
    (["sft", *MODEL, "--train.log_every", "0"], ["train.log_every", "at least 1"]),
    (["dpo", *MODEL, "--train.learning_rate", "-1"], ["train.learning_rate", "> 0"]),
    (["dpo", *MODEL, "--train.learning_rate", "nan"], ["train.learning_rate", "got nan"]),
    (["sft", *MODEL, "--train.learning_rate", "inf"], ["train.learning_rate", "finite"]),
    (["dpo", *MODEL, "--train.adam_beta1", "1.5"], ["train.adam_beta1", "in [0, 1)"]),
    (["dpo", *MODEL, "--model.device", "cuda"], ["model.device", "torch.cuda.is_available() is False"]),
    (["dpo", *MODEL, "--model.device", "tpu9"], ["model.device", "not a device name"]),
    (["sft", *MODEL, "--data.columns", "{a: b"], ["data.columns", "{a: b, c: d}"]),
    (["sft", *MODEL, "--lora_target_modules", "[q_proj, v_proj"], ["model.lora_target_modules", "[a, b]"]),
    (["grpo", *MODEL, "--top_p", "0"], ["top_p", "in (0, 1]"]),
    (["grpo", *MODEL, "--top_k", "-1"], ["top_k", "at least 0"]),
    (["grpo", *MODEL, "--num_generations", "3"], ["num_generations", "train.batch_size"]),
    (["grpo", *MODEL, "--reward_functions", "no_such_reward"], ["reward_functions", "no_such_reward"]),
    (["sample", *MODEL, "--sampling.temperature", "-1"], ["sampling.temperature", ">= 0"]),
    (["sample", *MODEL, "--sampling.max_new_tokens", "0"], ["sampling.max_new_tokens", "at least 1"]),
    (["sample", *MODEL, "--sampling.top_p", "2"], ["sampling.top_p", "in (0, 1]"]),
    (["sample", *MODEL, "--sampling.reward_weights", "1,2"], ["sampling.reward_weights"]),
    (["reward", *MODEL, "--train.batch_size", "0"], ["train.batch_size", "at least 1"]),
    (["sft", *MODEL, "--train.max_steps", "-1"], ["train.max_steps", "at least 0"]),
    (["sft", *MODEL, "--epochs", "0", "--max_steps", "0"], ["train.epochs", "train.max_steps"]),
    (["dpo", *MODEL, "--weight_decay", "-1"], ["train.weight_decay", ">= 0"]),
    (["dpo", *MODEL, "--save_every", "-1"], ["train.save_every", "at least 0"]),
    (["dpo", *MODEL, "--warmup_ratio", "2"], ["train.warmup_ratio", "in [0, 1]"]),
    (["dpo", *MODEL, "--max_grad_norm", "-1"], ["train.max_grad_norm", ">= 0"]),
    (["sft", *MODEL, "--data.eval_fraction", "1.5"], ["data.eval_fraction", "in [0, 1)"]),
    (["sft", *MODEL, "--merge_lora"], ["model.merge_lora", "model.lora"]),
    (["dpo", *MODEL, "--loss_type", "simpo", "--reference", "org/reference"], ["reference", "loss_type"]),
    (["dpo", *MODEL, "--reference", "/nonexistent/reference"], ["reference", "does not exist"]),
    (["dpo", *MODEL, "--loss_type", "simpo", "--reference", "/nonexistent/reference"], ["reference"]),
    (["dpo", *MODEL, "--loss_type", "ipo", "--label_smoothing", "0.1"], ["label_smoothing", "no effect"]),
    (["dpo", *MODEL, "--rounds", "0"], ["rounds", "at least 1"]),
    (["dpo", *MODEL, "--rounds", "3", "--sampling.strategy", "best_of_n"], ["sampling.strategy"]),
    (["eval", *MODEL, "--k", "-1"], ["k must be at least 0"]),
    (["eval", *MODEL, "--max_new_tokens", "0"], ["max_new_tokens", "at least 1"]),
    (["eval-reward", "--model", MISSING, "--batch_size", "0"], ["batch_size", "at least 1", "model"]),
    (["eval-reward", "--device", "tpu9"], ["device", "not a device name"]),
    (["score", "--model", MISSING, "--data", "rows.jsonl", "--batch_size", "0"], ["batch_size"]),
    (["score", "--model", MISSING, "--data", "rows.jsonl", "--device", "cuda:x"], ["device"]),
    (["demo", "--eval_prompts", "0"], ["eval_prompts", "at least 1"]),
    (["demo", "--stages", "base,nope"], ["stages", "'nope'"]),
    (["base", "--num_heads", "3"], ["hidden_size", "num_heads"]),
    (["base", "--num_threads", "0"], ["num_threads", "at least 1"]),
]


@pytest.fixture
def nothing_loads(monkeypatch, tmp_path):
    """Every way a command loads a model or the built-in data records the call (and fails); no CUDA."""
    calls: list[str] = []

    def refuse(what):
        def load(*args, **kwargs):
            calls.append(what)
            raise AssertionError(f"{what} was loaded")

        return load

    for cls in (
        transformers.AutoModelForCausalLM, transformers.AutoModelForSequenceClassification,
        transformers.AutoTokenizer,
    ):
        monkeypatch.setattr(cls, "from_pretrained", refuse(cls.__name__))
    import prefalign.commands.base
    import prefalign.commands.builtin
    import prefalign.commands.demo_stages

    for module in (prefalign.commands.base, prefalign.commands.builtin, prefalign.commands.demo_stages):
        monkeypatch.setattr(module, "ensure_base_model", refuse("the built-in base model"))
    monkeypatch.setattr(prefalign.commands.builtin, "builtin_rows", refuse("the built-in data"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)  # nothing may be written either
    return calls


@pytest.mark.parametrize(
    ("arguments", "words"), MISTAKES,
    ids=[" ".join(arguments).replace(f" {' '.join(MODEL)}", "") for arguments, _ in MISTAKES],
)
def test_a_mistaken_command_is_refused_up_front(arguments, words, nothing_loads, capsys, tmp_path):
    assert main(arguments) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"prefalign {arguments[0]}: error: "), err
    for word in words:
        assert word in err, f"{word!r} not in: {err}"
    assert "Traceback" not in err
    assert nothing_loads == []
    assert list(tmp_path.iterdir()) == []  # no run folder, no output


# The public functions check the same way (the CLI is only a parser in front of them).
def _with(config, **changes):
    for dotted, value in changes.items():
        target = config
        *parents, leaf = dotted.split(".")
        for part in parents:
            target = getattr(target, part)
        setattr(target, leaf, value)
    return config


PUBLIC = [
    ("sft", _with(SFTConfig(), **{"model.name_or_path": MISSING, "train.log_every": 0}), "train.log_every"),
    ("dpo", _with(DPOConfig(), **{"model.name_or_path": MISSING, "train.adam_beta2": 1.0}), "adam_beta2"),
    ("dpo", _with(IterativeDPOConfig(), **{"model.name_or_path": MISSING, "sampling.top_k": -1}), "top_k"),
    ("grpo", _with(GRPOConfig(), **{"model.name_or_path": MISSING, "temperature": float("nan")}), "temper"),
    ("sample", _with(SampleConfig(), **{"model.name_or_path": MISSING, "sampling.n": 0}), "sampling.n"),
    ("reward", _with(RewardConfig(), **{"model.name_or_path": MISSING, "eval_batch_size": 0}), "eval_batch"),
    ("evaluate", _with(EvalConfig(), **{"model.name_or_path": MISSING, "top_p": 0.0}), "top_p"),
    ("eval_reward", EvalRewardConfig(model=MISSING), "model"),
    ("score", ScoreConfig(model=MISSING, data="rows.jsonl", num_threads=-1), "num_threads"),
    ("demo", DemoConfig(seed=-1), "seed"),
    ("base", BaseConfig(hidden_size=100, num_heads=3), "num_heads"),
]


@pytest.mark.parametrize(("function", "config", "key"), PUBLIC, ids=[name for name, _, _ in PUBLIC])
def test_the_public_functions_refuse_the_same(function, config, key, nothing_loads, tmp_path):
    with pytest.raises(ConfigError, match=key):
        getattr(prefalign, function)(config)
    assert nothing_loads == []
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- cross-field rules


def _refused(config, *words):
    with pytest.raises(ConfigError) as caught:
        validate(config)
    for word in words:
        assert word in str(caught.value), f"{word!r} not in: {caught.value}"


def test_train_section_needs_something_to_train():
    _refused(SFTConfig(train=TrainConfig(epochs=0, max_steps=0)), "train.epochs", "train.max_steps")
    validate(SFTConfig(train=TrainConfig(epochs=0, max_steps=5)))  # epochs are ignored when max_steps > 0


def test_model_section_rules():
    _refused(SFTConfig(model=ModelConfig(merge_lora=True)), "model.merge_lora", "model.lora")
    validate(SFTConfig(model=ModelConfig(lora=True, merge_lora=True)))
    _refused(SFTConfig(model=ModelConfig(lora=True, lora_target_modules=[])), "model.lora_target_modules")


def test_data_section_refuses_an_eval_fraction_that_would_do_nothing():
    _refused(SFTConfig(data=DataConfig(eval_path=["held.jsonl"], eval_fraction=0.1)), "data.eval_fraction")


def test_grpo_rules():
    _refused(GRPOConfig(num_generations=3), "num_generations = 3", "train.batch_size")
    validate(GRPOConfig(num_generations=4))
    _refused(GRPOConfig(max_new_tokens=8, overlong_buffer=9), "overlong_buffer")
    validate(GRPOConfig(max_new_tokens=0, overlong_buffer=9))  # bounded once fitted to the context
    _refused(GRPOConfig(reward_weights=[1.0, 2.0]), "reward_weights has 2 values for 1")
    _refused(GRPOConfig(reward_functions=[]), "needs a reward")
    validate(GRPOConfig(reward_functions=[], reward_model="org/reward-model"))
    _refused(GRPOConfig(reward_functions=["nope"]), "reward_functions", "unknown reward function 'nope'")
    validate(GRPOConfig(reward_functions=[lambda prompts, completions, **_: [1.0] * len(prompts)]))


def test_dpo_rules():
    _refused(DPOConfig(loss_type=["simpo"], reference="org/reference"), "reference", "loss_type", "simpo")
    validate(DPOConfig(loss_type=["sigmoid"], reference="org/reference"))
    _refused(DPOConfig(loss_type=["robust"], label_smoothing=0.5), "< 0.5")
    _refused(DPOConfig(loss_type=["sigmoid", "hinge"], loss_weights=[1.0]), "loss_weights")


def test_the_dpo_command_applies_the_iterative_rules_only_with_rounds():
    one_round = DPOCommandConfig(train=TrainConfig(resume=True))
    validate(one_round)  # plain DPO may resume
    _refused(DPOCommandConfig(rounds=2, train=TrainConfig(resume=True)), "resume is not supported")
    _refused(DPOCommandConfig(rounds=2, round_reference="previous", reference="org/ref"), "round_reference")
    _refused(IterativeDPOConfig(rounds=1), "rounds must be at least 2")


def test_sampling_rules():
    _refused(SampleConfig(sampling=RejectionSamplingConfig(n=1)), "sampling.n", "needs at least 2 samples")
    validate(SampleConfig(sampling=RejectionSamplingConfig(n=1, strategy="best_of_n")))
    _refused(SampleConfig(sampling=RejectionSamplingConfig(stop_strings=[""])), "sampling.stop_strings")
    _refused(SampleConfig(sampling=RejectionSamplingConfig(reward_functions=[])), "sampling.reward_functions")
    _refused(IterativeDPOConfig(sampling=_with(IterativeDPOConfig().sampling, n=1)), "sampling.n")


def test_other_command_rules():
    _refused(EvalConfig(reward_weights=[1.0, 1.0]), "reward_weights")
    _refused(DemoConfig(stages=["base", "kto"]), "'kto'", "stages")
    _refused(BaseConfig(hidden_size=130, num_heads=4), "hidden_size", "num_heads")


# ----------------------------------------------------------------------------- a bug is not a mistake


def test_an_internal_error_keeps_its_traceback_and_asks_for_a_report(monkeypatch, capsys):
    import prefalign.commands.env

    def broken(config=None):
        raise RuntimeError("something prefalign did not expect")

    monkeypatch.setattr(prefalign.commands.env, "env", broken)
    assert main(["env"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: something prefalign did not expect" in err
    assert "bug in prefalign" in err and "`prefalign env`" in err
