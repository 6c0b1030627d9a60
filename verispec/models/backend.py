"""The transformers backend: a causal LM and the KV cache it owns.

The engine and the proposers see two things only: `CausalLM.session()` opens a KV cache for one
sequence, and a `KVSession` extends it by tokens (returning their logits) or rolls it back to a
shorter length. Rolling back never recomputes the kept prefix.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from transformers import DynamicCache, PreTrainedModel


class CausalLM:
    """A loaded Hugging Face causal LM behind the narrow interface the engine needs."""

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

    def session(self) -> KVSession:
        return KVSession(self)


class KVSession:
    """One sequence's KV cache. `length` is the number of positions it holds."""

    def __init__(self, lm: CausalLM):
        self.lm = lm
        self.cache = DynamicCache(config=lm.model.config)
        self.length = 0

    @torch.inference_mode()
    def extend(self, token_ids: Sequence[int], last_only: bool = False) -> torch.Tensor:
        """Append tokens at positions length.. and return their logits, (T, V) float32,
        or (1, V) for the last token only (the LM head then runs on one position)."""
        ids = torch.tensor([token_ids], dtype=torch.long, device=self.lm.device)  # (1, T)
        cache = {self.lm.cache_argument: self.cache}
        out = self.lm.model(input_ids=ids, use_cache=True, logits_to_keep=1 if last_only else 0, **cache)
        self.length += len(token_ids)
        return out.logits[0].float()

    def rollback(self, length: int) -> None:
        """Forget positions >= length (rejected drafts)."""
        if length < self.length:
            self.cache.crop(length - self.length)
            self.length = length
