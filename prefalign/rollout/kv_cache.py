"""A KV cache preallocated for prompt + max_new_tokens (a decode step writes one slice), and how a model takes
it."""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class _PreallocatedLayer(DynamicLayer):
    """A DynamicLayer that writes into a buffer sized for prompt + max_new_tokens.

    DynamicLayer concatenates the whole cache with each new token (O(length^2) copying over a
    completion); here a token is one slice write. `keys` / `values` stay views of the filled part.
    """

    is_croppable = False  # `crop` from DynamicLayer would not know about the buffer

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, head_dim = key_states.shape
        self.device = key_states.device
        self.key_buffer = key_states.new_empty(batch, heads, self.capacity, head_dim)
        self.value_buffer = value_states.new_empty(
            batch, value_states.shape[1], self.capacity, value_states.shape[-1]
        )
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache overflow: {end} positions for a buffer of {self.capacity}")
        self.key_buffer[:, :, self.length : end] = key_states
        self.value_buffer[:, :, self.length : end] = value_states
        self.length = end
        self._refresh_views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.key_buffer = self.key_buffer.repeat_interleave(repeats, dim=0)
            self.value_buffer = self.value_buffer.repeat_interleave(repeats, dim=0)
            self._refresh_views()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.key_buffer = self.key_buffer[indices]
            self.value_buffer = self.value_buffer[indices]
            self._refresh_views()

    def _refresh_views(self) -> None:
        self.keys = self.key_buffer[:, :, : self.length]
        self.values = self.value_buffer[:, :, : self.length]


def preallocated_cache(config, capacity: int) -> DynamicCache:
    """The model's DynamicCache, with plain full-attention layers swapped for preallocated ones.

    Other layer kinds (sliding window, linear attention, ...) keep their own behaviour.
    """
    cache = DynamicCache(config=config)
    cache.layers = [
        _PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers
    ]
    return cache


def forward_parameters(model) -> set[str]:
    # A wrapper (PEFT, say) may hide the signature behind **kwargs: look at the model it wraps.
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(base.forward).parameters)


def cache_keyword(model) -> str:
    """transformers renamed `past_key_values` to `cache` during 5.x; use whichever this model takes."""
    parameters = forward_parameters(model)
    return "cache" if "cache" in parameters or "past_key_values" not in parameters else "past_key_values"


def generation_bytes(
    config, parameters: int, sequences: int, length: int, dtype: torch.dtype,
) -> dict[str, int]:
    """Memory one decode batch needs on a device, by part: `weights` (all `parameters` in `dtype`), `kv_cache`
    (keys and values of every layer for `sequences` x `length` tokens) and `logits` (one step's fp32 logits).
    From the model config's layers, key/value heads and head size."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    size = torch.tensor([], dtype=dtype).element_size()
    return {
        "weights": parameters * size,
        "kv_cache": 2 * text.num_hidden_layers * kv_heads * head_dim * sequences * length * size,
        "logits": sequences * text.vocab_size * 4,
    }
