"""Plain Hugging Face Trainer on STS-B, written the way transformers' examples/pytorch/text-classification/run_glue.py
does it (a regression head: num_labels=1, MSE), and the untuned model's cosine similarity of mean-pooled embeddings.
The baselines that lmtune's regression (examples/stsb.yaml) is measured against.

    python benchmarks/stsb_trainer_baseline.py --model /path/to/minilm --data-dir ../shared/data/stsb [--out base.json]

Needs only torch, transformers and datasets (no lmtune). As run_glue.py with its defaults: pairs tokenized and padded
to --max-length (128), lr 2e-5, batch 32, 3 epochs, no warmup, no weight decay, linear decay, seed 42, no evaluation
during training, Pearson and Spearman on dev.tsv and test.tsv at the end. bf16 on a GPU that has it. The STS-B files
hold double quotes that are plain characters: read with csv.QUOTE_NONE.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from transformers import (AutoModel, AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments,
                          default_data_collator, set_seed)


def read_tsv(path: Path) -> dict[str, list]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return {"sentence1": [r["sentence1"] for r in rows], "sentence2": [r["sentence2"] for r in rows],
            "label": [float(r["score"]) for r in rows]}


def correlations(pred: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """Pearson's r, and Spearman's rho as Pearson's r of the ranks (ties at their average rank)."""
    def ranks(x: np.ndarray) -> np.ndarray:
        _, position, counts = np.unique(x, return_inverse=True, return_counts=True)
        return (np.cumsum(counts) - (counts - 1) / 2.0)[position]

    pred, gold = np.asarray(pred, dtype=np.float64), np.asarray(gold, dtype=np.float64)
    return {"pearson": float(np.corrcoef(pred, gold)[0, 1]), "spearman": float(np.corrcoef(ranks(pred), ranks(gold))[0, 1])}


@torch.no_grad()
def cosine_baseline(model_dir: str, raw: dict[str, Dataset], max_length: int) -> dict[str, dict[str, float]]:
    """The untuned checkpoint as a sentence encoder: cosine similarity of the two mean-pooled embeddings."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    encoder = AutoModel.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()

    def embed(texts: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), 128):
            enc = tokenizer(texts[i:i + 128], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt").to(device)
            hidden = encoder(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.append(((hidden * mask).sum(1) / mask.sum(1)).cpu())
        return torch.cat(out)

    return {name: correlations(torch.nn.functional.cosine_similarity(embed(ds["sentence1"]), embed(ds["sentence2"])
                                                                   ).numpy(), np.asarray(ds["label"]))
            for name, ds in raw.items() if name != "train"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="local model folder")
    parser.add_argument("--data-dir", required=True, help="folder with train.tsv, dev.tsv and test.tsv")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--max-steps", type=int, default=-1, help="smoke tests: stop after this many steps")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--cosine-only", action="store_true", help="the untuned model's cosine similarity alone")
    args = parser.parse_args()
    set_seed(args.seed)
    data = Path(args.data_dir)
    raw = {name: Dataset.from_dict(read_tsv(data / f"{name}.tsv")) for name in ("train", "dev", "test")}
    results: dict = {"untuned_cosine": cosine_baseline(args.model, raw, args.max_length)}
    if args.cosine_only:
        print(json.dumps(results))
        return
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=1, dtype=torch.float32)

    def preprocess(examples: dict) -> dict:
        return tokenizer(examples["sentence1"], examples["sentence2"], padding="max_length", max_length=args.max_length,
                         truncation=True)

    features = {name: ds.map(preprocess, batched=True, remove_columns=["sentence1", "sentence2"])
                for name, ds in raw.items()}
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    training_args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="stsb-trainer-"), learning_rate=args.lr,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
        num_train_epochs=args.epochs, max_steps=args.max_steps, seed=args.seed, bf16=bf16, report_to="none",
        logging_steps=100, eval_strategy="no", save_strategy="no")
    trainer = Trainer(model=model, args=training_args, train_dataset=features["train"],
                      data_collator=default_data_collator)
    trainer.train()
    results["train_seconds"] = round(time.perf_counter() - started, 1)
    for name in ("dev", "test"):
        pred = trainer.predict(features[name]).predictions.reshape(-1)
        results[name] = correlations(pred, np.asarray(raw[name]["label"]))
    print(json.dumps(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
