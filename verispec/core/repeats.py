"""Drafts from the text's own repeats: free drafts where the text repeats itself.

Code and small models' output repeat themselves: a signature called again, a block of similar
lines, a model caught in a loop. Where the context's last `min_match` tokens occurred before, what
followed them then is a better draft than any model's, and costs microseconds. Such a round
drafts that (`follow`) in place of its proposer, as deep as the repeat is long: a match of
m tokens drafts up to m, so a long loop is verified many tokens a pass, as suffix decoding
(SuffixDecoding, Arctic Inference) sizes its drafts by its match. A round whose context has no
such repeat asks its proposer as ever.

The drafts are point masses and are verified like any others, so outputs stay exact; they depend
on the request's own tokens only, so a request's rounds are the same whatever else is in its batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

WINDOW = 4096  # the context's last tokens searched for a repeat


def repeat_drafts(context: Sequence[int], min_match: int, most: int) -> list[int]:
    """Up to `most` tokens that continue the latest earlier occurrence of the context's last
    `min_match` tokens, as many as that occurrence's match with the context's end is long (a
    longer shared run, a likelier repeat); [] where there is none. Only the last `WINDOW` tokens
    are searched, so a round costs microseconds however long the context."""
    if min_match < 1 or most < 1 or len(context) <= min_match:
        return []
    tokens = np.asarray(context[-WINDOW:], dtype=np.int64)
    last = len(tokens) - 1
    # Where an earlier occurrence ends: the context's last token before its end (so every one has a
    # follower), narrowed token by token to those the whole suffix precedes.
    ends = np.flatnonzero(tokens[:last] == tokens[last])
    for k in range(1, min_match):
        if not ends.size:
            break
        ends = ends[ends >= k]
        ends = ends[tokens[ends - k] == tokens[last - k]]
    if not ends.size:
        return []
    start = int(ends[-1]) + 1  # the first token that followed the latest occurrence
    matched = min_match
    while matched < most and matched < start and tokens[start - 1 - matched] == tokens[last - matched]:
        matched += 1
    return follow(tokens, start, min(matched, most))


def follow(context: np.ndarray, start: int, depth: int) -> list[int]:
    """`depth` tokens that continue the context as it went on from `start` before: context[start:],
    and past its end the same period again (the draft is what the context's last `len(context) -
    start` tokens, repeated, would give)."""
    period = len(context) - start
    tokens = context[start : start + depth].tolist()
    while len(tokens) < depth:
        tokens.append(tokens[len(tokens) - period])
    return tokens
