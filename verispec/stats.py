"""Per-request speculation statistics, in the vocabulary of `core/acceptance.py`.

The engine only counts; rates are derived here (properties) or by whoever aggregates counts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class RequestStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    generated_tokens: int = 0  # tokens delivered (after EOS / stop / length truncation)
    rounds: int = 0  # one verifier forward pass each
    proposed: int = 0  # draft tokens offered
    accepted: int = 0  # draft tokens the verifier kept
    recovered: int = 0  # verifier corrections at a rejected position
    bonus: int = 0  # verifier tokens after a fully accepted proposal
    verifier_only: int = 0  # verifier tokens from rounds without a proposal (depth 0, fallback, no match)
    proposer_failures: int = 0  # proposals that raised or returned something invalid
    proposer_timeouts: int = 0  # proposals dropped for exceeding the time budget
    fallback_rounds: int = 0  # rounds run verifier-only because of a failure or timeout
    repeat_rounds: int = 0  # rounds drafted from the text's own repeat in place of the proposer (`core/repeats.py`)
    depths: list[int] = field(default_factory=list)  # depth asked for, per round
    proposed_by_position: list[int] = field(default_factory=list)  # [i]: rounds with a draft at position i
    accepted_by_position: list[int] = field(default_factory=list)  # [i]: of those, accepted
    prefill_s: float = 0.0
    propose_s: float = 0.0
    verify_s: float = 0.0
    mismatch_s: float = 0.0  # propose and verify time spent on rejected drafts (Round.mismatch_s)
    total_s: float = 0.0
    seed: int | None = None

    @property
    def rejected(self) -> int:
        return self.proposed - self.accepted

    @property
    def verifier_calls(self) -> int:
        return self.rounds

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.proposed if self.proposed else None

    @property
    def tokens_per_verifier_call(self) -> float | None:
        """Mean tokens gained per verifier pass: accepted drafts plus the recovered/bonus token."""
        return self.generated_tokens / self.rounds if self.rounds else None

    @property
    def mean_accepted(self) -> float | None:
        """Mean accepted draft tokens per round (excludes the verifier's own token)."""
        return self.accepted / self.rounds if self.rounds else None

    @property
    def tokens_per_s(self) -> float | None:
        return self.generated_tokens / self.total_s if self.total_s > 0 else None

    @property
    def acceptance_by_position(self) -> list[float]:
        return [a / p if p else 0.0 for a, p in zip(self.accepted_by_position, self.proposed_by_position, strict=True)]

    def record_round(self, depth: int, proposed: int, accepted: int) -> None:
        self.rounds += 1
        self.depths.append(depth)
        self.proposed += proposed
        self.accepted += accepted
        grow = proposed - len(self.proposed_by_position)
        if grow > 0:
            self.proposed_by_position.extend([0] * grow)
            self.accepted_by_position.extend([0] * grow)
        for i in range(proposed):
            self.proposed_by_position[i] += 1
            self.accepted_by_position[i] += i < accepted
        if proposed == 0:
            self.verifier_only += 1
        elif accepted == proposed:
            self.bonus += 1
        else:
            self.recovered += 1

    def merge(self, other: RequestStats) -> RequestStats:
        """Sum of two requests' counts (for aggregates over a prompt set)."""
        merged = RequestStats()
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name in ("proposed_by_position", "accepted_by_position"):
                width = max(len(a), len(b))
                value = [x + y for x, y in zip(a + [0] * (width - len(a)), b + [0] * (width - len(b)), strict=True)]
            elif f.name == "seed":
                value = None
            else:
                value = a + b
            setattr(merged, f.name, value)
        return merged

    def summary(self) -> dict:
        """Counts plus derived rates, JSON-ready."""
        out = asdict(self)
        del out["depths"]
        out.update(
            rejected=self.rejected,
            verifier_calls=self.verifier_calls,
            acceptance_rate=self.acceptance_rate,
            tokens_per_verifier_call=self.tokens_per_verifier_call,
            mean_accepted=self.mean_accepted,
            tokens_per_s=self.tokens_per_s,
            acceptance_by_position=self.acceptance_by_position,
            mean_depth=sum(self.depths) / len(self.depths) if self.depths else 0.0,
        )
        return out


def usage(stats: RequestStats, *more: RequestStats) -> dict:
    """OpenAI's `usage` of a response: its prompt once, the completion tokens of all its choices."""
    completion = stats.generated_tokens + sum(s.generated_tokens for s in more)
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": stats.prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": stats.cached_tokens},
    }


def speculation_stats(stats: RequestStats, proposer: str | None = None) -> dict:
    """The per-response extension: what speculation did for this request, and with which proposer."""
    return {
        "proposer": proposer,
        "proposed": stats.proposed,
        "accepted": stats.accepted,
        "rejected": stats.rejected,
        "recovered": stats.recovered,
        "bonus": stats.bonus,
        "verifier_calls": stats.verifier_calls,
        "acceptance_rate": stats.acceptance_rate,
        "mean_accepted_length": stats.mean_accepted,
        "tokens_per_verifier_call": stats.tokens_per_verifier_call,
        "proposer_failures": stats.proposer_failures + stats.proposer_timeouts,
        "fallback_rounds": stats.fallback_rounds,
        "repeat_rounds": stats.repeat_rounds,
        "mismatch_ms": round(stats.mismatch_s * 1e3, 3),  # time spent on rejected drafts
    }
