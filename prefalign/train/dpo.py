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

import contextlib
import copy
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import datasets
import torch
from safetensors.torch import load_file, save_file

from prefalign.config import DataConfig, ModelConfig, TrainConfig, apply_overrides, option
from prefalign.data import collate_preference, tokenize_preference
from prefalign.errors import ConfigError, DataError, ModelError
from prefalign.losses import DPO_LOSSES, dpo_loss, sft_term
from prefalign.models import (
    disable_dropout,
    is_peft_model,
    load_causal_lm,
    load_tokenizer,
    model_card,
    model_device,
    reference_mode,
    resolve_model_path,
    save_model,
)
from prefalign.train.common import log_stats, resolve_rows
from prefalign.train.forward import (
    CompletionLogps,
    activation_checkpointing,
    completion_logps,
    grouped_completion_logps,
    mixed_precision,
    use_bf16_autocast,
)
from prefalign.train.runtime import (
    LossOutput,
    TrainResult,
    prepare_run_dir,
    seed_everything,
    set_threads,
    train_on_examples,
)
from prefalign.train.sampling import RoundSamplingConfig

logger = logging.getLogger("prefalign")

REF_LOGPS_FILE = "ref_logps.safetensors"


@dataclass
class DPOConfig:
    model: ModelConfig = option(help="The policy to align (full weights, or LoRA with model.lora).", factory=ModelConfig)
    data: DataConfig = option(help="Preference rows: prompt/chosen/rejected as strings or messages, or chosen/rejected with an implicit prompt.", factory=lambda: DataConfig(max_length=512))
    train: TrainConfig = option(
        help="Optimisation and run folder. The defaults suit the built-in task's tiny model; for billion-parameter models use a learning rate near 5e-7 to 1e-6.",
        factory=lambda: TrainConfig(learning_rate=1e-4, batch_size=32, max_steps=250, warmup_ratio=0.05),
    )
    beta: float = option(0.1, "β: strength of the pull towards the reference (higher = stay closer). IPO's τ; SimPO's reward scale (about 2 there).")
    loss_type: list[str] = option(help="Loss by name, or several to add up with loss_weights: " + ", ".join(DPO_LOSSES) + " (`ipo` is the paper's, on summed log-ratios; TRL's `ipo` is `ipo_length_normalized`).", factory=lambda: ["sigmoid"])
    loss_weights: list[float] = option(help="One weight per loss_type entry (empty = all 1).", factory=list)
    label_smoothing: float = option(0.0, "ε: assumed rate of flipped labels, for conservative (sigmoid/cdpo, ≤ 0.5) and robust (< 0.5) DPO.")
    simpo_gamma: float = option(0.5, "SimPO's target reward margin γ.")
    rpo_alpha: float = option(0.0, "α of the RPO SFT term: α · (chosen-token NLL summed) / (chosen tokens in the optimizer step); 0 = plain DPO. About 1 (Pang et al.) for tasks with right answers, where plain DPO tends to lower the chosen log-probs too; Llama 3 used 0.2 on chat data.")
    precompute_ref_logps: bool = option(True, "Compute the frozen reference's log-probs once before training (then free the reference) instead of one reference forward per step.")
    reference: str | None = option(None, "Reference model folder or hub name; None = the policy before training (LoRA: adapters off). Must share the policy's tokenizer.")
    ref_batch_size: int = option(64, "Pairs per no-grad batch when computing reference log-probs and eval metrics.")
    rounds: int = option(1, "Iterative (on-policy) DPO: rounds of sample -> pairs -> DPO with the current policy (train.max_steps per round); 1 = offline DPO on data.path's pairs.")
    round_reference: Literal["original", "previous"] = option("original", "With rounds > 1: each round's reference is the original model, or the policy as it starts the round.")
    sampling: RoundSamplingConfig = option(help="With rounds > 1: how each round samples (prompts from data.path or sampling.prompt_path), scores and pairs.", factory=RoundSamplingConfig)
    share_prompt: bool = option(True, "Run each prompt once for its chosen and rejected (its KV cache serves both): fewer tokens per pair, same values. Off under gradient checkpointing.")
    mixed_precision: Literal["auto", "bf16", "off"] = option("auto", "bf16 autocast of forward passes (weights and optimizer stay in their dtype). auto = on for CUDA and for CPUs with native bf16 (AVX512-BF16 or AMX), where a training step runs about twice as fast; off elsewhere.")


def _builtin_pairs(split: str):
    from prefalign.tasks.arithmetic import preference_dataset

    return preference_dataset(split)


# ----------------------------------------------------------------------------- checks


def loss_types(config: DPOConfig) -> list[str]:
    """The configured loss names as a list (a Python caller may give one string)."""
    return [config.loss_type] if isinstance(config.loss_type, str) else list(config.loss_type)


def needs_reference(config: DPOConfig) -> bool:
    return any(DPO_LOSSES[name].needs_reference for name in loss_types(config) if name in DPO_LOSSES)


@dataclass(frozen=True)
class PairForward:
    """How pairs go through a model: collation, bf16 autocast, and whether each prompt is computed once.
    `float32_attention`: short attention in float32 under CPU autocast (mixed_precision); off under gradient
    checkpointing, whose recomputation must repeat the forward's dtypes."""

    pad_token_id: int
    bf16: bool = False
    share_prompt: bool = True
    float32_attention: bool = True

    def collate(self, pairs: list[dict[str, Any]], ref_logps: dict[str, torch.Tensor] | None, device: torch.device) -> dict[str, Any]:
        """One batch: the pairs, their padded chosen rows [0, B) and rejected rows [B, 2B) (collate_preference)
        unless prompts are shared, and their precomputed reference log-probs, (B,) each."""
        batch: dict[str, Any] = {} if self.share_prompt else {k: v.to(device) for k, v in collate_preference(pairs, self.pad_token_id).items()}
        batch["pairs"] = pairs
        if ref_logps is not None:
            index = torch.tensor([pair["index"] for pair in pairs])
            batch["ref_chosen_logps"] = ref_logps["chosen"][index].to(device)
            batch["ref_rejected_logps"] = ref_logps["rejected"][index].to(device)
        return batch

    def __call__(self, model, batch: dict[str, Any]) -> CompletionLogps:
        """Completion log-probs of the chosen rows then the rejected rows: token_logps, mask (2B, length)."""
        with mixed_precision(model_device(model), self.bf16, float32_attention=self.float32_attention):
            if not self.share_prompt:
                return completion_logps(model, batch)
            pairs = batch["pairs"]
            # Chosen and rejected share their prompt: it goes through the model once and its KV cache (with its
            # graph) serves both rows, so a pair costs |x| + |y_w| + |y_l| tokens instead of 2|x| + |y_w| + |y_l|.
            completions = [pair["chosen_ids"] for pair in pairs] + [pair["rejected_ids"] for pair in pairs]
            return grouped_completion_logps(model, [pair["prompt_ids"] for pair in pairs] * 2, completions, self.pad_token_id)


def check_config(config: DPOConfig) -> None:
    """Fail on a bad loss setup before any model is loaded (dpo_loss owns the rules; ask it on one dummy pair)."""
    one = torch.ones(1)
    try:
        dpo_loss(
            -one, -one, -one, -one, beta=config.beta, loss_type=loss_types(config),
            loss_weights=list(config.loss_weights) or None, label_smoothing=config.label_smoothing,
            chosen_lengths=one, rejected_lengths=one, simpo_gamma=config.simpo_gamma,
        )  # fmt: skip
    except ValueError as error:
        raise ConfigError(f"DPO config: {error}") from None
    if config.rpo_alpha < 0:
        raise ConfigError(f"rpo_alpha must be >= 0 (0 = no SFT term), got {config.rpo_alpha}.")
    if config.ref_batch_size < 1:
        raise ConfigError(f"ref_batch_size must be at least 1, got {config.ref_batch_size}.")


def check_same_tokenizer(policy_tokenizer, reference_tokenizer, where: str) -> None:
    """DPO compares the same token ids under two models: the vocabularies must be identical."""
    policy_vocab, reference_vocab = policy_tokenizer.get_vocab(), reference_tokenizer.get_vocab()
    differing = sorted(set(policy_vocab.items()) ^ set(reference_vocab.items()), key=lambda item: item[1])[:3]
    special = [
        name for name in ("bos_token_id", "eos_token_id")
        if getattr(policy_tokenizer, name) != getattr(reference_tokenizer, name)
    ]  # fmt: skip
    if differing or special:
        detail = f"tokens that differ (token, id): {differing}" if differing else f"different {', '.join(special)}"
        raise ModelError(
            f"the reference model {where} does not share the policy's tokenizer ({len(reference_vocab)} vs "
            f"{len(policy_vocab)} tokens; {detail}). DPO compares log-probs of the same token ids under both "
            "models, so they must use one tokenizer: pick a reference from the policy's own family (usually the "
            "SFT model the policy starts from), or leave `reference` empty to use the policy's initial weights."
        )


def check_reference_model(policy, reference) -> None:
    """A reference given as a model object: at least its vocabulary size must match the policy's."""
    policy_size = policy.get_input_embeddings().num_embeddings
    reference_size = reference.get_input_embeddings().num_embeddings
    if policy_size != reference_size:
        raise ModelError(
            f"the reference model has {reference_size} token embeddings but the policy has {policy_size}: they do "
            "not share a tokenizer, so their log-probs of the same ids cannot be compared. Pass a reference from "
            "the policy's own family, or reference=None to use the policy's initial weights."
        )


# ----------------------------------------------------------------------------- data


def tokenized_pairs(rows, tokenizer, data_config: DataConfig, name: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Tokenized pairs as plain dicts with their `index`; identical chosen/rejected pairs dropped and counted."""
    data, stats = tokenize_preference(rows, tokenizer, data_config)
    report = log_stats(name, stats)
    pairs = [example for example in data.to_list() if example["chosen_ids"] != example["rejected_ids"]]
    report["identical_pairs_dropped"] = len(data) - len(pairs)
    if report["identical_pairs_dropped"]:
        logger.warning(
            "%s data: %d pairs dropped because chosen and rejected are the same tokens (after truncation to "
            "data.max_length=%d): they carry no preference", name, report["identical_pairs_dropped"], data_config.max_length,
        )
    if not pairs:
        raise DataError(
            f"no {name} preference pairs left after filtering: {stats.summary()}, and "
            f"{report['identical_pairs_dropped']} pairs had identical chosen and rejected tokens. Check that the "
            "chosen and rejected columns differ, and raise data.max_length if truncation made them equal."
        )
    for index, pair in enumerate(pairs):
        pair["index"] = index
    return pairs, report


def fingerprint(pairs: list[dict[str, Any]]) -> str:
    """Identifies the token ids the cached reference log-probs belong to (resume and reruns reuse them)."""
    digest = hashlib.sha256()
    for pair in pairs:
        digest.update(json.dumps([pair["prompt_ids"], pair["chosen_ids"], pair["rejected_ids"]]).encode())
    return digest.hexdigest()[:32]


def pair_tokens(pairs: list[dict[str, Any]]) -> int:
    """Non-pad tokens of the chosen and rejected sequences (prompt counted in both), for tokens_per_second."""
    return sum(2 * len(pair["prompt_ids"]) + len(pair["chosen_ids"]) + len(pair["rejected_ids"]) for pair in pairs)


# ----------------------------------------------------------------------------- the reference


@contextlib.contextmanager
def reference_network(policy, reference):
    """The network that plays π_ref: a separate model, the LoRA base (adapters off), or the policy as it is."""
    if reference is not None:
        yield reference
    elif is_peft_model(policy):
        with reference_mode(policy):
            yield policy
    else:
        yield policy  # only valid before the first update (precompute) or for a frozen copy


def sequence_logps(network, pairs: list[dict[str, Any]], pad_token_id: int, batch_size: int, forward: PairForward | None = None) -> dict[str, torch.Tensor]:
    """Summed completion log-probs of every pair's chosen and rejected, {chosen, rejected}: (num_pairs,) each.
    `forward` (default: float32, prompts shared) says how the pairs go through the network. Values only, no
    graph: the forwards run under inference mode (no autograd bookkeeping at all), in length-sorted batches."""
    forward = forward or PairForward(pad_token_id)
    was_training = network.training
    network.eval()
    device = model_device(network)
    chosen = torch.zeros(len(pairs))
    rejected = torch.zeros(len(pairs))
    # Pairs of similar length batched together waste less compute on padding.
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i]["prompt_ids"]) + max(len(pairs[i]["chosen_ids"]), len(pairs[i]["rejected_ids"])))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        with torch.inference_mode():
            sums = forward(network, forward.collate([pairs[i] for i in chunk], None, device)).sums.float().cpu()  # (2B,)
        chosen[chunk] = sums[: len(chunk)]  # copied out into ordinary tensors, usable next to autograd
        rejected[chunk] = sums[len(chunk):]
    network.train(was_training)
    return {"chosen": chosen, "rejected": rejected}


def precompute_reference(run_dir: Path, policy, reference, splits: dict[str, list[dict[str, Any]]], forward: PairForward, batch_size: int) -> dict[str, dict[str, torch.Tensor]]:
    """Reference log-probs of every split, from `<run>/ref_logps.safetensors` when it matches the data, the
    precision and the reference network's weights (a rerun with another model in the same folder recomputes)."""
    path = run_dir / REF_LOGPS_FILE
    precision = {"bf16": str(forward.bf16), "float32_attention": str(forward.bf16 and forward.float32_attention)}
    with reference_network(policy, reference) as network:
        prints = {name: fingerprint(pairs) for name, pairs in splits.items()} | precision | {"reference_weights": weights_fingerprint(network)}
        if path.exists():
            from safetensors import safe_open

            with safe_open(str(path), "pt") as handle:
                stored = handle.metadata() or {}
            if all(stored.get(name) == value for name, value in prints.items()):
                tensors = load_file(str(path))
                logger.info("reference log-probs reused from %s", path)
                return {name: {side: tensors[f"{name}/{side}"] for side in ("chosen", "rejected")} for name in splits}
        results = {name: sequence_logps(network, pairs, forward.pad_token_id, batch_size, forward) for name, pairs in splits.items()}
    tensors = {f"{name}/{side}": values for name, sides in results.items() for side, values in sides.items()}
    save_file(tensors, str(path), metadata=prints)
    return results


def weights_fingerprint(network) -> str:
    """Identifies a network's weights cheaply: each tensor's name, shape, sum and sum of squares (float64).
    Called before training, when the network playing the reference holds its initial weights."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in network.state_dict().items():
            values = tensor.detach().double()
            digest.update(f"{name}{tuple(tensor.shape)}{values.sum().item():.17g}{values.square().sum().item():.17g}".encode())
    return digest.hexdigest()[:32]


# ----------------------------------------------------------------------------- the loss


def make_loss(config: DPOConfig, forward: PairForward, reference_on_the_fly: Callable[[dict[str, Any]], tuple[torch.Tensor, torch.Tensor]] | None):
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
            # The SFT term is a per-token mean over the step's chosen tokens; scaled by the step's pairs so the
            # runtime's division by pairs leaves exactly α · NLL / chosen tokens.
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
    pairs = sum(count_pairs(batch) for batch in micro_batches)
    tokens = float(sum(len(pair["chosen_ids"]) for batch in micro_batches for pair in batch["pairs"]))
    for batch in micro_batches:
        batch["step_pairs"], batch["step_chosen_tokens"] = pairs, tokens


def make_evaluator(config: DPOConfig, pairs, ref_logps, forward: PairForward, reference_on_the_fly) -> Callable[[Any], dict[str, float]]:
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


# ----------------------------------------------------------------------------- the command


def dpo(config: DPOConfig, *, dataset=None, eval_dataset=None, model=None, tokenizer=None, reference=None, save: bool = True) -> TrainResult:
    """Run DPO (or a family member) as configured; returns the training result (model saved to <run>/final).

    `model`/`tokenizer` replace config.model; `reference` (a model object) replaces config.reference.
    """
    if config.rounds != 1:
        from prefalign.train.iterative import iterative_dpo

        return iterative_dpo(config, dataset=dataset, eval_dataset=eval_dataset, model=model, tokenizer=tokenizer, reference=reference, save=save)
    check_config(config)
    set_threads(config.train.num_threads)
    seed_everything(config.train.seed)
    run_dir = prepare_run_dir(config, "dpo")
    if model is None:
        model, tokenizer = load_causal_lm(config.model)
    elif tokenizer is None:
        raise ConfigError("dpo(model=...) needs tokenizer=... as well.")
    disable_dropout(model)  # policy and reference log-probs are compared: dropout would add noise to both
    dataset, eval_dataset = (_as_dataset(rows) for rows in (dataset, eval_dataset))
    train_rows, eval_rows = resolve_rows(config.data, builtin=_builtin_pairs, dataset=dataset, eval_dataset=eval_dataset)
    train_pairs, train_report = tokenized_pairs(train_rows, tokenizer, config.data, "train")
    splits, data_stats = {"train": train_pairs}, {"train": train_report}
    if eval_rows is not None:
        splits["eval"], data_stats["eval"] = tokenized_pairs(eval_rows, tokenizer, config.data, "eval")
    (run_dir / "data_stats.json").write_text(json.dumps(data_stats, indent=2))

    reference = load_reference(config, model, tokenizer, reference)
    # The KV cache that shares prompts is off under gradient checkpointing (transformers disables it there).
    checkpointing = config.model.gradient_checkpointing or activation_checkpointing(model)
    share_prompt = config.share_prompt and not checkpointing
    forward = PairForward(tokenizer.pad_token_id, use_bf16_autocast(config.mixed_precision, model_device(model)), share_prompt, float32_attention=not checkpointing)
    ref_logps: dict[str, dict[str, torch.Tensor]] = {}
    reference_on_the_fly = None
    if needs_reference(config) and config.precompute_ref_logps:
        ref_logps = precompute_reference(run_dir, model, reference, splits, forward, config.ref_batch_size)
        reference = None  # freed: training reads the cached numbers
    elif needs_reference(config):
        reference_on_the_fly = on_the_fly_reference(model, reference, forward)

    evaluate = None
    if "eval" in splits:
        evaluate = make_evaluator(config, splits["eval"], ref_logps.get("eval"), forward, reference_on_the_fly)
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
    )
    if save:
        card = model_card("DPO model", _card_lines(config, result))
        save_model(model, tokenizer, run_dir / "final", card=card, merge_lora=config.model.merge_lora)
    return result


def _as_dataset(rows):
    """A list of row dicts is accepted wherever a datasets.Dataset is."""
    return datasets.Dataset.from_list(list(rows)) if isinstance(rows, (list, tuple)) else rows


def load_reference(config: DPOConfig, policy, tokenizer, reference):
    """A separate reference model when one is configured (checked against the policy), else None."""
    if not needs_reference(config):
        return None
    if reference is not None:
        check_reference_model(policy, reference)
        return reference.eval().requires_grad_(False)
    if not config.reference:
        return None
    path = resolve_model_path(config.reference)
    check_same_tokenizer(tokenizer, load_tokenizer(path, trust_remote_code=config.model.trust_remote_code), f"{config.reference!r}")
    reference_config = ModelConfig(
        name_or_path=path, dtype=config.model.dtype, device=str(model_device(policy)),
        trust_remote_code=config.model.trust_remote_code, attn_implementation=config.model.attn_implementation,
    )  # fmt: skip
    network, _ = load_causal_lm(reference_config, trainable=False)
    check_reference_model(policy, network)
    return network


def on_the_fly_reference(policy, reference, forward: PairForward):
    """Reference log-probs per micro-batch (precompute_ref_logps off): a frozen network kept for the whole run."""
    if reference is None and not is_peft_model(policy):
        # Full fine-tuning: the reference is the policy's starting point, so keep a frozen copy of it.
        reference = copy.deepcopy(policy).eval().requires_grad_(False)

    @torch.no_grad()
    def reference_logps(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        with reference_network(policy, reference) as network:
            was_training = network.training
            network.eval()
            sums = forward(network, batch).sums  # (2B,)
            network.train(was_training)
        pairs = sums.shape[0] // 2
        return sums[:pairs], sums[pairs:]

    return reference_logps


def _card_lines(config: DPOConfig, result: TrainResult) -> dict[str, Any]:
    last = next((m for m in reversed(result.metrics) if "loss" in m), {})
    final_eval = next((m for m in reversed(result.metrics) if "eval/rewards/accuracies" in m), {})
    lines = {
        "method": f"DPO family: {', '.join(loss_types(config))} (β = {config.beta})",
        "base model": config.model.name_or_path,
        "reference": config.reference or ("the base with LoRA adapters off" if config.model.lora else "the starting policy"),
        "data": ", ".join(config.data.path),
        "steps": result.step,
        "learning rate": config.train.learning_rate,
        "final train loss": f"{last.get('loss', float('nan')):.4f}",
    }
    if final_eval:
        lines["held-out implicit-reward accuracy"] = f"{final_eval['eval/rewards/accuracies']:.3f}"
    return lines


# ----------------------------------------------------------------------------- demo stage


# On the built-in pairs (correct vs near-miss) plain DPO mostly pushes the near-misses down and the chosen
# answers with them, so greedy accuracy barely moves; the RPO term keeps the chosen answers rising
# (BENCHMARKS.md, "DPO on the built-in task", has both, and an SFT-only control).
DEMO_RECIPE = {"rpo_alpha": 1.0, "train.learning_rate": 1e-3, "train.max_steps": 300}


def dpo_stage(context) -> dict[str, Any]:
    """`prefalign demo`: DPO on the built-in task's pairs from the base model, judged on held-out prompts."""
    import time

    started = time.perf_counter()
    config = apply_overrides(DPOConfig(model=ModelConfig(name_or_path=str(context.base_path))), DEMO_RECIPE)
    config.train.output_dir, config.train.overwrite = str(context.run_dir / "dpo"), True
    # One thread unless asked: this model's steps are many small ops, and on a busy 2-core machine two OpenMP
    # threads spin against other processes (measured 0.88 s per step against 0.10 s with one).
    config.train.seed, config.train.num_threads = context.config.seed, context.config.num_threads or 1
    threads = torch.get_num_threads()
    try:
        result = dpo(config)
    finally:
        torch.set_num_threads(threads)
    policy, tokenizer = load_causal_lm(ModelConfig(name_or_path=str(result.run_dir / "final")), trainable=False)
    base, _ = load_causal_lm(ModelConfig(name_or_path=str(context.base_path)), trainable=False)
    after = context.evaluate(policy, tokenizer, reference=base)
    before = context.base_metrics
    held_out = next(m for m in reversed(result.metrics) if "eval/rewards/accuracies" in m)
    wall = time.perf_counter() - started
    gain = 100 * (after["accuracy"] - before["accuracy"])
    context.lines.append(
        f"| DPO ({', '.join(loss_types(config))}{f' + RPO α={config.rpo_alpha:g}' if config.rpo_alpha else ''}, β={config.beta:g}) "
        f"| held-out greedy accuracy {before['accuracy']:.3f} → {after['accuracy']:.3f} ({gain:+.1f} points), mean reward "
        f"{before['mean_reward']:.3f} → {after['mean_reward']:.3f}, implicit-reward accuracy {held_out['eval/rewards/accuracies']:.3f}, "
        f"KL to base {after['kl']:.3f} nats | {result.step} steps × {config.train.batch_size} pairs (correct vs near-miss), "
        f"{wall:.0f} s with evaluation; model: `{result.run_dir / 'final'}` |"
    )
    return {"before": before, "after": after, "implicit_reward_accuracy": held_out["eval/rewards/accuracies"],
            "steps": result.step, "wall_seconds": wall, "model": str(result.run_dir / "final")}
