#!/bin/bash
# Issue 29 item 4: liger-kernel against lmtune's own code. The loss alone (lmtune's chunked loss vs liger's fused
# linear cross-entropy, 0.5B and 8B output layers), then whole training on the Qwen2.5-0.5B geometry (1,024-token
# packed rows, batch 8): eager, train.compile, and eager with liger's RoPE/RMSNorm/SwiGLU. Bundle: whl liger smoltok tree.
WHEELS="${BUNDLE:-$PWD/.carry}/whl/*.whl ${BUNDLE:-$PWD/.carry}/liger/*.whl"; source "$(dirname "$0")/common.sh"
python3 benchmarks/lm_loss_micro.py --liger 2>&1 | tee "$OUT/liger_loss_05b.txt"
python3 benchmarks/lm_loss_micro.py --tokens 4096 --hidden 4096 --vocab 128256 --chunks 512 2048 4096 --liger 2>&1 | tee "$OUT/liger_loss_8b.txt"
A="--tokenizer $B/smoltok --tokens 1000000 --no-baseline --allow-oom"
python3 benchmarks/decoder_throughput.py $A --work-dir /tmp/h1 --out "$OUT/liger_eager.json" --variant eager=method.name=full \
  --variant compile=method.name=full,train.compile=true --variant lora=method.name=lora 2>&1 | tee "$OUT/liger_eager.txt"
LIGER=1 python3 benchmarks/decoder_throughput.py $A --work-dir /tmp/h2 --out "$OUT/liger_liger.json" \
  --variant liger=method.name=full --variant liger_lora=method.name=lora 2>&1 | tee "$OUT/liger_liger.txt"
grep -h "liger\|parameters train\|Traceback\|Error" /tmp/h1/*.log /tmp/h2/*.log | head -30
