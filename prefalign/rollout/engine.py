"""The rollout engine: sampling completions (with their log-probs) for rejection sampling, GRPO and PPO.

`LocalEngine` runs any Hugging Face causal LM on CPU or one GPU:

- each prompt is prefilled once (left-padded batch of unique prompts) and its KV cache is then
  repeated n times along the batch, so the n samples share one prefill;
- decoding runs one token per step for the whole batch with the model's KV cache, and rows that have
  finished are dropped from the batch (and the cache) so they cost nothing afterwards;
- the KV cache is the model's DynamicCache with its full-attention layers preallocated for
  prompt + max_new_tokens, so a decode step writes one slice instead of re-concatenating the cache;
- every sampled token comes back with its log-prob under log_softmax(logits / T) over the full
  vocabulary: the number GRPO / PPO need as log π_old, not the top-k / top-p renormalised draw;
- sampling is keyed: the random number behind sample j of a prompt at decode step t is a hash of
  (seed, the prompt's key, j, t), so a prompt's completions do not depend on the batch it runs in, its
  place in the call, or which process samples it (multi-process training shards prompts by their global
  index, which is their key).

Other backends (a vLLM server, say) implement `RolloutBackend`; trainers only call `generate`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from prefalign.losses import token_logprobs
from prefalign.models.loading import model_device
from prefalign.rollout.kv_cache import cache_keyword, forward_parameters, preallocated_cache
from prefalign.rollout.types import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, Sample, SamplingParams


@dataclass
class _Stops:
    """What ends a row, resolved once per call."""

    eos_ids: torch.Tensor  # (num_eos,) long; empty when ignore_eos
    stop_ids: torch.Tensor  # (num_stop,) long
    strings: list[str] = field(default_factory=list)


@dataclass
class _ActiveRows:
    """The rows still decoding; every tensor is indexed by position in the active batch."""

    row_ids: torch.Tensor  # (active,) long: index of the row in the chunk's output tables
    attention_mask: torch.Tensor  # (active, prompt_len + max_new_tokens) long; 0 on left padding
    next_positions: torch.Tensor  # (active,) long: position id of the token fed next
    cache: DynamicCache

    def keep(self, keep_index: torch.Tensor) -> None:
        """Drop finished rows from the batch and from every layer of the KV cache."""
        self.row_ids = self.row_ids[keep_index]
        self.attention_mask = self.attention_mask[keep_index]
        self.next_positions = self.next_positions[keep_index]
        self.cache.batch_select_indices(keep_index)


class LocalEngine:
    """Batched sampling with a KV cache on the model's own device (CPU or one GPU).

    `batch_size` caps the sequences (prompts x n) decoded together. A prompt's n samples always run
    in the same batch, because they share its prefill: a batch holds max(1, batch_size // n) prompts.
    After a call, `last_stats` counts the tokens the model actually ran on.

    A fixed seed gives the same samples for the same prompt keys and params, whatever the batch_size
    or the other prompts of the call (up to float rounding of the logits in another batch shape).
    """

    def __init__(self, model, tokenizer, *, batch_size: int = 64):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.last_stats: dict[str, int] = {}
        self._cache_kwarg = cache_keyword(model)
        self._can_keep_last_logits = "logits_to_keep" in forward_parameters(model)

    # ---- public -------------------------------------------------------------------------------------

    def generate(
        self, prompt_token_ids: list[list[int]], params: SamplingParams, keys: list[int] | None = None,
    ) -> list[list[Sample]]:
        """prompt_token_ids: one token list per prompt (already templated; no special tokens are added).
        keys: one integer per prompt naming its random stream (default: its index in this call).

        Returns one list of `params.n` samples per prompt, in prompt order.
        """
        params.validate()
        for index, prompt in enumerate(prompt_token_ids):
            if len(prompt) == 0:
                raise ValueError(f"prompt {index} is empty: a prompt needs at least one token")
        self.last_stats = {
            "prefill_tokens": 0,
            "prefill_padded_tokens": 0,
            "decode_tokens": 0,
            "forward_calls": 0,
            "generated_tokens": 0,
        }
        if not prompt_token_ids:
            return []

        device = model_device(self.model)
        keys = list(range(len(prompt_token_ids))) if keys is None else list(keys)
        if len(keys) != len(prompt_token_ids):
            raise ValueError(f"{len(keys)} keys for {len(prompt_token_ids)} prompts: give one key per prompt")
        seed = random.SystemRandom().getrandbits(62) if params.seed is None else params.seed
        stops = self._resolve_stops(params, device)

        # Similar lengths in one batch waste less compute on padding; the order is restored below.
        order = sorted(range(len(prompt_token_ids)), key=lambda index: len(prompt_token_ids[index]))
        prompts_per_batch = max(1, self.batch_size // params.n)
        results: list[list[Sample] | None] = [None] * len(prompt_token_ids)
        modes = _set_eval(self.model)
        try:
            with torch.inference_mode():
                for start in range(0, len(order), prompts_per_batch):
                    indices = order[start : start + prompts_per_batch]
                    prompts = [list(prompt_token_ids[index]) for index in indices]
                    streams = torch.tensor(
                        [stream_key(seed, keys[index], j) for index in indices for j in range(params.n)],
                        dtype=torch.long, device=device,
                    )  # fmt: skip
                    for index, samples in zip(
                        indices, self._generate_batch(prompts, params, stops, streams), strict=True
                    ):
                        results[index] = samples
        finally:
            _restore_modes(modes)
        return results  # type: ignore[return-value]

    # ---- one batch of prompts -------------------------------------------------------------------------

    def _generate_batch(
        self, prompts, params: SamplingParams, stops: _Stops, streams: torch.Tensor
    ) -> list[list[Sample]]:
        """streams: (prompts x n,) each row's random stream (stream_key)."""
        n, max_new = params.n, params.max_new_tokens
        logits, rows = self._prefill(prompts, max_new)  # logits: (prompts, vocab)
        # Share the prefill: repeat each prompt's cache, mask and last logits for its n samples.
        if n > 1:
            rows.cache.batch_repeat_interleave(n)
            rows.attention_mask = rows.attention_mask.repeat_interleave(n, dim=0)
            rows.next_positions = rows.next_positions.repeat_interleave(n, dim=0)
            logits = logits.repeat_interleave(n, dim=0)
        num_rows = len(prompts) * n
        rows.row_ids = torch.arange(num_rows, device=logits.device)
        prompt_width = rows.attention_mask.shape[1] - max_new

        # Outputs stay on the device until the end: one transfer instead of one per step.
        token_table = torch.zeros(num_rows, max_new, dtype=torch.long, device=logits.device)
        logprob_table = torch.zeros(num_rows, max_new, dtype=torch.float32, device=logits.device)
        lengths = [max_new] * num_rows
        reasons = [FINISH_LENGTH] * num_rows
        # Stop strings need each row's tokens on the host as they come.
        host_tokens: list[list[int]] | None = [[] for _ in range(num_rows)] if stops.strings else None

        for step in range(max_new):
            uniforms = keyed_uniforms(streams[rows.row_ids], step)  # (active,)
            tokens, logprobs = sample_next_tokens(logits, params, uniforms)  # (active,), (active,)
            token_table[rows.row_ids, step] = tokens
            logprob_table[rows.row_ids, step] = logprobs
            self.last_stats["generated_tokens"] += tokens.shape[0]
            finished, num_finished = self._mark_finished(
                tokens, rows.row_ids, step, params, stops, lengths, reasons, host_tokens
            )
            if num_finished == tokens.shape[0]:
                break
            if num_finished:
                keep_index = torch.nonzero(~finished).squeeze(1)
                rows.keep(keep_index)
                tokens = tokens[keep_index]
            logits = self._decode_step(tokens, rows, prompt_width + step + 1)

        return self._collect(token_table, logprob_table, lengths, reasons, stops, n)

    def _prefill(self, prompts: list[list[int]], max_new: int) -> tuple[torch.Tensor, _ActiveRows]:
        """Left-pad the prompts and run them once. Returns last-position logits (prompts, vocab) and rows."""
        device = model_device(self.model)
        width = max(len(prompt) for prompt in prompts)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        # The mask already holds ones for the tokens to come, so decoding only slices it.
        attention_mask = torch.zeros((len(prompts), width + max_new), dtype=torch.long)
        attention_mask[:, width:] = 1
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[row, width - len(prompt) : width] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        prompt_mask = attention_mask[:, :width]
        # Positions count real tokens only, so a padded prompt is computed exactly as if it were alone.
        position_ids = (prompt_mask.cumsum(dim=1) - 1).clamp(min=0)  # (prompts, width)

        cache = preallocated_cache(self.model.config, capacity=width + max_new)
        logits = self._forward(input_ids, prompt_mask, position_ids, cache, last_only=True)
        self.last_stats["prefill_tokens"] += sum(len(prompt) for prompt in prompts)
        self.last_stats["prefill_padded_tokens"] += input_ids.numel()
        next_positions = prompt_mask.sum(dim=1)  # (prompts,)
        rows = _ActiveRows(torch.arange(len(prompts), device=device), attention_mask, next_positions, cache)
        return logits, rows

    def _decode_step(self, tokens: torch.Tensor, rows: _ActiveRows, seen: int) -> torch.Tensor:
        """Feed one token per active row. tokens: (active,); returns next logits (active, vocab)."""
        logits = self._forward(
            tokens.unsqueeze(1), rows.attention_mask[:, :seen], rows.next_positions.unsqueeze(1), rows.cache
        )
        rows.next_positions = rows.next_positions + 1
        self.last_stats["decode_tokens"] += tokens.shape[0]
        return logits

    def _forward(self, input_ids, attention_mask, position_ids, cache, *, last_only: bool = False):
        kwargs = {self._cache_kwarg: cache}
        if last_only and self._can_keep_last_logits:
            kwargs["logits_to_keep"] = 1  # the prompt's other positions never need the vocabulary projection
        output = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **kwargs,
        )
        self.last_stats["forward_calls"] += 1
        return output.logits[:, -1, :].float()  # (batch, vocab)

    # ---- stopping ---------------------------------------------------------------------------------------

    def _resolve_stops(self, params: SamplingParams, device) -> _Stops:
        eos = [] if params.ignore_eos else _as_id_list(self.tokenizer.eos_token_id)
        stop = [token for token in (params.stop_token_ids or []) if token not in eos]
        return _Stops(
            eos_ids=torch.tensor(eos, dtype=torch.long, device=device),
            stop_ids=torch.tensor(stop, dtype=torch.long, device=device),
            strings=list(params.stop_strings or []),
        )

    def _mark_finished(self, tokens, row_ids, step, params, stops: _Stops, lengths, reasons, host_tokens):
        """Which active rows end with this token; records their length and reason.

        Returns finished (active,) bool and how many rows finished.
        """
        is_eos = torch.isin(tokens, stops.eos_ids)
        is_stop = torch.isin(tokens, stops.stop_ids)
        if host_tokens is not None:
            is_stop |= self._hits_stop_string(tokens, row_ids, stops.strings, host_tokens)
        finished = is_eos | is_stop
        if step == params.max_new_tokens - 1:
            finished = torch.ones_like(finished)
        ended = torch.nonzero(finished).squeeze(1)
        if ended.numel():
            ended_rows = row_ids[ended].tolist()
            ended_eos, ended_stop = is_eos[ended].tolist(), is_stop[ended].tolist()
            for row, eos, stop in zip(ended_rows, ended_eos, ended_stop, strict=True):
                lengths[row] = step + 1
                reasons[row] = FINISH_EOS if eos else FINISH_STOP if stop else FINISH_LENGTH
        return finished, ended.numel()

    def _hits_stop_string(
        self, tokens, row_ids, strings: list[str], host_tokens: list[list[int]]
    ) -> torch.Tensor:
        """Decode each active row's completion so far and look for a stop string. Returns (active,) bool."""
        rows = row_ids.tolist()
        for row, token in zip(rows, tokens.tolist(), strict=True):
            host_tokens[row].append(token)
        # Whole completions, not a tail: a stop string may span tokens, and decoding a tail is not
        # always a suffix of the full text (byte-level and sentencepiece decoders).
        decoded = self.tokenizer.batch_decode([host_tokens[row] for row in rows], skip_special_tokens=True)
        hits = [any(stop in text for stop in strings) for text in decoded]
        return torch.tensor(hits, dtype=torch.bool, device=tokens.device)

    # ---- results --------------------------------------------------------------------------------------

    def _collect(
        self, token_table, logprob_table, lengths, reasons, stops: _Stops, n: int
    ) -> list[list[Sample]]:
        all_tokens, all_logprobs = token_table.tolist(), logprob_table.tolist()
        token_ids = [tokens[:length] for tokens, length in zip(all_tokens, lengths, strict=True)]
        texts = self.tokenizer.batch_decode(token_ids, skip_special_tokens=True)
        samples = [
            Sample(ids, _cut_at_stop(text, stops.strings), logprobs[:length], reason)
            for ids, text, logprobs, length, reason in zip(
                token_ids, texts, all_logprobs, lengths, reasons, strict=True
            )
        ]
        return [samples[start : start + n] for start in range(0, len(samples), n)]


def generate(
    model, tokenizer, prompt_token_ids, params: SamplingParams, **engine_kwargs
) -> list[list[Sample]]:
    """One-off convenience: `LocalEngine(model, tokenizer, **engine_kwargs).generate(...)`."""
    return LocalEngine(model, tokenizer, **engine_kwargs).generate(prompt_token_ids, params)


def sample_next_tokens(
    logits: torch.Tensor, params: SamplingParams, uniforms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: (batch, vocab) float32; uniforms: (batch,) in (0, 1), one per row. Returns tokens (batch,)
    and their log-probs (batch,).

    The log-prob is log_softmax(logits / T) over the full vocabulary (T = 1 when greedy): top-k and
    top-p only shape the draw, they do not change the number reported.
    """
    if params.temperature == 0.0:
        tokens = logits.argmax(dim=-1)
        return tokens, token_logprobs(logits.unsqueeze(1), tokens.unsqueeze(1)).squeeze(1)
    scaled = logits / params.temperature
    draw = _filter_top_k(scaled, params.top_k)
    draw = _filter_top_p(draw, params.top_p)
    # Inverse-CDF sampling: the token whose cumulative-probability interval holds u picks token i with
    # probability p_i, from one number per row (a filtered-out token has an empty interval). float64 sums
    # keep a 150k vocabulary's tail exact enough; no host sync.
    cumulative = torch.softmax(draw, dim=-1).double().cumsum(dim=-1)
    targets = uniforms.double().unsqueeze(1) * cumulative[:, -1:]
    tokens = torch.searchsorted(cumulative, targets, right=True).squeeze(1).clamp_(max=logits.shape[-1] - 1)
    # The full-vocabulary log-prob at temperature T, as the trainers compute it (losses.token_logprobs).
    return tokens, token_logprobs(scaled.unsqueeze(1), tokens.unsqueeze(1)).squeeze(1)


_MASK64 = (1 << 64) - 1


def _mix64(value: int) -> int:
    """splitmix64's finaliser on a Python int (a well-spread 64-bit hash)."""
    value = (value ^ (value >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    value = (value ^ (value >> 27)) * 0x94D049BB133111EB & _MASK64
    return value ^ (value >> 31)


def stream_key(seed: int, key: int, sample: int) -> int:
    """The random stream of sample `sample` of the prompt keyed `key` under `seed`, as a signed 63-bit int."""
    mixed = _mix64((_mix64((_mix64(seed & _MASK64) + key) & _MASK64) + sample) & _MASK64)
    return mixed >> 1


def keyed_uniforms(streams: torch.Tensor, step: int) -> torch.Tensor:
    """(rows,) float64 numbers in (0, 1): a hash of each row's stream and the decode step, with tensor ops
    on the device (a counter-based generator: no state, any row and step can be drawn in any order)."""
    # splitmix64 in int64 arithmetic: products wrap mod 2^64 and right shifts are made logical by masking.
    offset = (step + 1) * 0x9E3779B97F4A7C15 & _MASK64  # the golden-ratio increment, once per step
    value = streams + (offset - (1 << 64) if offset >= 1 << 63 else offset)
    value = (value ^ _shift_right(value, 30)) * -4658895280553007687  # 0xBF58476D1CE4E5B9
    value = (value ^ _shift_right(value, 27)) * -7723592293110705685  # 0x94D049BB133111EB
    value = value ^ _shift_right(value, 31)
    top53 = _shift_right(value, 11)  # 53 random bits: every float64 in (0, 1) step 2^-53
    return (top53.double() + 0.5) * 2.0**-53


def _shift_right(value: torch.Tensor, bits: int) -> torch.Tensor:
    return (value >> bits) & ((1 << (64 - bits)) - 1)


def _filter_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def _filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p (nucleus sampling)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, sorted_index = torch.sort(logits, dim=-1, descending=True)
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    # A token goes when the more likely ones already reach top_p; the most likely one always stays.
    remove_sorted = mass_before >= top_p
    remove = torch.zeros_like(remove_sorted).scatter(-1, sorted_index, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def _cut_at_stop(text: str, strings: list[str]) -> str:
    cuts = [text.find(stop) for stop in strings if stop in text]
    return text[: min(cuts)] if cuts else text


def _as_id_list(token_ids) -> list[int]:
    if token_ids is None:
        return []
    return [int(token_ids)] if isinstance(token_ids, int) else [int(token) for token in token_ids]


def _set_eval(model) -> list[tuple[torch.nn.Module, bool]]:
    # Remember each module's own flag: model.train() afterwards would also wake modules kept in eval on
    # purpose.
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    return modes


def _restore_modes(modes: list[tuple[torch.nn.Module, bool]]) -> None:
    for module, training in modes:
        module.training = training
