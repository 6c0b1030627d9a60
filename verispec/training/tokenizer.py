"""`verispec train`'s tokenizer and token stream: a byte-level BPE trained on the corpus (the Hugging
Face `tokenizers` library) with `<|endoftext|>` as BOS, EOS and padding (id 0), or an existing
model's tokenizer (`--tokenizer`); documents each followed by EOS, cut into equal chunks."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from verispec.errors import UserError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

EOS = "<|endoftext|>"


def build_tokenizer(
    documents: list[str],
    folder: Path,
    vocab_size: int,
    context: int,
    given: str | None,
    log: Callable[[str], None],
) -> PreTrainedTokenizerBase:
    """The `given` model's tokenizer, the one saved in `folder` by the run being resumed, or a
    byte-level BPE of `vocab_size` tokens trained on the documents and saved there."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if given is not None:
        try:
            return AutoTokenizer.from_pretrained(given)
        except (OSError, ValueError) as exc:
            raise UserError(f"--tokenizer {given}: no tokenizer there ({exc})") from None
    if (folder / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(folder)  # trained by the run being resumed
    if vocab_size < 300:
        raise UserError(f"--vocab-size {vocab_size}: give at least 300 (256 bytes plus merges)")
    started = time.perf_counter()
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    bpe.train_from_iterator(documents, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EOS, eos_token=EOS, pad_token=EOS)
    tokenizer.model_max_length = context
    tokenizer.save_pretrained(folder)
    log(
        f"tokenizer: byte-level BPE, {len(tokenizer)} tokens, trained in {time.perf_counter() - started:.0f}s"
    )
    return tokenizer


def token_chunks(documents: list[str], tokenizer: PreTrainedTokenizerBase, length: int) -> torch.Tensor:
    """(N, length) chunks of the documents' tokens, each document followed by EOS."""
    import torch

    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    stream: list[int] = []
    for ids in tokenizer(documents, add_special_tokens=False, verbose=False).input_ids:
        stream.extend(ids)
        stream.append(eos)
    count = len(stream) // length
    if count == 0:
        raise UserError(f"the text holds {len(stream)} tokens, fewer than --seq-len + 1 = {length}")
    return torch.tensor(stream[: count * length], dtype=torch.int32).view(count, length)


def bytes_per_token(documents: list[str], tokenizer: PreTrainedTokenizerBase) -> float:
    """UTF-8 bytes of text per token (EOS counted), to turn nats per token into bits per byte."""
    tokens = sum(
        len(ids) + 1 for ids in tokenizer(documents, add_special_tokens=False, verbose=False).input_ids
    )
    return sum(len(d.encode()) for d in documents) / tokens
