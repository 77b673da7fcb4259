#!/bin/bash
# Issue 29 item 4 (optional rows): Qwen2.5-1.5B and 3B geometries, full / LoRA / QLoRA at 2,048 tokens, batch 2,
# gradient checkpointing, each process capped at 79 GB. Bundle: whl bnb smoltok tree.
WHEELS="${BUNDLE:-$PWD/.carry}/whl/*.whl ${BUNDLE:-$PWD/.carry}/bnb/*.whl"; source "$(dirname "$0")/common.sh"
export CAP_GPU_GB=79
C="train.gradient_checkpointing=true"
for g in qwen2.5-1.5b qwen2.5-3b; do
  python3 benchmarks/decoder_throughput.py --tokenizer "$B/smoltok" --geometry $g --block-size 2048 --batch-size 2 \
    --tokens 150000 --no-baseline --allow-oom --weights-dtype bfloat16 --work-dir /tmp/i-$g --out "$OUT/sizes-$g.json" \
    --variant full=method.name=full,$C --variant lora=method.name=lora,$C \
    --variant qlora=method.name=lora,method.quantize=4bit,$C 2>&1 | tee "$OUT/sizes-$g.txt"
  rm -rf /tmp/i-$g/model
done
