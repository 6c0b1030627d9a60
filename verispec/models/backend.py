"""Backends: a causal LM and the KV cache it owns.

The engine and the proposers see two things only: `CausalLM.session()` opens a KV cache for one
sequence, and a `KVSession` extends it by tokens (returning their logits) or rolls it back to a
shorter length. Rolling back never recomputes the kept prefix. Two backends implement this:
`TransformersLM` here (any Hugging Face causal LM) and the lean backend, `LeanLM` in `lean.py`
(Llama family) and `LeanGPT2` in `lean_gpt2.py` (own forward pass, preallocated cache).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Protocol

import torch
from transformers import DynamicCache, PreTrainedModel


class KVSession(Protocol):
    """One sequence's KV cache. `length` is the number of positions it holds."""

    length: int

    def extend(self, token_ids: Sequence[int], last_only: bool = False) -> torch.Tensor:
        """Append tokens at positions length.. and return their logits, (T, V) float32,
        or (1, V) for the last token only."""
        ...

    def rollback(self, length: int) -> None:
        """Forget positions >= length (rejected drafts)."""
        ...


class CausalLM(Protocol):
    name: str
    backend: str  # "transformers" or "lean"
    device: torch.device
    dtype: torch.dtype
    vocab_size: int  # width of the logits
    max_positions: int | None
    eos_token_ids: frozenset[int]  # from the model's generation config

    def session(self, capacity: int | None = None) -> KVSession:
        """A new, empty KV cache; `capacity` is a hint of the most positions it will hold."""
        ...


def generation_eos(config) -> frozenset[int]:
    eos = getattr(config, "eos_token_id", None) if config is not None else None
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)


class TransformersLM:
    """A loaded Hugging Face causal LM behind the narrow interface the engine needs."""

    backend = "transformers"

    def __init__(self, model: PreTrainedModel, name: str):
        self.model = model.eval()
        self.name = name
        self.device = model.device
        self.dtype = model.dtype
        # Output embedding rows, not the tokenizer length: logits have this width.
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        # transformers 5.x renamed `past_key_values` to `cache` in model forwards.
        forward_params = inspect.signature(model.forward).parameters
        self.cache_argument = "cache" if "cache" in forward_params else "past_key_values"
        config = model.config
        self.max_positions: int | None = getattr(config, "max_position_embeddings", None) or getattr(
            config, "n_positions", None
        )
        self.eos_token_ids = generation_eos(model.generation_config)

    def session(self, capacity: int | None = None) -> TransformersSession:
        return TransformersSession(self)


class TransformersSession:
    """A transformers DynamicCache; rollback crops it."""

    def __init__(self, lm: TransformersLM):
        self.lm = lm
        self.cache = DynamicCache(config=lm.model.config)
        self.length = 0

    @torch.inference_mode()
    def extend(self, token_ids: Sequence[int], last_only: bool = False) -> torch.Tensor:
        ids = torch.tensor([token_ids], dtype=torch.long, device=self.lm.device)  # (1, T)
        cache = {self.lm.cache_argument: self.cache}
        out = self.lm.model(input_ids=ids, use_cache=True, logits_to_keep=1 if last_only else 0, **cache)
        self.length += len(token_ids)
        return out.logits[0].float()

    def rollback(self, length: int) -> None:
        if length < self.length:
            self.cache.crop(length - self.length)
            self.length = length
