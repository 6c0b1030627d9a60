"""A draft head: an EAGLE-style drafter that reads the verifier's own features.

A draft model sees only tokens. A head sees what the verifier computed: at position t it reads
the verifier's final hidden state there (normed, the vector its LM head turns into the logits
of token t+1, its *feature* f_t) and the embedding of token t+1, and predicts f_{t+1}, from which
its own output layer gives the token after (EAGLE, Li et al. 2024). Drafting further, it feeds
its own predicted feature back in place of the verifier's. Its body is one Llama decoder layer
(or a few) of the verifier's width, run on the same CPU kernels as the verifier's layers.

Its output layer covers a reduced vocabulary (the target tokens most frequent in the verifier's
own output, EAGLE-3 and FR-Spec's choice) with `d2t` mapping each draft id back to the target's:
a full-vocabulary layer would cost a large share of a draft step on a big vocabulary.

A checkpoint is a folder, made by `verispec distill --head`:
- `config.json`: `model_type` "verispec-head", the body's shape (`hidden_size`, heads, `head_dim`,
  `intermediate_size`, `num_hidden_layers`, `rms_norm_eps`, `rope_theta`), `vocab_size` (the
  target's), `draft_vocab_size`, and the verifier it was trained for (`target`: its name and
  weights digest);
- `model.safetensors`: `fc.weight` (D, 2D) over [embedding, feature], the layers under
  `layers.{i}.` with Hugging Face Llama names, `norm.weight`, `lm_head.weight` (Vd, D) and
  `d2t` (Vd,) int64. The token embedding is the verifier's own and is not stored.

A head trained with `--head-fuse` also reads the verifier's residual streams after three layers,
low, middle and high (EAGLE-3's fused features): its config names them (`feature_layers`), the
verifier is asked to keep them (`LeanLM.tap`), and `fuse.weight` (D, 4D) makes the head's feature
of a verified position from [those streams, the final feature]. What it feeds itself while
drafting is unchanged: its own normed output.

EAGLE-3 heads published by their authors load too (`eagle3.py`); `load_head` picks the class.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from verispec.errors import UserError
from verispec.models.eagle3 import Eagle3Head, is_eagle3
from verispec.models.kernels import kernel_library
from verispec.models.lean import LeanLM
from verispec.models.quant import store_as

HEAD_TYPE = "verispec-head"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"


def head_kind(ref: str | None) -> str | None:
    """"verispec" where `ref` is our draft head's folder (its config.json says model_type
    verispec-head), "eagle3" where it is an EAGLE-3 head's (`eagle3.py`), else None."""
    if not ref:
        return None
    try:
        config = json.loads((Path(ref).expanduser() / CONFIG).read_text())
        if config.get("model_type") == HEAD_TYPE:
            return "verispec"
        return "eagle3" if is_eagle3(config) else None
    except (OSError, ValueError, AttributeError):
        return None


def is_head(ref: str | None) -> bool:
    """Whether `ref` is a draft head's folder, ours or an EAGLE-3 head."""
    return head_kind(ref) is not None


class DraftHead(LeanLM):
    """A loaded head, drafting for `target` (a LeanLM, whose embedding and rotary tables it
    shares). It is a LeanLM without an embedding of its own: its layers, sessions and kernel
    descriptors are LeanLM's, and its input is a vector per row, not a token."""

    def __init__(self, path: str, target: LeanLM):
        folder = Path(path).expanduser()
        try:
            config = json.loads((folder / CONFIG).read_text())
            weights = load_file(folder / WEIGHTS)
        except (OSError, ValueError) as exc:
            raise UserError(
                f"could not read the draft head in {path}: {exc}; make one with verispec distill --head"
            ) from None
        self.name = path
        self.device, self.dtype = target.device, target.dtype
        self.kernel, self.compiled = target.kernel, False
        self.checkpoint = None
        self.config = target.config
        self.eos_token_ids = target.eos_token_ids
        # A verifier on bfloat16 dot products takes its head along (weights rounded to bfloat16):
        # the head reads every prompt too, and a draft's numbers never touch exactness.
        self.requested_activations = "bf16" if target.activations == "bf16" else "float"
        if self.requested_activations == "bf16":
            weights = store_as(weights, "bfloat16")
        self.dequantized = 0
        D = target.embed.shape[1]
        expected = {"hidden_size": D, "vocab_size": target.vocab_size, "head_dim": target.head_dim,
                    "num_attention_heads": target.heads, "num_key_value_heads": target.kv_heads}  # fmt: skip
        wrong = {k: (config.get(k), v) for k, v in expected.items() if config.get(k) != v}
        if wrong:
            said = ", ".join(f"{k} {got} (the verifier's: {want})" for k, (got, want) in wrong.items())
            raise UserError(
                f"the draft head in {path} was made for another verifier: {said}; train one for this verifier"
            )
        self.heads, self.kv_heads, self.gqa = target.heads, target.kv_heads, target.gqa
        self.head_dim, self.eps = target.head_dim, config["rms_norm_eps"]
        self.max_positions = target.max_positions
        self.cos, self.sin = target.cos, target.sin
        self.embed = target.embed  # the verifier's; the head reads its rows, never streams it
        self.target_vocab_size = target.vocab_size

        self.fc = self.linear(weights.pop("fc.weight"))
        fuse = weights.pop("fuse.weight", None)
        self.fuse = None if fuse is None else self.linear(fuse)
        self.feature_layers = tuple(config.get("feature_layers") or ())
        if self.fuse is not None:
            if not self.feature_layers or not all(0 <= i < len(target.layers) - 1 for i in self.feature_layers):
                raise UserError(
                    f"the draft head in {path} fuses verifier layers {list(self.feature_layers)}, "
                    f"which a verifier of {len(target.layers)} layers does not have; train one for this verifier"
                )
            target.tap(self.feature_layers)
        self.target = target
        self.layers = [self.read_layer(weights, f"layers.{i}.") for i in range(config["num_hidden_layers"])]
        self.norm = weights.pop("norm.weight").to(device=self.device, dtype=self.dtype)
        self.lm_head = self.linear(weights.pop("lm_head.weight"))
        self.d2t = weights.pop("d2t").to(device=self.device, dtype=torch.long)
        self.vocab_size = self.lm_head.out_features  # the draft vocabulary
        if (
            self.d2t.shape != (self.vocab_size,)
            or int(self.d2t.min()) < 0
            or int(self.d2t.max()) >= target.vocab_size
        ):
            raise UserError(
                f"the draft head in {path} maps its vocabulary outside the verifier's; make it again"
            )
        self.kernel_step = (
            self.kernel
            and kernel_library() is not None
            and all(linear.on_kernel for linear in self.linears())
        )
        self.native = self._native_model() if self.kernel_step else None

    def linears(self):
        return [
            self.fc,
            *(linear for b in self.layers for linear in (b.qkv, b.o, b.gate_up, b.down)),
            self.lm_head,
        ]

    def greedy_native(self) -> bool:
        """Whether greedy drafting runs in one native call (`LeanLM.greedy_paged`): fc on the kernel too."""
        return super().greedy_native() and getattr(self.fc, "projection", None) is not None

    reads_inputs = True  # a row is fed its token and a vector: the feature before it (`embed_rows`)

    def read_features(self, rows: torch.Tensor) -> torch.Tensor:
        """The head's features (n, D) of the verifier's pass features `rows`: their last D columns,
        the normed final hidden states (before them, the streams of tapped layers: `LeanLM.tap`);
        a head trained with --head-fuse fuses its layers' streams with them."""
        final = rows[:, -self.embed.shape[1] :]
        if self.fuse is None:
            return final
        return self.fuse(torch.cat([*self.target.tapped(rows, self.feature_layers), final], dim=-1).contiguous())

    def embed_rows(self, tokens: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The residual stream a pass starts from (T, D): fc over [embedding of tokens[t], features[t]]."""
        return self.fc(torch.cat([F.embedding(tokens, self.embed), features], dim=-1).contiguous())

    def target_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Draft logits (Vd,) over the verifier's vocabulary: -inf where the head has no token."""
        full = torch.full((self.target_vocab_size,), float("-inf"), device=logits.device)
        full[self.d2t] = logits
        return full


def load_head(path: str, target) -> DraftHead | Eagle3Head:
    """The head in `path` (ours or an EAGLE-3 head), drafting for `target`; a clear error where the
    verifier cannot carry one."""
    if type(target) is not LeanLM:
        raise UserError(
            f"a draft head reads the verifier's features, which only the lean backend's Llama-family models give; "
            f"the target {target.name} runs on {getattr(target, 'backend', '?')} ({type(target).__name__})"
        )
    return Eagle3Head(path, target) if head_kind(path) == "eagle3" else DraftHead(path, target)
