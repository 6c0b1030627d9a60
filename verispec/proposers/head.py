"""A draft head (`models/head.py`) as the proposer: drafts from the verifier's own features.

The engine runs it for every request of a pass at once (`core/head_batch.py`, through
`head_model`), and hands each request's state the verifier's features as its passes compute them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from verispec.errors import UserError
from verispec.models.head import DraftHead

if TYPE_CHECKING:
    from verispec.proposers import ProposerInputs


def build(inputs: ProposerInputs) -> HeadProposer:
    """The "head" proposer's builder (its row in `verispec/proposers/names.py` names it)."""
    if inputs.head is None:
        raise UserError(
            "--proposer head needs a draft head: pass --draft PATH, a folder made by verispec distill --head"
        )
    return HeadProposer(inputs.head)


class HeadProposer:
    inline = False  # the engine runs its passes itself, for the whole batch (`head_model`)

    def __init__(self, head: DraftHead):
        self.head = head
        self.name = f"head:{head.name}"

    @property
    def head_model(self) -> DraftHead:
        """The batched engine drafts with this head for all its requests at once (`core/head_batch.py`)."""
        return self.head
