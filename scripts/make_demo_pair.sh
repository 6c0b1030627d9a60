#!/usr/bin/env bash
# How the built-in demo pair in verispec/demo/ was made: a small Python code model trained from
# scratch on this machine's standard library (its q/r/s modules held out for validation and
# evaluation), and a one-layer draft on the same tokenizer, pre-trained briefly and then distilled
# from the target. CPU only; timings in verispec/demo/README.md.
#
#   bash scripts/make_demo_pair.sh [WORK_DIR]      # then copy WORK_DIR's two final/ folders into verispec/demo/
set -euo pipefail
work=${1:-demo-build}
mkdir -p "$work"

# 1. The verifier: tokenizer (byte-level BPE, 4096 tokens) and a 6-layer Llama, 5.5M parameters.
verispec train --stdlib --out "$work/target" --vocab-size 4096 --layers 6 --hidden 256 --heads 4 --kv-heads 2 \
  --context 1024 --steps 1600 --batch-size 8 --seq-len 512 --lr 2e-3 --checkpoint-every 200 --seed 0

# 2. The draft's starting point: one layer on the verifier's tokenizer, next-token training.
verispec train --stdlib --tokenizer "$work/target/final" --out "$work/draft" --layers 1 --hidden 256 --heads 4 \
  --kv-heads 2 --context 1024 --steps 400 --batch-size 8 --seq-len 512 --lr 3e-3 --checkpoint-every 100 --seed 1

# 3. The draft distilled from the verifier, on-policy (the verifier's greedy continuations of
#    standard-library windows, q/r/s modules left out); greedy agreement measured before and after
#    on 32 windows of the held-out q/r/s modules.
python - > "$work/eval-prompts.jsonl" <<'PY'
import json
from verispec.prompts import stdlib_windows
for w in stdlib_windows(32, seed=3, held_out=True):
    print(json.dumps({"id": w.id, "prompt": w.text}))
PY
verispec distill --target "$work/target/final" --draft "$work/draft/final" --stdlib-prompts 640 \
  --eval-prompts "$work/eval-prompts.jsonl" --steps 600 --batch-size 16 --lr 1e-3 --save-dtype float16 \
  --out "$work/distill"

rm -rf verispec/demo/verispec-demo-code verispec/demo/verispec-demo-code-draft
cp -r "$work/target/final" verispec/demo/verispec-demo-code
cp -r "$work/distill/final" verispec/demo/verispec-demo-code-draft
