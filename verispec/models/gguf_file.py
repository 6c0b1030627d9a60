"""GGUF files as checkpoints: the weights, config, name and end tokens of a model in one file.

GGUF is the format most CPU users hold their models in (llama.cpp's). The file is read with the
`gguf` package, the format's own reader, memory-mapped. Block-quantized tensors stay in their
format (`quant.QuantWeight`) and run on the quantized kernel; F32, F16 and BF16 tensors become
float32 tensors holding the same values (16-bit ones then run on the widening kernel). The
tokenizer and its chat template come from the file's metadata through transformers' GGUF
tokenizer conversion (`load_gguf_tokenizer`).

llama.cpp's converter stores a Llama model's query and key rows permuted for its interleaved
rotary layout; they are put back into the rotate-half order of Hugging Face checkpoints here
(rows only: a quantized row's blocks are untouched).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from transformers import AutoTokenizer, LlamaConfig, PretrainedConfig, PreTrainedTokenizerBase, Qwen2Config

from verispec.errors import UserError
from verispec.models.quant import QUANTIZED, QuantWeight, check_shape

log = logging.getLogger(__name__)

FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
SUPPORTED_TYPES = ", ".join(t.name for t in (*FLOAT_TYPES, *QUANTIZED))
ARCHITECTURES = {"llama": LlamaConfig, "qwen2": Qwen2Config}  # Mistral files say llama
PERMUTED_ROTARY = {"llama"}  # architectures whose q/k rows llama.cpp's converter permutes

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_MODEL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


def gguf_path(ref: str) -> Path | None:
    """The GGUF file `ref` names: the file itself, or the one .gguf in a folder without a
    config.json; None if `ref` is not a GGUF checkpoint."""
    path = Path(ref).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise UserError(f"GGUF file {ref} does not exist")
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        files = sorted(path.glob("*.gguf"))
        if len(files) > 1:
            raise UserError(f"{ref} holds {len(files)} GGUF files ({', '.join(f.name for f in files[:4])}); pass one file")
        if files:
            return files[0]
    return None


class GGUFCheckpoint:
    """One GGUF file, read once (memory-mapped); see the module docstring."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.reader = GGUFReader(path)
        except (ValueError, OSError) as exc:
            raise UserError(f"could not read the GGUF file {path}: {exc}") from None
        self.architecture = str(self._field("general.architecture", ""))
        if self.architecture not in ARCHITECTURES:
            raise UserError(
                f"GGUF file {path.name}: architecture {self.architecture!r} is not supported "
                f"(supported: {', '.join(ARCHITECTURES)})"
            )
        self.name = str(self._field("general.name", "") or path.stem)
        self.config = self._config()

    def _field(self, key: str, default=None):
        field = self.reader.get_field(key)
        return default if field is None else field.contents()

    def _config(self) -> PretrainedConfig:
        arch = self.architecture
        heads = int(self._field(f"{arch}.attention.head_count"))
        hidden = int(self._field(f"{arch}.embedding_length"))
        tensors = {t.name: t for t in self.reader.tensors}
        if "token_embd.weight" not in tensors:
            raise UserError(f"GGUF file {self.path.name} has no token_embd.weight; is it a language model?")
        vocab = int(tensors["token_embd.weight"].shape[-1])  # (D, V), innermost first
        key_length = self._field(f"{arch}.attention.key_length")
        options = dict(
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(self._field(f"{arch}.feed_forward_length")),
            num_hidden_layers=int(self._field(f"{arch}.block_count")),
            num_attention_heads=heads,
            num_key_value_heads=int(self._field(f"{arch}.attention.head_count_kv", heads)),
            max_position_embeddings=int(self._field(f"{arch}.context_length", 2048)),
            rms_norm_eps=float(self._field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(self._field(f"{arch}.rope.freq_base", 10000.0)),
            tie_word_embeddings="output.weight" not in tensors,
            bos_token_id=self._field("tokenizer.ggml.bos_token_id"),
            eos_token_id=sorted(self.eos_token_ids) or None,
        )
        if key_length and int(key_length) != hidden // heads:
            options["head_dim"] = int(key_length)
        if self._field(f"{arch}.rope.scaling.type", "none") not in ("none", None):
            raise UserError(f"GGUF file {self.path.name}: rotary scaling is not supported")
        return ARCHITECTURES[arch](**options)

    @functools.cached_property
    def eos_token_ids(self) -> frozenset[int]:
        ids = (self._field(f"tokenizer.ggml.{key}_token_id") for key in ("eos", "eot", "eom"))
        return frozenset(int(i) for i in ids if i is not None)

    def check_types(self) -> None:
        """Refuse a file holding a tensor type the backend does not run, naming it."""
        for tensor in self.reader.tensors:
            if tensor.tensor_type not in FLOAT_TYPES and tensor.tensor_type not in QUANTIZED:
                raise UserError(
                    f"GGUF file {self.path.name}: tensor {tensor.name} is {tensor.tensor_type.name}, "
                    f"which verispec does not run (supported: {SUPPORTED_TYPES})"
                )

    def weights(self) -> dict[str, torch.Tensor | QuantWeight]:
        """Every tensor under its Hugging Face name: float32 tensors, or quantized weights."""
        self.check_types()
        config = self.config
        weights: dict[str, torch.Tensor | QuantWeight] = {}
        for tensor in self.reader.tensors:
            name = _hf_name(tensor.name)
            if name is None:
                log.debug("GGUF %s: ignoring tensor %s", self.path.name, tensor.name)
                continue
            weight = _tensor(tensor)
            if self.architecture in PERMUTED_ROTARY and name.endswith(("q_proj.weight", "k_proj.weight")):
                heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
                weight = _unpermute_rows(weight, heads)
            weights[name] = weight
        return weights


def _hf_name(name: str) -> str | None:
    if name in _MODEL_NAMES:
        return _MODEL_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    return None


def _tensor(tensor) -> torch.Tensor | QuantWeight:
    kind = tensor.tensor_type
    data = np.array(tensor.data)  # a copy out of the memory map
    if kind in QUANTIZED:
        in_features = int(tensor.shape[0])  # GGUF lists dimensions innermost first
        check_shape(kind, in_features, tensor.name)
        return QuantWeight(kind, torch.from_numpy(data.reshape(data.shape[0], -1)), in_features)
    shape = tuple(int(d) for d in reversed(tensor.shape))
    if kind == GGMLQuantizationType.BF16:
        return torch.from_numpy(data.view(np.int16)).view(torch.bfloat16).float().reshape(shape)
    return torch.from_numpy(data).float().reshape(shape)


def _unpermute_rows(weight: torch.Tensor | QuantWeight, heads: int) -> torch.Tensor | QuantWeight:
    """Undo llama.cpp's rotary permutation of query/key rows (per head: pairs interleaved back
    into halves)."""
    rows = weight.out_features if isinstance(weight, QuantWeight) else weight.shape[0]
    order = torch.arange(rows).reshape(heads, rows // heads // 2, 2).transpose(1, 2).reshape(rows)
    return weight.rows(order) if isinstance(weight, QuantWeight) else weight[order].contiguous()


@functools.cache
def open_checkpoint(path: Path) -> GGUFCheckpoint:
    """The checkpoint at `path`, read once per process (the target's and a draft's tokenizer,
    config and weights all come from it)."""
    return GGUFCheckpoint(path)


def load_gguf_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The tokenizer and chat template stored in the file's metadata (transformers' conversion)."""
    try:
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"could not build the tokenizer of GGUF file {path.name}: {str(exc).splitlines()[0]}") from None
