#!/bin/bash
# Prepare .carry/ (git-ignored) for benchmarks on an offline GPU host: see README.md beside this file.
# Needs this checkout's .venv (make install) and, for the SST-2 copy, ../shared/data.
set -euo pipefail
cd "$(dirname "$0")/../.."
B=${BUNDLE:-.carry}
grep -qx "/$B/" .git/info/exclude 2>/dev/null || echo "/$B/" >> .git/info/exclude
mkdir -p "$B"/{whl,bnb,liger}
P="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
   --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
   --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
python3 -m pip download -q $P -d "$B/whl" datasets dill multiprocess pydantic pydantic-core annotated-types \
  typing-inspection typing_extensions optuna alembic sqlalchemy colorlog mako greenlet gguf fastapi starlette uvicorn
python3 -m pip wheel -q --no-deps -w "$B/whl" seqeval
python3 -m pip download -q $P -d "$B/bnb" bitsandbytes
python3 -m pip download -q $P -d "$B/liger" liger-kernel==0.8.5
export HF_HUB_OFFLINE=1
.venv/bin/python - "$B" <<'P'
import shutil, sys
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

from lmtune.models import resolve_model

out = Path(sys.argv[1])
smol = resolve_model("smollm2-135m")  # the built-in decoder's tokenizer, for the synthetic-geometry benchmarks
(out / "smoltok").mkdir(exist_ok=True)
for f in smol.iterdir():
    if f.suffix != ".safetensors":
        shutil.copy(f, out / "smoltok" / f.name)
minilm = resolve_model("minilm-l6")  # an fp16 copy (~45 MB), loaded as fp32 under bf16 autocast by the runs
AutoModel.from_pretrained(minilm, dtype=torch.float16).save_pretrained(out / "minilm")
AutoTokenizer.from_pretrained(minilm).save_pretrained(out / "minilm")
P
if [ -d ../shared/data/sst2 ]; then mkdir -p "$B/sst2" && cp ../shared/data/sst2/{dev.tsv,train.tsv.gz} "$B/sst2/"; fi
rm -rf "$B/tree" && mkdir -p "$B/tree" && git archive HEAD src benchmarks examples | tar -x -C "$B/tree"
du -sh "$B"/*
