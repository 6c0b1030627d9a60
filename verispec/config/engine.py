"""Settings of the engine: which models, how far to speculate, how to sample, how to batch."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
)
from pydantic_settings import NoDecode

from verispec.config.values import AlsoNamed, Depth, parse_bytes, strings
from verispec.proposers.names import PROPOSER_NAMES, VERIFIER_ONLY, described


class ModelSettings(BaseModel):
    """Which models verify and propose, and where they run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    target: str | None = Field(
        None, description="verifier (target) model: local path or hub id; default: the built-in demo pair (a small Python code model and its distilled draft)"
    )
    draft: str | None = Field(None, description="draft model for --proposer draft: local path or hub id")
    proposer: Literal[("auto", *PROPOSER_NAMES, VERIFIER_ONLY)] = Field(  # the names: verispec/proposers/names.py
        "auto", description=f"proposer: {described()}; auto = draft if --draft is given, else ngram"
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    backend: Literal["auto", "lean", "transformers"] = Field(
        "auto", description="forward pass: lean (own Llama/Mistral/Qwen2/GPT-2 implementation) where supported, else transformers"
    )
    compile: bool = Field(False, description="compile the lean backend's decode/verify step with torch.compile")
    cpu_kernel: bool = Field(
        True,
        description="lean backend on CPU: keep weights that 16 bits hold exactly in 16 bits and widen them "
        "in verispec's compiled kernel (float32 arithmetic on the same values, half the bytes per step)",
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="compute dtype; auto = float32 (exact greedy, see README for reduced precision)"
    )
    weights_dtype: Literal["auto", "float16", "bfloat16", "q8_0"] = Field(
        "auto",
        description="storage of float weight matrices on the lean backend: auto = as stored; float16, bfloat16 or "
        "q8_0 round or quantize them so a float32 checkpoint runs on the CPU kernel step (a change of model: "
        "outputs are exact for the converted model, not the original)",
    )
    activations: Literal["float", "q8", "bf16"] = Field(
        "float",
        description="arithmetic of weight matrices on the CPU kernel: float = float32 activations times the exact "
        "weights; q8 (block-quantized weights: GGUF files, --weights-dtype q8_0) = activations quantized to 8 bits "
        "per block of 32 and integer dot products, as llama.cpp runs them; bf16 (float weights) = weights and "
        "activations rounded to bfloat16, products summed in float32, on AMX tiles where the CPU has them (prompts "
        "and wide passes several times faster). q8 and bf16 are each a change of model, shown in /readyz and audit "
        "records; outputs stay exact for it at any depth and batch",
    )


class SpeculationSettings(BaseModel):
    """How far and how safely to speculate."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    depth: Depth = Field("auto", description="draft tokens per round: an integer (0 = verifier only) or auto")
    max_depth: int = Field(8, ge=1, le=64, description="upper bound for --depth auto")
    tree_width: int = Field(
        1,
        ge=1,
        le=8,
        description="candidates per draft position: above 1, a draft head or draft model offers its next most likely "
        "tokens beside its chain, verified as a token tree in the same pass (narrowed as the batch fills; 1 = chains)",
    )
    draft_confidence: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="with --depth auto, stop drafting when the draft's top probability falls below this (0 = off)",
    )
    proposer_timeout_s: float = Field(
        1.0, gt=0.0, description="a proposal slower than this is dropped and the round runs verifier-only"
    )
    max_proposer_failures: int = Field(
        3, ge=1, description="consecutive proposer failures after which a request continues verifier-only"
    )
    repeat_match: int = Field(
        4,
        ge=0,
        description="where the context's last N tokens occurred before, a round drafts what followed them (free drafts "
        "where the text repeats itself) in place of its proposer's, as many as the repeat's match is long, up to "
        "--repeat-depth (0 = off)",
    )
    repeat_depth: int = Field(16, ge=1, le=64, description="most drafts a round of the text's own repeats takes")
    ngram_max: int = Field(5, ge=1, description="longest context suffix the n-gram proposer matches")
    ngram_min: int = Field(
        2, ge=1, description="shortest context suffix the n-gram proposer matches (a single shared token predicts little)"
    )
    suffix_cache_tokens: int = Field(
        262144,
        ge=16,
        description="tokens of earlier requests' prompts and outputs the suffix proposer keeps per API key (the oldest go first)",
    )
    suffix_shared: bool = Field(
        False,
        description="one suffix-cache pool for every API key: drafts from one tenant's text can then serve another, "
        "whose acceptance timing may reveal it (off: a pool per key)",
    )

    @field_validator("depth", mode="before")
    @classmethod
    def _parse_depth(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if isinstance(value, int) and value < 0:
            raise ValueError("depth must be 0 or more, or 'auto'")
        return value


class ResponseFormat(BaseModel):
    """What the output must be (OpenAI's `response_format`): free text, any JSON object, JSON that
    a schema allows, and as extensions a regular expression's match or a grammar's sentence (Lark
    syntax, as llguidance reads it)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: Literal["text", "json_object", "json_schema", "regex", "grammar"]
    json_schema: dict[str, Any] | None = None  # {"name": ..., "schema": {...}, "strict": true}
    regex: str | None = None
    grammar: str | None = None

    @property
    def constrained(self) -> bool:
        return self.type != "text"

    def key(self) -> tuple[str, str]:
        """(kind, spec) in one canonical spelling: equal formats share a compiled grammar."""
        if self.type == "json_schema":
            return self.type, json.dumps((self.json_schema or {}).get("schema", {}), sort_keys=True, separators=(",", ":"))
        return self.type, {"regex": self.regex, "grammar": self.grammar}.get(self.type) or ""

    @field_validator("json_schema")
    @classmethod
    def _schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and not isinstance(value.get("schema", {}), dict):
            raise ValueError("json_schema.schema must be a JSON Schema object")
        return value

    def model_post_init(self, context: Any) -> None:
        needs = {"json_schema": "json_schema", "regex": "regex", "grammar": "grammar"}.get(self.type)
        if needs is not None and getattr(self, needs) is None:
            raise ValueError(f"response_format of type {self.type} needs its '{needs}' field")


class SamplingParams(BaseModel):
    """Per-request decoding settings. Temperature 0 means greedy."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature: float = Field(0.0, ge=0.0, le=100.0, description="0 = greedy; > 0 samples")
    top_k: int = Field(0, ge=0, description="keep the k most likely tokens (0 = off)")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass (1 = off)")
    seed: int | None = Field(None, ge=0, description="random seed; the same seed reproduces the same output")
    # max_tokens: the OpenAI API's name, which the server, `edge` and `batch`'s input files take.
    max_new_tokens: Annotated[int, AlsoNamed("max_tokens")] = Field(128, ge=1, description="stop after this many new tokens")
    stop: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="stop when the output contains this string (repeatable; several in a variable or file: a JSON list)"
    )
    stop_token_ids: Annotated[tuple[int, ...], NoDecode] = Field(
        (), description="also stop at these token ids (repeatable), as at the model's end-of-sequence token"
    )
    ignore_eos: bool = Field(False, description="do not stop at the end-of-sequence token: generate max_new_tokens (stop strings and ids still stop)")
    min_tokens: int = Field(0, ge=0, description="generate at least this many tokens before an end-of-sequence or stop token may end the output")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="drop tokens less likely than min_p times the most likely one (0 = off)")
    presence_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="subtract this from the logit of every token the output holds already (OpenAI's presence_penalty)"
    )
    frequency_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="subtract this times its count in the output from every token's logit (OpenAI's frequency_penalty)"
    )
    repetition_penalty: float = Field(
        1.0, ge=0.01, le=10.0,
        description="divide the positive logits (multiply the negative ones) of tokens in the prompt or the output by this "
        "(1 = off; below 1 favours repeats)",
    )  # fmt: skip
    logit_bias: Annotated[dict[int, float], NoDecode] = Field(
        default_factory=dict, description='add to the logits of these token ids, as JSON: {"50256": -100} (-100 bans a token, 100 forces it)'
    )
    logprobs: int | None = Field(
        None, ge=0, le=20, description="return each output token's log-probability and this many most likely alternatives (0 = the token's only)"
    )
    prompt_logprobs: int | None = Field(
        None, ge=0, le=20,
        description="also return each prompt token's log-probability given the tokens before it (from the second on; "
        "the verifier's logits with logit_bias only) and this many most likely alternatives (0 = the token's only)",
    )  # fmt: skip
    response_format: Annotated[ResponseFormat | None, NoDecode] = Field(
        None,
        description='constrain the output, as JSON: {"type": "json_object"}, {"type": "json_schema", "json_schema": '
        '{"name": "n", "schema": {...}}}, {"type": "regex", "regex": "..."} or {"type": "grammar", "grammar": "(Lark)"}',
    )
    sampled_acceptance: Literal["coupled", "rejection"] = Field(
        "coupled",
        description="sampled requests: coupled = each position's random draw comes from the seed and the position, and a draft "
        "is kept exactly when it is the verifier's own draw, so a seed gives the same text at any depth, proposer, batch and "
        "load; rejection = speculative sampling's rejection rule (the same distribution; a seed reproduces only the same run)",
    )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def processed(self) -> bool:
        """Whether logits change before the choice (`core/processing.py`): penalties, bias, a token floor."""
        return bool(
            self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0 or self.logit_bias or self.min_tokens
        )

    @property
    def constrained(self) -> bool:
        return self.response_format is not None and self.response_format.constrained

    @field_validator("response_format", mode="before")
    @classmethod
    def _format(cls, value: Any) -> Any:
        if isinstance(value, str):  # a flag or variable: a JSON object
            try:
                return json.loads(value)
            except json.JSONDecodeError:
                raise ValueError('give response_format as a JSON object, e.g. {"type": "json_object"}') from None
        return value

    @field_validator("stop_token_ids", mode="before")
    @classmethod
    def _token_ids(cls, value: Any) -> Any:
        if isinstance(value, str):  # a variable's text: one id, or a JSON list
            value = json.loads(value) if value.strip().startswith("[") else [value]
        if isinstance(value, list | tuple):
            return tuple(int(v) if isinstance(v, str) and v.strip().isdigit() else v for v in value)
        return value

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _bias(cls, value: Any) -> Any:
        if isinstance(value, str):  # a flag or variable: a JSON object
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise ValueError('give logit_bias as a JSON object of token ids to biases: {"50256": -100}') from None
        if isinstance(value, dict):
            for bias in value.values():
                if isinstance(bias, int | float) and not isinstance(bias, bool) and not -100 <= bias <= 100:
                    raise ValueError("each bias must be between -100 and 100")
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_tuple(cls, value: Any) -> Any:
        value = strings(value)
        if any(not s for s in value):
            raise ValueError("stop strings must not be empty")
        return tuple(value)


class BatchSettings(BaseModel):
    """The batched engine: how many rows a verifier pass may take, and the KV cache it owns."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    scheduler: Literal["auto", "batched", "interleaved"] = Field(
        "auto",
        description="batched: every running request in one verifier pass per step (lean backend only); "
        "interleaved: each running request's round on its own KV session, one after another, in the same engine "
        "(the transformers backend always runs this way); auto = batched where the backend supports it",
    )
    kv_cache_memory: str = Field(
        "1GiB",
        description="memory for the verifier's paged KV cache, in bytes or with a unit (512MiB, 2GiB); "
        "it bounds the tokens all running requests and the prefix cache hold together",
    )
    kv_block_size: int = Field(16, ge=8, le=256, multiple_of=8, description="positions per KV cache block")
    max_pass_tokens: int = Field(
        128, ge=16, description="rows one verifier pass may take: every running request's round, then prompt chunks up to this"
    )
    prefill_slowdown: float = Field(
        2.0, ge=1.0,
        description="chunked prefill: while requests are generating, a pass with a prompt chunk may take at most this many "
        "times as long as their rounds alone (measured pass costs set the chunk), so a long prompt never stalls their streams; "
        "where several prompts wait together, (prompts + 1) / streams times this where that is over 1",
    )
    prefix_cache: bool = Field(True, description="keep full KV blocks by a hash of their tokens and reuse them for a shared prefix")

    @field_validator("kv_cache_memory")
    @classmethod
    def _memory(cls, value: str) -> str:
        parse_bytes(value)
        return value

    @property
    def kv_cache_bytes(self) -> int:
        return parse_bytes(self.kv_cache_memory)
