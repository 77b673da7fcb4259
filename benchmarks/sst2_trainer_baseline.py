"""Plain Hugging Face Trainer on SST-2, written the way transformers' examples/pytorch/text-classification/run_glue.py
does it: the baseline that lmtune's classification is measured against (benchmarks/sst2_compare.py runs both).

    python benchmarks/sst2_trainer_baseline.py --model /path/to/minilm --data-dir ../shared/data/sst2 --out base.json

Needs only torch, transformers, accelerate and datasets (no lmtune). As run_glue.py with its defaults: sentences
tokenized and padded to --max-length (128; `pad_to_max_length` is on by default there), every training row, lr 2e-5,
batch 32, 3 epochs, no warmup, no weight decay, linear decay, seed 42, no evaluation during training, accuracy on
GLUE's dev set at the end. bf16 on a GPU that has it. `--dynamic-padding` pads each batch to its longest row
instead (DataCollatorWithPadding, multiple of 8): the "Trainer given dynamic padding" of issue 7.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                          TrainingArguments, default_data_collator, set_seed)


def read_tsv(path: Path) -> dict[str, list]:
    """GLUE's SST-2 TSV (sentence<TAB>label, with a header), optionally gzipped."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return {"sentence": [r["sentence"] for r in rows], "label": [int(r["label"]) for r in rows]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="local model folder")
    parser.add_argument("--data-dir", required=True, help="folder with train.tsv.gz (or train.tsv) and dev.tsv")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--dynamic-padding", action="store_true", help="pad per batch instead of to --max-length")
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--max-steps", type=int, default=-1, help="smoke tests: stop after this many steps")
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    set_seed(args.seed)
    started = time.perf_counter()

    data = Path(args.data_dir)
    train_file = data / "train.tsv.gz" if (data / "train.tsv.gz").exists() else data / "train.tsv"
    raw = {"train": Dataset.from_dict(read_tsv(train_file)), "dev": Dataset.from_dict(read_tsv(data / "dev.tsv"))}
    if args.max_train_samples:
        raw["train"] = raw["train"].select(range(min(args.max_train_samples, len(raw["train"]))))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model, num_labels=2, dtype=torch.float32)  # the carried copy is fp16: fp32 master weights, bf16 autocast
    padding = False if args.dynamic_padding else "max_length"

    def preprocess(examples: dict) -> dict:
        return tokenizer(examples["sentence"], padding=padding, max_length=args.max_length, truncation=True)

    features = {name: ds.map(preprocess, batched=True, remove_columns=["sentence"]) for name, ds in raw.items()}
    real_tokens = int(sum(sum(mask) for mask in features["train"]["attention_mask"]))

    def compute_metrics(p) -> dict[str, float]:
        return {"accuracy": float((np.argmax(p.predictions, axis=1) == p.label_ids).mean())}

    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8) if args.dynamic_padding else default_data_collator
    training_args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="sst2-trainer-"), learning_rate=args.lr,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
        num_train_epochs=args.epochs, max_steps=args.max_steps, seed=args.seed, bf16=bf16, report_to="none",
        logging_steps=500, eval_strategy="no", save_strategy="no")
    trainer = Trainer(model=model, args=training_args, train_dataset=features["train"], processing_class=tokenizer,
                      data_collator=collator, compute_metrics=compute_metrics)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    train_result = trainer.train()
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    dev = trainer.evaluate(features["dev"], metric_key_prefix="test")
    results = {
        "system": "hf-trainer" + (" (dynamic padding)" if args.dynamic_padding else ""), "model": args.model,
        "bf16": bf16, "test": {k.removeprefix("test_"): v for k, v in dev.items()},
        "train_seconds": round(train_result.metrics["train_runtime"], 2), "steps": train_result.global_step,
        "train_rows": len(features["train"]), "real_tokens_per_epoch": real_tokens,
        "wall_seconds": round(time.perf_counter() - started, 2), "peak_memory_mb": peak,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
    }
    print(json.dumps(results, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
