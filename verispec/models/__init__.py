"""Models: loading, tokenizer compatibility, and backends that own the KV cache and its rollback."""

from verispec.models.backend import CausalLM, KVSession, TransformersLM
from verispec.models.lean import LeanLM
from verispec.models.lean_gpt2 import LeanGPT2
from verispec.models.loading import (
    check_compatible,
    demo_pair,
    load_model,
    load_tokenizer,
    reference_pair,
    resolve_device,
    resolve_dtype,
)

__all__ = [
    "CausalLM",
    "KVSession",
    "LeanGPT2",
    "LeanLM",
    "TransformersLM",
    "check_compatible",
    "demo_pair",
    "load_model",
    "load_tokenizer",
    "reference_pair",
    "resolve_device",
    "resolve_dtype",
]
