"""EAGLE-3 draft heads as their authors publish them, drafting for a lean verifier.

EAGLE-3 (Li et al. 2025) differs from our own head (`head.py`) in what it reads and how its layer
reads it:
- Its feature of a verified position is fc over the verifier's residual streams after three
  layers, low, middle and high, concatenated (3 D -> D). By default the layers are 1, N/2 - 1
  and N - 4 of the verifier's N (SafeAILab's EAGLE captures the inputs of layers 2, N/2 and
  N - 3, the same streams); a checkpoint may name others in `eagle_config`.
- Its one decoder layer ("midlayer") keeps the feature as its residual stream and attends over
  [RMSNorm(embedding of the token), RMSNorm(feature)], each norm with a weight of its own
  (`input_layernorm`, `hidden_norm`): q, k and v read 2 D.
- What it feeds back when drafting further is that layer's output before the final norm; its
  logits are lm_head(norm(output)) over a draft vocabulary whose id d is the verifier's
  d + d2t[d] (an offset, where ours stores the id).

Two layouts are read, both a Hugging Face style folder with `config.json` (model_type "llama",
`draft_vocab_size`, usually architectures ["LlamaForCausalLMEagle3"]):
- SafeAILab's EAGLE (`yuhuili/EAGLE3-*`): `pytorch_model.bin` or `model.safetensors`, without the
  embedding (the verifier's is used) and, where the draft vocabulary is the whole one, without d2t.
- SGLang's SpecForge: `model.safetensors` (or shards), with `embed_tokens.weight` (a frozen copy
  of the verifier's), `t2d`, optionally `fc_norm.{0,1,2}.weight` (a norm per captured stream),
  `target_hidden_size`, `norm_output` and `eagle_config.eagle_aux_hidden_state_layer_ids`.

The head runs on the verifier's CPU kernels one operation at a time (`lean.py`'s `_KernelOps`)
where its weights allow, else on torch operators; greedy chains are not drafted natively.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from verispec.errors import UserError
from verispec.models.kernels import VsAttention, kernel_library
from verispec.models.lean import LeanLM, _KernelOps, _Layer
from verispec.models.reference import TorchOps, llama_layers

ARCHITECTURE = "LlamaForCausalLMEagle3"


def is_eagle3(config: dict) -> bool:
    """Whether a checkpoint's config.json describes an EAGLE-3 head."""
    architectures = config.get("architectures") or []
    return any("Eagle3" in str(a) for a in architectures) or (
        config.get("model_type") == "llama" and "draft_vocab_size" in config
    )


def default_layers(verifier_layers: int) -> list[int]:
    """The verifier layers whose output an EAGLE-3 head reads, by the authors' default."""
    return [1, verifier_layers // 2 - 1, verifier_layers - 4]


@dataclass
class _Eagle3Layer(_Layer):
    hidden_norm: torch.Tensor = None  # (D,): the feature's norm; attn_norm is the embedding's


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint in `folder`, without a leading "model." in its name."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        weights = {k: v for name in files for k, v in load_file(folder / name).items()}
    elif (folder / "model.safetensors").is_file():
        weights = load_file(folder / "model.safetensors")
    elif (folder / "pytorch_model.bin").is_file():
        weights = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise OSError("no model.safetensors or pytorch_model.bin")
    return {k.removeprefix("model."): v for k, v in weights.items()}


class Eagle3Head(LeanLM):
    """An EAGLE-3 head drafting for `target` (a LeanLM, which it asks to tap the layers it reads).
    The interface is our head's (`head.py`): `reads_inputs`, `read_features`, `d2t`,
    `target_logits`; a row is fed its token and a feature (D,), and a pass's features are the
    layer's output before the final norm, what the next row is fed."""

    reads_inputs = True

    def __init__(self, path: str, target: LeanLM):
        folder = Path(path).expanduser()
        try:
            config = json.loads((folder / "config.json").read_text())
            weights = _read_weights(folder)
        except (OSError, ValueError, RuntimeError) as exc:
            raise UserError(f"could not read the EAGLE-3 head in {path}: {exc}") from None
        self.name = path
        self.device, self.dtype = target.device, target.dtype
        self.kernel, self.compiled, self.checkpoint = target.kernel, False, None
        self.config, self.eos_token_ids = target.config, target.eos_token_ids
        self.requested_activations, self.dequantized = "float", 0
        self.target, self.target_vocab_size = target, target.vocab_size
        self.max_positions = target.max_positions

        def refuse(why: str):
            return UserError(f"the EAGLE-3 head in {path} {why}")

        D, Dt, N = config.get("hidden_size"), target.embed.shape[1], len(target.layers)
        if config.get("num_hidden_layers", 1) != 1 or not any(k.startswith("midlayer.") for k in weights):
            raise refuse("has no single decoder layer named midlayer, which EAGLE-3 heads have")
        if config.get("hidden_act", "silu") != "silu":
            raise refuse(f"uses activation {config['hidden_act']!r}; the lean backend runs silu")
        if config.get("vocab_size") != target.vocab_size:
            raise refuse(
                f"was made for a vocabulary of {config.get('vocab_size')} tokens, the verifier's has {target.vocab_size}"
            )
        if config.get("target_hidden_size", D) != Dt:
            raise refuse(
                f"reads features of width {config.get('target_hidden_size', D)}, the verifier's are {Dt}"
            )
        named = (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
        layers = named or default_layers(N)
        if len(layers) != 3 or not all(isinstance(i, int) and 0 <= i < N - 1 for i in layers):
            raise refuse(
                f"reads the output of verifier layers {layers}, which a verifier of {N} layers does not have "
                "(EAGLE-3 reads three inner layers; set eagle_config.eagle_aux_hidden_state_layer_ids)"
            )
        rope = config.get("rope_scaling") or {}
        scaling = rope.get("rope_type", rope.get("type", "default"))
        if scaling not in ("default", "linear"):
            raise refuse(f"uses rotary scaling {scaling!r}; default and linear are supported")

        embed = weights.pop("embed_tokens.weight", None)
        if D != Dt:  # a head narrower than the verifier carries the embedding it was trained with
            if embed is None or embed.shape != (target.vocab_size, D):
                raise refuse(f"is {D} wide and the verifier {Dt}, and it holds no embedding of its width")
            self.embed = embed.to(device=self.device, dtype=self.dtype)
        else:
            self.embed = target.embed  # the verifier's (SpecForge's copy of it is frozen in training)
        self.heads = config["num_attention_heads"]
        self.kv_heads = config.get("num_key_value_heads") or self.heads
        self.gqa = self.kv_heads != self.heads
        self.head_dim = config.get("head_dim") or D // self.heads
        self.eps = config.get("rms_norm_eps", 1e-6)
        theta = config.get("rope_theta", 10000.0)
        inv_freq = 1.0 / theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim)
        positions = torch.arange(self.max_positions, dtype=torch.float32) / rope.get("factor", 1.0)
        angles = torch.cat([torch.outer(positions, inv_freq)] * 2, dim=-1)
        self.cos = angles.cos().to(device=self.device, dtype=self.dtype)
        self.sin = angles.sin().to(device=self.device, dtype=self.dtype)

        try:
            self.fc = self.linear(weights.pop("fc.weight"))
            norms = [weights.pop(f"fc_norm.{i}.weight", None) for i in range(3)]
            self.fc_norm = (
                None if norms[0] is None else [w.to(device=self.device, dtype=self.dtype) for w in norms]
            )
            layer = self.read_layer(weights, "midlayer.")
            hidden_norm = weights.pop("midlayer.hidden_norm.weight").to(device=self.device, dtype=self.dtype)
            self.layers = [_Eagle3Layer(**vars(layer), hidden_norm=hidden_norm)]
            self.norm = weights.pop("norm.weight").to(device=self.device, dtype=self.dtype)
            self.lm_head = self.linear(weights.pop("lm_head.weight"))
        except KeyError as exc:
            raise refuse(f"lacks the tensor {exc.args[0]}; is it an EAGLE-3 checkpoint?") from None
        self.vocab_size = self.lm_head.out_features  # the draft vocabulary
        offsets = weights.pop("d2t", None)
        if offsets is None and self.vocab_size != target.vocab_size:
            raise refuse("has a reduced vocabulary but no d2t map back to the verifier's")
        ids = torch.arange(self.vocab_size)
        self.d2t = (ids if offsets is None else ids + offsets.long()).to(self.device)
        if int(self.d2t.min()) < 0 or int(self.d2t.max()) >= target.vocab_size:
            raise refuse("maps its vocabulary outside the verifier's")
        if self.fc.in_features != 3 * Dt:
            raise refuse(
                f"fuses {self.fc.in_features} feature values, not the three streams of {Dt} EAGLE-3 reads"
            )
        self.norm_output = config.get("norm_output", True)
        self.feature_layers = tuple(layers)
        target.tap(self.feature_layers)
        self.kernel_step = (
            self.kernel
            and kernel_library() is not None
            and all(linear.on_kernel for linear in self.linears())
        )
        self.native = None  # lean_layers runs Llama layers; this one is run an operation at a time

    def linears(self):
        return [
            self.fc,
            *(linear for b in self.layers for linear in (b.qkv, b.o, b.gate_up, b.down)),
            self.lm_head,
        ]

    def greedy_native(self) -> bool:
        return False

    def read_features(self, rows: torch.Tensor) -> torch.Tensor:
        """The head's features (n, D) of the verifier's pass features `rows` (its taps)."""
        streams = self.target.tapped(rows, self.feature_layers)
        if self.fc_norm is not None:
            streams = [
                F.rms_norm(s, (s.shape[-1],), w, self.eps) for s, w in zip(streams, self.fc_norm, strict=True)
            ]
        return self.fc(torch.cat(streams, dim=-1).contiguous())

    def target_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Draft logits (Vd,) over the verifier's vocabulary: -inf where the head has no token."""
        full = torch.full((self.target_vocab_size,), float("-inf"), device=logits.device)
        full[self.d2t] = logits
        return full

    def _pass(self, ids: torch.Tensor, ops, rows, features: bool, inputs: torch.Tensor):
        # The residual stream starts as the fed feature.
        x = inputs.to(dtype=self.dtype, copy=True).contiguous()
        x = llama_layers(self.layers, x, ops, beside=F.embedding(ids, self.embed))
        picked = x[rows].contiguous()
        if self.norm_output and picked.shape[0]:
            normed = ops.norm(picked, self.norm)  # the kernel ops' buffer has a row per row of the pass
            picked = normed[: picked.shape[0]].clone()
        logits = self.lm_head(picked) if picked.shape[0] else picked
        return (logits, x) if features else logits

    def kernel_pass(
        self, ids: torch.Tensor, attention: VsAttention, rows, per_op: bool = True, features: bool = False,
        inputs: torch.Tensor | None = None,
    ):  # fmt: skip
        """`LeanLM.kernel_pass` for this layer, always an operation at a time on the kernels."""
        T = ids.shape[0]
        flat, offsets, widths = self._scratch(T)
        buffers = [flat[o : o + T * w].view(T, w) for o, w in zip(offsets, widths, strict=True)]
        return self._pass(ids, _KernelOps(self, attention, *buffers), rows, features, inputs)

    def torch_pass(
        self, ids: torch.Tensor, cache, rows, features: bool = False, inputs: torch.Tensor | None = None
    ):
        return self._pass(ids, TorchOps(self, cache), rows, features, inputs)
