"""verispec.core.grammar's own per-token costs (what the engine pays: llguidance + bool unpacking).

python scripts/grammar_costs.py --reps 3  -> one JSON line per tokenizer (medians over reps of per-run medians/p90s)
"""

import argparse
import json
import statistics
import sys
import time

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from grammar_engines import CASES, load_tokenizer, ms, pct  # noqa: E402

from verispec.core.grammar import compile_constraint  # noqa: E402


def one(tok, vocab):
    out = {}
    for case, (schema, sample) in CASES.items():
        kind = "json_object" if case == "json_object" else "json_schema"
        # the module writes JSON with ", " and ": " only: json.dumps' default, as the samples are
        t0 = time.perf_counter()
        c = compile_constraint(kind, schema, tok, vocab)
        compile_s = time.perf_counter() - t0
        ids = tok.encode(sample, add_special_tokens=False)
        m = c.start()
        allowed, allows, adv, mf, rb = [], [], [], [], []
        for i, t in enumerate(ids):
            a = time.perf_counter()
            m.allowed()
            b = time.perf_counter()
            assert m.allows(t), (case, i)
            c_ = time.perf_counter()
            d = time.perf_counter()
            m.masks_for(ids[i : i + 4])
            e = time.perf_counter()
            m.advance([t])
            f = time.perf_counter()
            allowed.append(b - a), allows.append(c_ - b), mf.append(e - d), adv.append(f - e)
        for _ in range(5):
            a = time.perf_counter()
            m.rollback(8)
            rb.append(time.perf_counter() - a)
            m.advance(ids[-8:])
        out[case] = {
            "compile_ms": ms(compile_s), "tokens": len(ids),
            "allowed_med_ms": ms(statistics.median(allowed)), "allowed_p90_ms": ms(pct(allowed, 0.9)),
            "allows_med_ms": ms(statistics.median(allows)), "advance_med_ms": ms(statistics.median(adv)),
            "masks_for4_med_ms": ms(statistics.median(mf)), "masks_for4_p90_ms": ms(pct(mf, 0.9)),
            "rollback8_med_ms": ms(statistics.median(rb)),
        }  # fmt: skip
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    for name in ("ref", "smollm2"):
        tok = load_tokenizer(name)
        vocab = len(tok)
        t0 = time.perf_counter()
        compile_constraint("regex", "a", tok, vocab)  # the cached tokenizer adaptation
        adapt = time.perf_counter() - t0
        reps = [one(tok, vocab) for _ in range(a.reps)]
        res = {"tokenizer": name, "vocab": vocab, "first_compile_ms": ms(adapt)}
        for case in reps[0]:
            res[case] = {k: statistics.median(r[case][k] for r in reps) for k in reps[0][case]}
        print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
