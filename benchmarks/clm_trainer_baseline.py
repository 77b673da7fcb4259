"""Plain Hugging Face Trainer continuing a causal LM's pre-training on raw text, written the way transformers'
examples/pytorch/language-modeling/run_clm.py does it: the baseline of benchmarks/decoder_throughput.py.

    python benchmarks/clm_trainer_baseline.py --model /path/to/decoder --train docs.txt --out base.json

Needs only torch, transformers, accelerate and datasets (no lmtune). As run_clm.py: every line of the text file
is tokenized, the token lists are concatenated and cut into blocks of --block-size (the remainder dropped; tokens
attend across document boundaries inside a block, as there), labels are the inputs; the model's own loss; AdamW
(the Trainer's default, fused), linear decay, no warmup, no weight decay, bf16 on a GPU that has it, nothing saved
during training. Reports real tokens per second (every block token is real), peak GPU memory and the loss.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from itertools import chain
from pathlib import Path

import torch
from datasets import Dataset
from transformers import (AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments,
                          default_data_collator, set_seed)


class LogClock(TrainerCallback):
    """When each log happened: the median tokens/s between logs after the first quarter of the run, as
    benchmarks/decoder_throughput.py measures lmtune's (set-up, recompilations and other stalls left out)."""

    def __init__(self) -> None:
        self.marks: list[tuple[int, float]] = []

    def on_log(self, args, state, control, **kwargs) -> None:
        self.marks.append((state.global_step, time.perf_counter()))

    def settled(self, tokens_per_step: int) -> float | None:
        marks = [m for m in self.marks[:-1]]  # the last log is the end-of-training summary
        if len(marks) < 4:
            return None
        marks = marks[len(marks) // 4:]
        rates = [(s1 - s0) / (t1 - t0) for (s0, t0), (s1, t1) in zip(marks, marks[1:]) if t1 > t0]
        return round(statistics.median(rates) * tokens_per_step, 1) if rates else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="local model folder (with its tokenizer)")
    parser.add_argument("--train", required=True, help="text file, one document per line")
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--epochs", type=float, default=1)
    parser.add_argument("--max-steps", type=int, default=-1, help="smoke tests: stop after this many steps")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    set_seed(args.seed)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)  # fp32 master weights, bf16 autocast
    lines = [line for line in Path(args.train).read_text(encoding="utf-8").splitlines() if line.strip()]
    tokenized = Dataset.from_dict({"text": lines}).map(lambda b: tokenizer(b["text"]), batched=True,
                                                       remove_columns=["text"])

    def group_texts(examples: dict) -> dict:  # run_clm.py's
        concatenated = {k: list(chain(*examples[k])) for k in examples}
        total = (len(concatenated["input_ids"]) // args.block_size) * args.block_size
        result = {k: [t[i:i + args.block_size] for i in range(0, total, args.block_size)]
                  for k, t in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    blocks = tokenized.map(group_texts, batched=True, batch_size=1000)
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    training_args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="clm-trainer-"), learning_rate=args.lr,
        per_device_train_batch_size=args.batch_size, num_train_epochs=args.epochs, max_steps=args.max_steps,
        seed=args.seed, bf16=bf16, report_to="none", logging_steps=10, save_strategy="no",
        gradient_checkpointing=args.gradient_checkpointing)
    clock = LogClock()
    trainer = Trainer(model=model, args=training_args, train_dataset=blocks, processing_class=tokenizer,
                      data_collator=default_data_collator, callbacks=[clock])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    train_result = trainer.train()
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    steps = train_result.global_step
    tokens = min(steps * args.batch_size, len(blocks) * max(1, round(args.epochs))) * args.block_size
    seconds = train_result.metrics["train_runtime"]
    results = {
        "system": "hf-trainer", "model": args.model, "bf16": bf16, "blocks": len(blocks), "steps": steps,
        "train_seconds": round(seconds, 2), "real_tokens_per_second": round(tokens / seconds, 1),
        "settled_tokens_per_second": clock.settled(args.batch_size * args.block_size),
        "last_logged_loss": losses[-1] if losses else None, "peak_memory_mb": peak,
        "wall_seconds": round(time.perf_counter() - started, 2),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
    }
    print(json.dumps(results, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
