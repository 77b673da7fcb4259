#!/bin/bash
# Issue 29 item 3: QLoRA against bf16 LoRA on the Llama-3-8B geometry (2,048-token packed rows, batch 2, gradient
# checkpointing), with the default 2,048-token loss chunks and with task.loss_chunk=512. Bundle: whl bnb smoltok tree.
WHEELS="${BUNDLE:-$PWD/.carry}/whl/*.whl ${BUNDLE:-$PWD/.carry}/bnb/*.whl"; source "$(dirname "$0")/common.sh"
export CAP_GPU_GB=79
G="method.name=lora,train.gradient_checkpointing=true"
python3 benchmarks/decoder_throughput.py --tokenizer "$B/smoltok" --geometry llama-3-8b --block-size 2048 --batch-size 2 \
  --tokens 120000 --no-baseline --allow-oom --weights-dtype bfloat16 --work-dir /tmp/g8 --out "$OUT/qlora_8b.json" \
  --variant lora=$G --variant qlora=$G,method.quantize=4bit \
  --variant lora512=$G,task.loss_chunk=512 --variant qlora512=$G,method.quantize=4bit,task.loss_chunk=512 2>&1 | tee "$OUT/qlora_8b.txt"
grep -h "parameters train" /tmp/g8/*.log
