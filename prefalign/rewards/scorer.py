"""Reward-model scores: one interface that rejection sampling, GRPO and PPO call, and `prefalign score`.

    scorer = RewardModelScorer("runs/reward/final")
    scorer.score(prompts, completions)            # -> list[float], batched, no gradients
    WeightedRewards([scorer.as_reward_function()])  # TRL signature fn(prompts, completions, **columns)
    `prefalign score --model DIR --data FILE` (prefalign/commands/score.py) writes a scored copy of a file.

How a (prompt, completion) becomes the sequence a reward model reads (prefalign.rewards.encoding) — training
(`encode_pairs`) and scoring (`encode_completions`) share these steps, so a saved model scores exactly what it
learned on:
1. Conversations are rendered by the tokenizer's chat template or, for a backbone without one, by the
   plain-text rendering `render_plain` ("User: ...\\nAssistant: ..."), through the data layer's `render=`
   hook. Which one is saved with the model (`prefalign_reward.json`) and read back by the scorer.
2. The data layer tokenizes prompt and completion (BOS at most once, EOS once). The tokenizer's own special
   tokens around a text ([CLS] ... [SEP] for BERT-style encoders) are added when missing.
3. A sequence longer than `max_length` is cut from the LEFT, keeping its leading special tokens: the final
   turns, where chosen and rejected differ, survive.
The score is the model's own output `logits[:, 0]`: a decoder reads it at the last non-padding token by
transformers' rule (the rightmost token that is not `config.pad_token_id`, so with pad = EOS a final EOS is
skipped), an encoder at its pooled first token. Going through the model's forward keeps our scores equal to
plain transformers' by construction.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from prefalign.config import ModelConfig
from prefalign.errors import ConfigError, ModelError
from prefalign.models.loading import load_sequence_classifier, model_device
from prefalign.rewards.encoding import (
    RewardSettings,
    collate_sequences,
    encode_completions,
)

logger = logging.getLogger("prefalign")

def reward_scores(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(rows,) scores of a collated batch through the model's own forward (its rule for which token)."""
    device = model_device(model)
    logits = model(
        input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
    ).logits  # (rows, 1)
    return logits[:, 0]


# ----------------------------------------------------------------------------- loading


def check_single_label(path: str, *, trust_remote_code: bool = False) -> None:
    """A folder that already is a sequence classifier must have exactly one label (a scalar reward)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as error:  # noqa: BLE001 - one actionable message for every failure
        where = "a local folder" if Path(path).exists() else "a hub name (needs network) or a local folder"
        raise ModelError(
            f"could not read a model config from {path!r} (read as {where}): "
            f"{type(error).__name__}: {error}. Point it at a folder saved with save_pretrained "
            "(config.json, weights, tokenizer files)."
        ) from error
    architectures = getattr(config, "architectures", None) or []
    is_classifier = any(name.endswith("ForSequenceClassification") for name in architectures)
    if is_classifier and config.num_labels != 1:
        raise ModelError(
            f"{path!r} is a sequence-classification model with {config.num_labels} labels "
            f"({architectures[0]}); a reward model has one scalar output. Use a one-label reward model, "
            "or train one from a base model with `prefalign reward`."
        )


def load_reward_backbone(config: ModelConfig, *, trainable: bool = True):
    """(model, tokenizer): a one-label sequence classifier whose config pads with the tokenizer's pad id."""
    from prefalign.models.loading import resolve_model_path

    check_single_label(resolve_model_path(config.name_or_path), trust_remote_code=config.trust_remote_code)
    model, tokenizer = load_sequence_classifier(config, num_labels=1, trainable=trainable)
    align_pad_token(model, tokenizer)
    return model, tokenizer


def align_pad_token(model: Any, tokenizer: Any) -> None:
    """The score token is found through config.pad_token_id, so it must be the id batches are padded with;
    the key-value cache is never useful for scoring."""
    base_config = model.config
    if tokenizer.pad_token_id is None:
        raise ModelError("the tokenizer has no pad token and no EOS to use as one; set tokenizer.pad_token")
    base_config.pad_token_id = tokenizer.pad_token_id
    if hasattr(base_config, "use_cache"):
        base_config.use_cache = False


# ----------------------------------------------------------------------------- the scorer


class RewardModelScorer:
    """Scores of (prompt, completion) pairs from a reward model folder (or a model + tokenizer in memory).

    prompts and completions: strings or {role, content} message lists, as in the data formats. Scores
    are computed without gradients, batch_size sequences at a time, longest first (sorted by length so
    each batch pads little), and returned in the input order. `normalize=True` returns
    (score - mean) / std with the training data's statistics from prefalign_reward.json.
    """

    def __init__(
        self,
        model_dir_or_model: Any,
        tokenizer: Any = None,
        *,
        batch_size: int = 64,
        device: str | None = None,
        settings: RewardSettings | None = None,
        normalize: bool = False,
    ):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        if isinstance(model_dir_or_model, (str, Path)):
            path = str(model_dir_or_model)
            if not Path(path).exists():
                raise ModelError(
                    f"reward model folder {path!r} does not exist; give the final/ folder of "
                    "a `prefalign reward` run"
                )
            config = ModelConfig(name_or_path=path, device=device or "auto")
            self.model, self.tokenizer = load_reward_backbone(config, trainable=False)
            self.settings = (
                settings or RewardSettings.from_folder(Path(path), self.tokenizer, self.model.config)
            )
            self.name = f"reward_model:{path}"
        else:
            if tokenizer is None:
                raise ConfigError(
                    "RewardModelScorer(model, tokenizer): give the tokenizer with an in-memory model"
                )
            self.model, self.tokenizer = model_dir_or_model, tokenizer
            if device is not None:
                self.model.to(device)
            align_pad_token(self.model, self.tokenizer)
            self.settings = settings or RewardSettings.defaults_for(tokenizer, self.model.config)
            self.name = "reward_model"
        self.batch_size = batch_size
        self.normalize = normalize

    @torch.no_grad()
    def score_sequences(self, sequences: Sequence[Sequence[int]]) -> list[float]:
        """Scores of framed token-id sequences, in input order (batched longest first)."""
        order = sorted(range(len(sequences)), key=lambda index: len(sequences[index]), reverse=True)
        scores = [0.0] * len(sequences)
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                batch = collate_sequences([sequences[index] for index in chunk], self.tokenizer.pad_token_id)
                values = reward_scores(self.model, batch).float().tolist()
                for index, value in zip(chunk, values, strict=True):
                    scores[index] = value
        finally:
            self.model.train(was_training)
        return scores

    def score(
        self, prompts: Sequence[Any], completions: Sequence[Any], *, allow_empty: bool = False,
    ) -> list[float]:
        """One score per (prompt, completion); raises ModelError if the model returns NaN or inf."""
        sequences = encode_completions(
            prompts, completions, self.tokenizer, self.settings, allow_empty=allow_empty,
        )
        scores = self.score_sequences(sequences)
        bad = [index for index, value in enumerate(scores) if not math.isfinite(value)]
        if bad:
            raise ModelError(
                f"the reward model returned {scores[bad[0]]} for completion {bad[0]} ({len(bad)} "
                "non-finite score(s)); the weights are broken (a diverged run?) or the dtype "
                "overflows: load it in float32"
            )
        return self._normalized(scores) if self.normalize else scores

    def _normalized(self, scores: list[float]) -> list[float]:
        std = self.settings.reward_std if self.settings.reward_std > 0 else 1.0
        return [(value - self.settings.reward_mean) / std for value in scores]

    def as_reward_function(self, *, normalize: bool | None = None):
        """fn(prompts, completions, **columns) -> list[float] for WeightedRewards / TRL-style callers.

        Empty completions are scored (as prompt + EOS): a policy may stop at once and still needs a reward.
        A non-finite score comes back as NaN, which WeightedRewards records as a failure for that sample.
        """
        use_normalized = self.normalize if normalize is None else normalize

        def reward_model(prompts, completions, **_columns) -> list[float]:
            sequences = encode_completions(
                prompts, completions, self.tokenizer, self.settings, allow_empty=True,
            )
            scores = self.score_sequences(sequences)
            return self._normalized(scores) if use_normalized else scores

        reward_model.name = self.name  # how WeightedRewards names it in metrics and failures
        return reward_model


def reward_model_function(
    path: str, *, batch_size: int = 64, device: str | None = None, normalize: bool = False,
):
    """The reward function of the reward model saved in `path` (what 'reward_model:<path>' names)."""
    return RewardModelScorer(
        path, batch_size=batch_size, device=device, normalize=normalize,
    ).as_reward_function()
