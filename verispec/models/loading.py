"""Loading models and tokenizers, and refusing pairs that cannot speculate together."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from verispec.errors import UserError
from verispec.models.backend import CausalLM, TransformersLM
from verispec.models.lean import LeanLM, lean_support
from verispec.models.lean_gpt2 import LeanGPT2

log = logging.getLogger(__name__)

REFERENCE_TARGET = "ref-code-target"
REFERENCE_DRAFT = "ref-code-draft"
DEMO = Path(__file__).resolve().parents[1] / "demo"  # the built-in pair, shipped in the package
DEMO_TARGET, DEMO_DRAFT = DEMO / "verispec-demo-code", DEMO / "verispec-demo-code-draft"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but this torch build sees no CUDA device; use --device cpu")
    return device


def resolve_dtype(name: str) -> torch.dtype:
    # float32 by default everywhere: greedy exactness survives only near-ties at full precision.
    return {"auto": torch.float32, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def _looks_local(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or Path(ref).exists()


def _check_reference(ref: str, role: str) -> str:
    if _looks_local(ref):
        path = Path(ref).expanduser()
        if not path.is_dir():
            raise UserError(f"{role} model folder {ref} does not exist; pass a folder with config.json and weights")
        if not (path / "config.json").is_file():
            raise UserError(f"{role} model folder {ref} has no config.json; is it a Hugging Face model folder?")
        return str(path)
    return ref


def load_tokenizer(ref: str, role: str = "target") -> PreTrainedTokenizerBase:
    ref = _check_reference(ref, role)
    try:
        return AutoTokenizer.from_pretrained(ref)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"could not load the {role} tokenizer from {ref!r}: {str(exc).splitlines()[0]}; "
            "pass a local model folder (hub ids need network access)"
        ) from None


def load_model(
    ref: str,
    device: torch.device,
    dtype: torch.dtype,
    role: str = "target",
    backend: str = "auto",
    cpu_kernel: bool = True,
    compile: bool = False,
) -> CausalLM:
    """Load with the lean backend where it supports the checkpoint (backend 'auto' or 'lean'),
    else with transformers. `cpu_kernel`: let the lean backend use its compiled CPU kernel
    (models/kernels.py); `compile`: compile its step with torch.compile."""
    ref = _check_reference(ref, role)
    if backend in ("auto", "lean"):
        unsupported = lean_support(ref)
        if unsupported is None:
            lean = LeanGPT2 if AutoConfig.from_pretrained(ref).model_type == "gpt2" else LeanLM
            return lean(ref, device, dtype, kernel=cpu_kernel, compile=compile)
        if backend == "lean":
            raise UserError(f"the lean backend cannot run the {role} model {ref}: {unsupported}; use --backend transformers")
        log.info("%s model %s runs on transformers: lean backend does not support %s", role, ref, unsupported)
    if compile:
        raise UserError(f"--compile needs the lean backend, but the {role} model {ref} runs on transformers")
    try:
        model = AutoModelForCausalLM.from_pretrained(ref, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"could not load the {role} model from {ref!r}: {str(exc).splitlines()[0]}; "
            "pass a local model folder (hub ids need network access)"
        ) from None
    return TransformersLM(model.to(device), name=ref)


def check_compatible(target: PreTrainedTokenizerBase, draft: PreTrainedTokenizerBase) -> None:
    """A draft can only propose for a verifier that reads its token ids the same way."""
    target_vocab, draft_vocab = target.get_vocab(), draft.get_vocab()
    if target_vocab != draft_vocab:
        differing = sorted(set(target_vocab.items()) ^ set(draft_vocab.items()))[:3]
        raise UserError(
            f"target and draft tokenizers differ ({len(target_vocab)} vs {len(draft_vocab)} tokens; "
            f"e.g. {differing}); speculative decoding needs a shared tokenizer: "
            "pick a draft of the same model family, or use --proposer ngram"
        )
    for special in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        if getattr(target, special) != getattr(draft, special):
            raise UserError(
                f"target and draft disagree on {special} ({getattr(target, special)} vs {getattr(draft, special)}); "
                "speculative decoding needs the same special tokens: pick a draft of the same model family"
            )


def demo_pair() -> tuple[str, str]:
    """The built-in demo pair: a small code model trained by `verispec train` on the standard
    library and a draft distilled from it by `verispec distill` (see verispec/demo/README.md)."""
    for folder in (DEMO_TARGET, DEMO_DRAFT):
        if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
            raise UserError(
                f"the built-in demo model {folder} is missing from this installation; reinstall verispec, "
                "or pass --target PATH (and --draft PATH or --proposer ngram)"
            )
    return str(DEMO_TARGET), str(DEMO_DRAFT)


def reference_pair() -> tuple[str, str] | None:
    """The shared reference pair, looked for next to the working directory and next to this checkout."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        models = root.parent / "shared" / "models"
        if (models / REFERENCE_TARGET / "config.json").is_file():
            return str(models / REFERENCE_TARGET), str(models / REFERENCE_DRAFT)
    return None


def weights_digest(ref: str) -> str:
    """Content hash of a model's weights (sha256 over its weight files, in name order), so that a
    record or a metric says which weights produced it, not only which folder name."""
    path = Path(ref).expanduser()
    if not path.is_dir():
        return f"hub:{ref}"  # loaded by id; the hub's revision is not known here
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt") and p.is_file())
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with file.open("rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return "sha256:" + digest.hexdigest()[:16]
