"""DPO's pairs: tokenized (identical pairs dropped), forwarded with a shared prompt, and scored by the frozen
reference once before training (`ref_logps.safetensors`) or per micro-batch."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from prefalign.config import DataConfig
from prefalign.data import collate_preference, tokenize_preference
from prefalign.data.splits import log_stats
from prefalign.errors import DataError
from prefalign.files import atomic_file, writing
from prefalign.models.forward import (
    CompletionLogps,
    completion_logps,
    grouped_completion_logps,
    mixed_precision,
)
from prefalign.models.loading import (
    model_device,
)
from prefalign.models.reference import Reference, weights_fingerprint
from prefalign.runtime import distributed

logger = logging.getLogger("prefalign")


REF_LOGPS_FILE = "ref_logps.safetensors"


@dataclass(frozen=True)
class PairForward:
    """How pairs go through a model: collation, bf16 autocast, and whether each prompt is computed once.
    `float32_attention`: short attention in float32 under CPU autocast (mixed_precision); off under gradient
    checkpointing, whose recomputation must repeat the forward's dtypes."""

    pad_token_id: int
    bf16: bool = False
    share_prompt: bool = True
    float32_attention: bool = True

    def collate(
        self, pairs: list[dict[str, Any]], ref_logps: dict[str, torch.Tensor] | None, device: torch.device,
    ) -> dict[str, Any]:
        """One batch: the pairs, their padded chosen rows [0, B) and rejected rows [B, 2B)
        (collate_preference) unless prompts are shared, and their precomputed reference log-probs, (B,)
        each."""
        batch: dict[str, Any] = {} if self.share_prompt else {
            k: v.to(device) for k, v in collate_preference(pairs, self.pad_token_id).items()
        }
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
            # Chosen and rejected share their prompt: it goes through the model once and its KV cache (with
            # its graph) serves both rows, so a pair costs |x| + |y_w| + |y_l| tokens instead of 2|x| + |y_w|
            # + |y_l|.
            completions = [pair["chosen_ids"] for pair in pairs] + [pair["rejected_ids"] for pair in pairs]
            return grouped_completion_logps(
                model, [pair["prompt_ids"] for pair in pairs] * 2, completions, self.pad_token_id,
            )


def tokenized_pairs(
    rows, tokenizer, data_config: DataConfig, name: str,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Tokenized pairs as plain dicts with their `index`; identical chosen/rejected pairs dropped and
    counted."""
    data, stats = tokenize_preference(rows, tokenizer, data_config)
    report = log_stats(name, stats)
    pairs = [example for example in data.to_list() if example["chosen_ids"] != example["rejected_ids"]]
    report["identical_pairs_dropped"] = len(data) - len(pairs)
    if report["identical_pairs_dropped"]:
        logger.warning(
            "%s data: %d pairs dropped because chosen and rejected are the same tokens (after truncation to "
            "data.max_length=%d): they carry no preference", name, report["identical_pairs_dropped"],
            data_config.max_length,
        )
    if not pairs:
        raise DataError(
            f"no {name} preference pairs left after filtering: {stats.summary()}, and "
            f"{report['identical_pairs_dropped']} pairs had identical chosen and rejected tokens. Check that "
            "the chosen and rejected columns differ, and raise data.max_length if truncation made them equal."
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
    return sum(
        2 * len(pair["prompt_ids"]) + len(pair["chosen_ids"]) + len(pair["rejected_ids"]) for pair in pairs
    )


def sequence_logps(
    network, pairs: list[dict[str, Any]], pad_token_id: int, batch_size: int,
    forward: PairForward | None = None,
) -> dict[str, torch.Tensor]:
    """Summed completion log-probs of every pair's chosen and rejected, {chosen, rejected}: (num_pairs,) each.
    `forward` (default: float32, prompts shared) says how the pairs go through the network. Values only, no
    graph: the forwards run under inference mode (no autograd bookkeeping at all), in length-sorted
    batches."""
    forward = forward or PairForward(pad_token_id)
    was_training = network.training
    network.eval()
    device = model_device(network)
    chosen = torch.zeros(len(pairs))
    rejected = torch.zeros(len(pairs))
    # Pairs of similar length batched together waste less compute on padding.
    order = sorted(
        range(len(pairs)),
        key=lambda i: len(pairs[i]["prompt_ids"]) + max(
            len(pairs[i]["chosen_ids"]), len(pairs[i]["rejected_ids"]),
        ),
    )
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        with torch.inference_mode():
            # (2B,)
            sums = forward(
                network, forward.collate([pairs[i] for i in chunk], None, device),
            ).sums.float().cpu()
        chosen[chunk] = sums[: len(chunk)]  # copied out into ordinary tensors, usable next to autograd
        rejected[chunk] = sums[len(chunk):]
    network.train(was_training)
    return {"chosen": chosen, "rejected": rejected}


def precompute_reference(
    run_dir: Path, reference: Reference, splits: dict[str, list[dict[str, Any]]], forward: PairForward,
    batch_size: int,
) -> dict[str, dict[str, torch.Tensor]]:
    """Reference log-probs of every split, from `<run>/ref_logps.safetensors` when it matches the data, the
    precision and the reference network's weights (a rerun with another model in the same folder
    recomputes)."""
    path = run_dir / REF_LOGPS_FILE
    precision = {
        "bf16": str(forward.bf16), "float32_attention": str(forward.bf16 and forward.float32_attention),
    }
    with reference.network() as network:
        prints = (
            {name: fingerprint(pairs) for name, pairs in splits.items()} | precision
            | {"reference_weights": weights_fingerprint(network)}
        )
        cached = _read_cached(path, prints, splits)
        if cached is not None:
            logger.info("reference log-probs reused from %s", path)
            return cached
        results = {
            name: sharded_sequence_logps(network, pairs, forward.pad_token_id, batch_size, forward)
            for name, pairs in splits.items()
        }
    tensors = {f"{name}/{side}": values for name, sides in results.items() for side, values in sides.items()}
    distributed.on_main_process(_write_reference_logps, path, tensors, prints)
    return results


def _write_reference_logps(path: Path, tensors: dict[str, torch.Tensor], prints: dict[str, str]) -> None:
    with writing(path, "set train.output_dir to another folder"), atomic_file(path) as staging:
        save_file(tensors, str(staging), metadata=prints)  # atomic: a torn file would block every resume


def sharded_sequence_logps(
    network, pairs: list[dict[str, Any]], pad_token_id: int, batch_size: int, forward: PairForward,
) -> dict[str, torch.Tensor]:
    """sequence_logps of every pair, each process computing a contiguous 1/N (the frozen network's forwards
    have no collective) and the shares gathered back in pair order."""
    if distributed.world_size() == 1:
        return sequence_logps(network, pairs, pad_token_id, batch_size, forward)

    def share_logps(share: list[dict[str, Any]]) -> list[tuple[float, float]]:
        if not share:
            return []
        values = sequence_logps(network, share, pad_token_id, batch_size, forward)
        return list(zip(values["chosen"].tolist(), values["rejected"].tolist(), strict=True))

    rows = distributed.map_shards(share_logps, pairs)
    return {
        side: torch.tensor([row[column] for row in rows], dtype=torch.float32)
        for column, side in enumerate(("chosen", "rejected"))
    }


def _read_cached(
    path: Path, prints: dict[str, str], splits: dict[str, list[dict[str, Any]]],
) -> dict[str, dict[str, torch.Tensor]] | None:
    """The cached log-probs when `path` holds them for these prints (data, precision, reference weights),
    with one finite value per pair of each split; None when it does not. A file that cannot be read (torn or
    corrupt) is reported and recomputed rather than stopping the run."""
    if not path.exists():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            stored = handle.metadata() or {}
            if any(stored.get(name) != value for name, value in prints.items()):
                return None  # another data set, precision or reference: recomputed, silently
            cached = {
                name: {side: handle.get_tensor(f"{name}/{side}") for side in ("chosen", "rejected")}
                for name in splits
            }
    except Exception as error:  # noqa: BLE001 -- safetensors raises its own error types, OSError, ...
        logger.warning("%s cannot be read (%s): computing the reference log-probs again", path, error)
        return None
    for name, sides in cached.items():
        for side, values in sides.items():
            if values.shape != (len(splits[name]),) or not bool(torch.isfinite(values).all()):
                logger.warning(
                    "%s holds %s/%s of shape %s (expected (%d,) finite values): computing the reference "
                    "log-probs again", path, name, side, tuple(values.shape), len(splits[name]),
                )  # fmt: skip
                return None
    return cached


def on_the_fly_reference(reference: Reference, forward: PairForward):
    """Reference log-probs per micro-batch (precompute_ref_logps off): a frozen network kept for the whole
    run (`Reference(policy, snapshot=True)`: a copy for full fine-tuning, adapters off for LoRA)."""

    @torch.no_grad()
    def reference_logps(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        with reference.network() as network:
            was_training = network.training
            network.eval()
            sums = forward(network, batch).sums  # (2B,)
            network.train(was_training)
        pairs = sums.shape[0] // 2
        return sums[:pairs], sums[pairs:]

    return reference_logps
