"""The frozen reference: LoRA adapters off, a frozen copy, checks that a separate reference fits the
policy."""

from __future__ import annotations

import contextlib
import copy
import hashlib

import torch

from prefalign.errors import ModelError
from prefalign.models.loading import (
    LOADED_ADAPTER,
    is_peft_model,
)


@contextlib.contextmanager
def reference_mode(model):
    """The frozen reference of a LoRA policy is the same network with its adapters switched off."""
    if not is_peft_model(model):
        raise ModelError(
            "reference_mode needs a LoRA (peft) model; load a separate reference model otherwise"
        )
    with model.disable_adapter():
        yield model


def check_same_tokenizer(policy_tokenizer, reference_tokenizer, where: str) -> None:
    """DPO compares the same token ids under two models: the vocabularies must be identical."""
    policy_vocab, reference_vocab = policy_tokenizer.get_vocab(), reference_tokenizer.get_vocab()
    differing = sorted(set(policy_vocab.items()) ^ set(reference_vocab.items()), key=lambda item: item[1])[:3]
    special = [
        name for name in ("bos_token_id", "eos_token_id")
        if getattr(policy_tokenizer, name) != getattr(reference_tokenizer, name)
    ]  # fmt: skip
    if differing or special:
        detail = (
            f"tokens that differ (token, id): {differing}" if differing else f"different {', '.join(special)}"
        )
        raise ModelError(
            f"the reference model {where} does not share the policy's tokenizer ({len(reference_vocab)} "
            f"vs {len(policy_vocab)} tokens; {detail}). DPO compares log-probs of the same token ids "
            "under both models, so they must use one tokenizer: pick a reference from the policy's own "
            "family (usually the SFT model the policy starts from), or leave `reference` empty to use "
            "the policy's initial weights."
        )


def check_reference_model(policy, reference) -> None:
    """A reference given as a model object: at least its vocabulary size must match the policy's."""
    policy_size = policy.get_input_embeddings().num_embeddings
    reference_size = reference.get_input_embeddings().num_embeddings
    if policy_size != reference_size:
        raise ModelError(
            f"the reference model has {reference_size} token embeddings but the policy has {policy_size}: "
            "they do not share a tokenizer, so their log-probs of the same ids cannot be compared. Pass a "
            "reference from the policy's own family, or reference=None to use the policy's initial weights."
        )


def weights_fingerprint(network) -> str:
    """Identifies a network's weights cheaply: each tensor's name, shape, sum and sum of squares (float64).
    Called before training, when the network playing the reference holds its initial weights."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in network.state_dict().items():
            values = tensor.detach().double()
            digest.update(
                f"{name}{tuple(tensor.shape)}{values.sum().item():.17g}"
                f"{values.square().sum().item():.17g}".encode()
            )
    return digest.hexdigest()[:32]


def frozen_copy(model, dtype: torch.dtype | None = None):
    """The policy as it is now, frozen and detached from further training (merged when it carries LoRA), in
    `dtype` when given (FSDP's fp32 master weights: the copy only runs forwards, in the compute dtype)."""
    clone = copy.deepcopy(model)
    if is_peft_model(clone):
        clone = clone.merge_and_unload()
    if dtype is not None:
        clone = clone.to(dtype)
    return clone.eval().requires_grad_(False)


class Reference:
    """The network that plays π_ref, chosen in one place (DPO, GRPO, PPO, iterative DPO):

    - `reference` given: that model, frozen (it must share the policy's tokenizer);
    - a LoRA policy whose adapters this run created: the same network with its adapters switched off (no
      second copy of the weights);
    - a LoRA policy loaded from a saved adapter folder (continued training): its reference is that adapter as
      saved, not the bare base, so it is treated as a full policy: a frozen merged copy with `snapshot` (one
      copy of the weights, as full fine-tuning needs), else the policy itself before its first update (DPO's
      precomputed log-probs);
    - otherwise, with `snapshot`: a frozen copy of the policy as it is now (merged, for a LoRA policy when
      `adapters_off` is False: iterative DPO's "previous" reference); without: the policy itself, valid only
      before its first update (DPO computes its reference log-probs once, before training, so full
      fine-tuning needs no copy at all).
    """

    def __init__(
        self, policy, reference=None, *, snapshot: bool = True, adapters_off: bool = True,
        dtype: torch.dtype | None = None,
    ):
        created_here = is_peft_model(policy) and not getattr(policy, LOADED_ADAPTER, None)
        self.adapters_off = adapters_off and reference is None and created_here
        if reference is not None:
            self.model = reference.eval().requires_grad_(False)
        elif self.adapters_off or not snapshot:
            self.model = policy
        else:
            self.model = frozen_copy(policy, dtype)
        self.is_policy = self.model is policy

    @contextlib.contextmanager
    def network(self, whole_policy=None):
        """The module to run for reference log-probs (with a LoRA policy's adapters off meanwhile).
        `whole_policy`: the policy's stand-in with whole weights (FSDP's gathered twin), used when the
        reference is the policy itself (a separate reference model is always whole)."""
        model = whole_policy if whole_policy is not None and self.is_policy else self.model
        if self.adapters_off:
            with reference_mode(model):
                yield model
        else:
            yield model
