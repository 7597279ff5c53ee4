"""`prefalign dpo`: Direct Preference Optimization and its family on (prompt, chosen, rejected) pairs.

The policy is pushed to raise log π(chosen) − log π(rejected) relative to a frozen reference, with no
reward model (Rafailov et al. 2023; the loss variants live in `prefalign.losses.dpo`). How the run goes:

1. rows in (files, an in-memory dataset or the built-in task), tokenized as pairs; pairs whose chosen and
   rejected tokens are identical (after truncation) carry no signal and are dropped, counted;
2. the reference: when it is frozen, its log-probs are computed once, before training, in large no-grad
   batches, saved with the run (`ref_logps.safetensors`, keyed by example index) and the reference model
   is freed. The reference is, in order: `reference=` / `config.reference` (a separate model, which must
   share the policy's tokenizer), the base network with LoRA adapters off, or the policy's own weights
   before the first update (so full fine-tuning needs no copy of the model at all);
3. training through the shared runtime: chosen and rejected of a micro-batch go through the model
   together, each prompt once with its KV cache shared by both completions (`share_prompt`; otherwise one
   padded forward of chosen and rejected rows, `collate_preference`), only completion positions reaching the
   output head, under bf16 autocast where the hardware runs it natively (`mixed_precision`);
4. the same metrics on the eval pairs, then the model is saved to `<run>/final`.

Metrics keep TRL's names: `loss`, `rewards/chosen`, `rewards/rejected`, `rewards/margins`,
`rewards/accuracies`, `logps/chosen`, `logps/rejected` (plus `nll_loss` with RPO), and the runtime's
`grad_norm`, `learning_rate`, `tokens_per_second`, `step_time`; eval metrics carry an `eval/` prefix.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import datasets
import torch

from prefalign.algorithms.dpo_pairs import (
    PairForward,
    on_the_fly_reference,
    pair_tokens,
    precompute_reference,
    tokenized_pairs,
)
from prefalign.config import (
    DataConfig,
    DistributedConfig,
    ModelConfig,
    TrainConfig,
    distributed_option,
    validate,
)
from prefalign.data.splits import resolve_rows
from prefalign.errors import ConfigError
from prefalign.losses import DPO_LOSSES, dpo_loss, sft_term
from prefalign.models.forward import (
    activation_checkpointing,
    use_bf16_autocast,
)
from prefalign.models.loading import (
    disable_dropout,
    fit_max_length,
    load_causal_lm,
    load_tokenizer,
    model_device,
    resolve_model_path,
)
from prefalign.models.reference import Reference, check_reference_model, check_same_tokenizer
from prefalign.models.saving import model_card, save_model
from prefalign.options import check_model_location, option
from prefalign.runtime import distributed
from prefalign.runtime.loop import LossOutput, TrainResult, finished_run, train_on_examples
from prefalign.runtime.setup import copy_dtype, start_run, write_run_file


@dataclass
class DPOConfig:
    model: ModelConfig = option(
        help="The policy to align (full weights, or LoRA with model.lora).", factory=ModelConfig,
    )
    data: DataConfig = option(
        help="Preference rows: prompt/chosen/rejected as strings or messages, or chosen/rejected "
             "with an implicit prompt.",
        factory=lambda: DataConfig(max_length=512),
    )
    train: TrainConfig = option(
        help="Optimisation and run folder. Defaults for full fine-tuning of a real model: lr 1e-6 (TRL's "
             "DPOConfig; Zephyr used 5e-7), batch 8 (TRL's per-device batch), warmup 0.1 (Zephyr), one epoch "
             "(max_steps 0). LoRA usually wants about 10x the lr; the built-in task's recipe (lr 1e-3, 300 "
             "steps) is in `prefalign demo` and examples/dpo.yaml.",
        factory=lambda: TrainConfig(learning_rate=1e-6, batch_size=8, warmup_ratio=0.1),
    )
    distributed: DistributedConfig = distributed_option()
    beta: float = option(
        0.1,
        "β: strength of the pull towards the reference (higher = stay closer). IPO's τ; SimPO's "
        "reward scale (about 2 there).",
        above=0,
    )
    loss_type: list[str] = option(
        help="Loss by name, or several to add up with loss_weights: " + ", ".join(DPO_LOSSES)
        + " (`ipo` is the paper's, on summed log-ratios; TRL's `ipo` is `ipo_length_normalized`).",
        factory=lambda: ["sigmoid"],
    )
    loss_weights: list[float] = option(help="One weight per loss_type entry (empty = all 1).", factory=list)
    label_smoothing: float = option(
        0.0,
        "ε: assumed rate of flipped labels, for conservative (sigmoid/cdpo, ≤ 0.5) and robust (< 0.5) DPO.",
        low=0, high=0.5,
    )
    simpo_gamma: float = option(0.5, "SimPO's target reward margin γ.")
    rpo_alpha: float = option(
        0.0,
        "α of the RPO SFT term: α · (chosen-token NLL summed) / (chosen tokens in the optimizer step); 0 = "
        "plain DPO. About 1 (Pang et al.) for tasks with right answers, where plain DPO tends to lower the "
        "chosen log-probs too; Llama 3 used 0.2 on chat data.",
        low=0,
    )
    precompute_ref_logps: bool = option(
        True,
        "Compute the frozen reference's log-probs once before training (then free the reference) instead of "
        "one reference forward per step.",
    )
    reference: str | None = option(
        None,
        "Reference model folder or hub name; None = the policy before training (LoRA: adapters off). Must "
        "share the policy's tokenizer. Reference-free losses (simpo) use none.",
        check=check_model_location,
    )
    ref_batch_size: int = option(
        64, "Pairs per no-grad batch when computing reference log-probs and eval metrics.", low=1,
    )
    share_prompt: bool = option(
        True,
        "Run each prompt once for its chosen and rejected (its KV cache serves both): fewer tokens per pair, "
        "same values. Off under gradient checkpointing.",
    )
    mixed_precision: Literal["auto", "bf16", "off"] = option(
        "auto",
        "bf16 autocast of forward passes (weights and optimizer stay in their dtype). auto = on for "
        "CUDA and for CPUs with native bf16 (AVX512-BF16 or AMX), where a training step runs about "
        "twice as fast; off elsewhere.",
    )

    def check(self, prefix: str = "") -> None:
        check_config(self, prefix)


def loss_types(config: DPOConfig) -> list[str]:
    """The configured loss names as a list (a Python caller may give one string)."""
    return [config.loss_type] if isinstance(config.loss_type, str) else list(config.loss_type)


def needs_reference(config: DPOConfig) -> bool:
    return any(DPO_LOSSES[name].needs_reference for name in loss_types(config) if name in DPO_LOSSES)


def check_config(config: DPOConfig, prefix: str = "") -> None:
    """DPO's rules between fields, before any model is loaded (dpo_loss owns the loss rules: ask it on one
    dummy pair). DPOConfig.check, which prefalign.config.validate runs."""
    one = torch.ones(1)
    try:
        dpo_loss(
            -one, -one, -one, -one, beta=config.beta, loss_type=loss_types(config),
            loss_weights=list(config.loss_weights) or None, label_smoothing=config.label_smoothing,
            chosen_lengths=one, rejected_lengths=one, simpo_gamma=config.simpo_gamma,
        )  # fmt: skip
    except ValueError as error:
        raise ConfigError(f"DPO config: {error}") from None
    if config.reference and not needs_reference(config):
        raise ConfigError(
            f"{prefix}reference is set ({config.reference!r}), but {prefix}loss_type {loss_types(config)} is "
            "reference-free, so no reference model would be used; drop --reference, or choose a loss that "
            "uses one (sigmoid, ipo, ...)"
        )


def make_loss(
    config: DPOConfig, forward: PairForward,
    reference_on_the_fly: Callable[[dict[str, Any]], tuple[torch.Tensor, torch.Tensor]] | None,
):
    """loss_fn(model, batch) -> LossOutput for the runtime: sums over the micro-batch's pairs."""
    names = loss_types(config)
    weights = list(config.loss_weights) or None

    def loss_fn(model, batch: dict[str, Any]) -> LossOutput:
        scored = forward(model, batch)  # token_logps, mask: (2B, scored_len)
        sums, lengths = scored.sums, scored.lengths  # (2B,)
        pairs = sums.shape[0] // 2
        if "ref_chosen_logps" in batch:
            ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        elif reference_on_the_fly is not None:
            ref_chosen, ref_rejected = reference_on_the_fly(batch)
        else:
            ref_chosen = ref_rejected = None  # reference-free (SimPO)
        loss, metrics = dpo_loss(
            sums[:pairs], sums[pairs:], ref_chosen, ref_rejected, beta=config.beta, loss_type=names,
            loss_weights=weights, label_smoothing=config.label_smoothing, chosen_lengths=lengths[:pairs],
            rejected_lengths=lengths[pairs:], simpo_gamma=config.simpo_gamma,
        )  # fmt: skip
        loss_sum = loss * pairs  # the runtime divides by the pairs of the whole optimizer step
        metrics = {key: value * pairs for key, value in metrics.items()}
        if config.rpo_alpha > 0:
            # The SFT term is a per-token mean over the step's chosen tokens; scaled by the step's pairs so
            # the runtime's division by pairs leaves exactly α · NLL / chosen tokens.
            step_pairs, step_tokens = batch["step_pairs"], batch["step_chosen_tokens"]
            chosen_nll = -scored.token_logps[:pairs].sum()
            loss_sum = loss_sum + sft_term(chosen_nll, step_tokens, alpha=config.rpo_alpha) * step_pairs
            metrics["nll_loss"] = float(chosen_nll.detach()) / max(step_tokens, 1) * step_pairs
        return LossOutput(loss_sum=loss_sum, metrics=metrics, tokens=pair_tokens(batch["pairs"]))

    return loss_fn


def count_pairs(batch: dict[str, Any]) -> float:
    return float(len(batch["pairs"]))


def annotate_step(micro_batches: list[dict[str, Any]]) -> None:
    """Step-wide totals RPO's SFT term needs before the first backward of the step."""
    pairs = distributed.sum_across(sum(count_pairs(batch) for batch in micro_batches))
    tokens = distributed.sum_across(
        float(sum(len(pair["chosen_ids"]) for batch in micro_batches for pair in batch["pairs"]))
    )
    for batch in micro_batches:
        batch["step_pairs"], batch["step_chosen_tokens"] = pairs, tokens


def make_evaluator(
    config: DPOConfig, pairs, ref_logps, forward: PairForward, reference_on_the_fly,
) -> Callable[[Any], dict[str, float]]:
    """The training metrics on held-out pairs (pair-weighted means), no gradient."""
    loss_fn = make_loss(config, forward, reference_on_the_fly)

    @torch.no_grad()
    def evaluate(model) -> dict[str, float]:
        model.eval()
        device = model_device(model)
        totals: dict[str, float] = {}
        for start in range(0, len(pairs), config.ref_batch_size):
            chunk = pairs[start:start + config.ref_batch_size]
            batch = forward.collate(chunk, ref_logps, device)
            if config.rpo_alpha > 0:
                annotate_step([batch])
            output = loss_fn(model, batch)
            for key, value in {"loss": float(output.loss_sum), **output.metrics}.items():
                totals[key] = totals.get(key, 0.0) + float(value)
        return {key: value / len(pairs) for key, value in totals.items()}

    return evaluate


def dpo(
    config: DPOConfig, *, dataset=None, eval_dataset=None, model=None, tokenizer=None, reference=None,
    save: bool = True,
) -> TrainResult:
    """Run DPO (or a family member) as configured; returns the training result (model saved to <run>/final).

    `model`/`tokenizer` replace config.model; `reference` (a model object, or a prefalign.models.Reference)
    replaces config.reference. Resuming a finished run returns its result without training
    (prefalign.runtime.loop.finished_run).
    """
    validate(config)
    if (finished := finished_run(config, "dpo")) is not None:
        return finished
    run_dir, model, tokenizer = start_run(config, "dpo", model, tokenizer)
    config = dataclasses.replace(config, data=fit_max_length(config.data, model, "dpo"))
    disable_dropout(model)  # policy and reference log-probs are compared: dropout would add noise to both
    dataset, eval_dataset = (_as_dataset(rows) for rows in (dataset, eval_dataset))
    train_rows, eval_rows = resolve_rows(config.data, dataset=dataset, eval_dataset=eval_dataset)
    train_pairs, train_report = tokenized_pairs(train_rows, tokenizer, config.data, "train")
    splits, data_stats = {"train": train_pairs}, {"train": train_report}
    if eval_rows is not None:
        splits["eval"], data_stats["eval"] = tokenized_pairs(eval_rows, tokenizer, config.data, "eval")
    write_run_file(run_dir / "data_stats.json", json.dumps(data_stats, indent=2))

    frozen = reference_of(config, model, tokenizer, reference)
    # The KV cache that shares prompts is off under gradient checkpointing (transformers disables it there).
    checkpointing = config.model.gradient_checkpointing or activation_checkpointing(model)
    share_prompt = config.share_prompt and not checkpointing
    forward = PairForward(
        tokenizer.pad_token_id, use_bf16_autocast(config.mixed_precision, model_device(model)), share_prompt,
        float32_attention=not checkpointing,
    )
    ref_logps: dict[str, dict[str, torch.Tensor]] = {}
    reference_on_the_fly = None
    if frozen is not None and config.precompute_ref_logps:
        ref_logps = precompute_reference(run_dir, frozen, splits, forward, config.ref_batch_size)
        frozen = None  # freed: training reads the cached numbers
    elif frozen is not None:
        reference_on_the_fly = on_the_fly_reference(frozen, forward)

    evaluate = None
    if "eval" in splits:
        evaluate = make_evaluator(
            config, splits["eval"], ref_logps.get("eval"), forward, reference_on_the_fly,
        )
    result = train_on_examples(
        model=model,
        examples=train_pairs,
        collate=lambda chunk: forward.collate(chunk, ref_logps.get("train"), model_device(model)),
        loss_fn=make_loss(config, forward, reference_on_the_fly),
        units_of=count_pairs,
        config=config.train,
        run_dir=run_dir,
        evaluate=evaluate,
        description="dpo",
        prepare_step=annotate_step if config.rpo_alpha > 0 else None,
        parallel=config.distributed,
    )
    if save:
        card = model_card("DPO model", _card_lines(config, result))
        distributed.on_main_process_whole(
            save_model, model, tokenizer, run_dir / "final", card=card, merge_lora=config.model.merge_lora,
        )
    return result


def _as_dataset(rows):
    """A list of row dicts is accepted wherever a datasets.Dataset is."""
    return datasets.Dataset.from_list(list(rows)) if isinstance(rows, (list, tuple)) else rows


def reference_of(config: DPOConfig, policy, tokenizer, reference) -> Reference | None:
    """π_ref, or None for a reference-free loss (SimPO): `reference=` (a model, checked against the policy, or
    a Reference as it is), config.reference (loaded, checked), else the policy itself (LoRA: adapters off), as
    it is before training when the log-probs are precomputed, a frozen copy when they are not."""
    if not needs_reference(config):
        return None
    if isinstance(reference, Reference):
        return reference
    if reference is None and config.reference:
        path = resolve_model_path(config.reference)
        check_same_tokenizer(
            tokenizer, load_tokenizer(path, trust_remote_code=config.model.trust_remote_code),
            f"{config.reference!r}",
        )
        reference_config = ModelConfig(
            name_or_path=path, dtype=config.model.dtype, device=str(model_device(policy)),
            trust_remote_code=config.model.trust_remote_code,
            attn_implementation=config.model.attn_implementation,
        )  # fmt: skip
        reference, _ = load_causal_lm(reference_config, trainable=False)
    if reference is not None:
        check_reference_model(policy, reference)
    return Reference(
        policy, reference, snapshot=not config.precompute_ref_logps,
        dtype=copy_dtype(config, model_device(policy)),
    )


def _card_lines(config: DPOConfig, result: TrainResult) -> dict[str, Any]:
    last = next((m for m in reversed(result.metrics) if "loss" in m), {})
    final_eval = next((m for m in reversed(result.metrics) if "eval/rewards/accuracies" in m), {})
    lines = {
        "method": f"DPO family: {', '.join(loss_types(config))} (β = {config.beta})",
        "base model": config.model.name_or_path,
        "reference": config.reference or (
            "the base with LoRA adapters off" if config.model.lora else "the starting policy"
        ),
        "data": ", ".join(config.data.path),
        "steps": result.step,
        "learning rate": config.train.learning_rate,
        "final train loss": f"{last.get('loss', float('nan')):.4f}",
    }
    if final_eval:
        lines["held-out implicit-reward accuracy"] = f"{final_eval['eval/rewards/accuracies']:.3f}"
    return lines
