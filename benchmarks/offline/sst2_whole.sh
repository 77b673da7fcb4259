#!/bin/bash
# Issue 28: all of SST-2 at run_glue's settings, whole process, lmtune twice (the second on the tokenization cache)
# against the Trainer script; first, whether the host's packages carry bytecode. Bundle: whl minilm sst2 tree.
WHEELS="${BUNDLE:-$PWD/.carry}/whl/*.whl"; source "$(dirname "$0")/common.sh"
python3 - <<'P'
import importlib.util, os, pathlib
for name in ["torch", "transformers", "accelerate", "peft", "numpy"]:
    d = pathlib.Path(importlib.util.find_spec(name).origin).parent
    py = sum(1 for _ in d.rglob("*.py")); pyc = sum(1 for _ in d.rglob("*.pyc"))
    print(f"bytecode {name}: {py} .py, {pyc} .pyc, writable={os.access(d, os.W_OK)}")
P
for i in 1 2; do /usr/bin/time -f "import torch + transformers.modeling_utils: %e s" python3 -c "import torch, transformers.modeling_utils"; done
python3 benchmarks/sst2_compare.py --model "$B/minilm" --data-dir "$B/sst2" --lmtune-runs 2 --work-dir /tmp/s2 \
  --out "$OUT/sst2_whole.json" 2>&1 | tee "$OUT/sst2_whole.txt"
