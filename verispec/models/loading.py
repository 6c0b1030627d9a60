"""Loading models and tokenizers, and refusing pairs that cannot speculate together."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from verispec.errors import UserError
from verispec.models.backend import CausalLM, TransformersLM
from verispec.models.gguf_file import gguf_path, load_gguf_tokenizer, open_checkpoint
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
    if _looks_local(ref) or ref.lower().endswith(".gguf"):
        path = Path(ref).expanduser()
        if gguf_path(ref) is not None:
            return str(path)
        if not path.is_dir():
            raise UserError(
                f"{role} model {ref} does not exist; pass a Hugging Face model folder (config.json and weights) "
                "or a .gguf file"
            )
        if not (path / "config.json").is_file():
            raise UserError(
                f"{role} model folder {ref} has no config.json and no .gguf file; "
                "pass a Hugging Face model folder or a GGUF file"
            )
        return str(path)
    return ref


def model_name(ref: str) -> str:
    """What a model calls itself: a GGUF file's own name from its metadata, else the folder's name."""
    file = gguf_path(ref) if _looks_local(ref) or ref.lower().endswith(".gguf") else None
    return open_checkpoint(file).name if file else Path(ref.rstrip("/")).name


def load_tokenizer(ref: str, role: str = "target") -> PreTrainedTokenizerBase:
    ref = _check_reference(ref, role)
    if (file := gguf_path(ref)) is not None:
        return load_gguf_tokenizer(file)
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
    weights_dtype: str = "auto",
    activations: str = "float",
) -> CausalLM:
    """Load with the lean backend where it supports the checkpoint (backend 'auto' or 'lean'),
    else with transformers. `cpu_kernel`: let the lean backend use its compiled CPU kernel
    (models/kernels.py); `compile`: compile its step with torch.compile; `weights_dtype`: the
    storage of float weight matrices (quant.store_as), a documented change of model; `activations`:
    "q8" runs block-quantized weights with 8-bit activations (csrc/quant_int8.c), "bf16" float ones in
    bfloat16 with bfloat16 activations (csrc/bf16_dot.c): each another one."""
    ref = _check_reference(ref, role)
    gguf = gguf_path(ref)
    if gguf is not None and backend == "transformers":
        raise UserError(f"the {role} model {ref} is a GGUF file, which the lean backend runs; use --backend auto or lean")
    if weights_dtype != "auto" and backend == "transformers":
        raise UserError("--weights-dtype needs the lean backend; use --backend auto or lean")
    if activations != "float" and backend == "transformers":
        raise UserError(f"--activations {activations} needs the lean backend; use --backend auto or lean")
    if backend in ("auto", "lean"):
        unsupported = lean_support(ref)
        if unsupported is None:
            if gguf is None and AutoConfig.from_pretrained(ref).model_type == "gpt2":
                if weights_dtype != "auto" or activations != "float":
                    raise UserError(
                        "--weights-dtype and --activations are for Llama-family models; lean GPT-2 runs weights as stored"
                    )
                lm = LeanGPT2(ref, device, dtype, kernel=cpu_kernel, compile=compile)
            else:
                lm = LeanLM(
                    ref, device, dtype, kernel=cpu_kernel, compile=compile, weights_dtype=weights_dtype,
                    activations=activations,
                )  # fmt: skip
            if activations != lm.activations and role != "target":
                log.info("%s model %s cannot run --activations %s: its activations stay float32", role, ref, activations)
            elif activations == "bf16" and lm.activations != "bf16":  # bfloat16 weights, but no kernel here
                raise UserError(
                    f"--activations bf16 needs the compiled CPU kernel, and it is unavailable here "
                    f"({lm.path_report()['why']}); leave --activations at float"
                )
            elif activations != lm.activations and lm.dequantized:  # quantized, but no kernel to run them on
                raise UserError(
                    f"--activations {activations} needs the compiled CPU kernel, and it is unavailable here "
                    f"({lm.path_report()['why']}); leave --activations at float"
                )
            elif activations != lm.activations:
                raise UserError(
                    f"--activations {activations} runs block-quantized weights, and the {role} model {ref} has "
                    "none: load a GGUF file, or add --weights-dtype q8_0 (each a change of model)"
                )
            _log_path(lm, role)
            return lm
        if backend == "lean":
            raise UserError(f"the lean backend cannot run the {role} model {ref}: {unsupported}; use --backend transformers")
        log.info("%s model %s runs on transformers: lean backend does not support %s", role, ref, unsupported)
    if compile:
        raise UserError(f"--compile needs the lean backend, but the {role} model {ref} runs on transformers")
    if activations != "float":
        raise UserError(f"--activations {activations} needs the lean backend, but the {role} model {ref} runs on transformers")
    try:
        model = AutoModelForCausalLM.from_pretrained(ref, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"could not load the {role} model from {ref!r}: {str(exc).splitlines()[0]}; "
            "pass a local model folder (hub ids need network access)"
        ) from None
    return TransformersLM(model.to(device), name=ref)


def _log_path(lm: CausalLM, role: str) -> None:
    """One line at start: the form every weight runs in and why the kernel step is on or off."""
    report = getattr(lm, "path_report", None)
    if report is None:
        return
    path = report()
    forms = ", ".join(f"{n} {form}" for form, n in sorted(path["forms"].items(), key=lambda kv: -kv[1]))
    state = "on" if path["kernel_step"] else "off"
    # off for a reason the user can change (the weights' storage, a missing compiler): a warning, seen without -v
    level = logging.WARNING if path["avoidable"] else logging.INFO
    if path.get("activations") == "q8":
        forms += "; activations quantized to 8 bits (--activations q8)"
    elif path.get("activations") == "bf16":
        forms += "; bfloat16 weights and activations (--activations bf16)"
    log.log(level, "%s model %s: kernel step %s (%s); weight matrices: %s", role, lm.name, state, path["why"], forms)
    if path["dequantized"]:
        log.warning(
            "%s model %s: %d quantized projections run dequantized to float32 (no quantized kernel here): same model, "
            "more memory and slower", role, lm.name, path["dequantized"],
        )  # fmt: skip


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


def numeric_model(weights_dtype: str = "auto", activations: str = "float") -> str:
    """The change of model the user chose beside the weights, as a suffix of their digest in a
    model's identity ("" for the checkpoint as stored, float32 activations): audit records and
    metrics then say which arithmetic produced an output, not only which file."""
    chosen = [f"weights={weights_dtype}"] if weights_dtype != "auto" else []
    chosen += [f"activations={activations}"] if activations != "float" else []
    return "".join(f"+{part}" for part in chosen)


def weights_digest(ref: str) -> str:
    """Content hash of a model's weights (sha256 over its weight files, in name order), so that a
    record or a metric says which weights produced it, not only which folder name."""
    path = Path(ref).expanduser()
    if path.is_file():  # a GGUF file
        with path.open("rb") as f:
            return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()[:16]
    if not path.is_dir():
        return f"hub:{ref}"  # loaded by id; the hub's revision is not known here
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".gguf") and p.is_file())
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with file.open("rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return "sha256:" + digest.hexdigest()[:16]
