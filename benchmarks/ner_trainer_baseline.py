"""Plain Hugging Face Trainer NER on CoNLL-2003, written the way transformers' examples/pytorch/token-classification/run_ner.py
does it: the baseline that lmtune's NER task is measured against (benchmarks/ner_compare.py runs both).

    python benchmarks/ner_trainer_baseline.py --model /path/to/minilm --data-dir ../shared/data/conll2003 --out base.json

Needs only torch, transformers, accelerate, datasets and seqeval (no lmtune). As in run_ner.py: words tokenized with
is_split_into_words and truncated to --max-length, the label on each word's first sub-token and -100 elsewhere,
DataCollatorForTokenClassification, Trainer with TrainingArguments (bf16 on a GPU that has it), seqeval (default
mode) on the first sub-tokens. run_ner.py's defaults: lr 5e-5, batch 8, 3 epochs, no warmup, no weight decay,
linear decay, seed 42. One addition, for the comparison: evaluate on eng.testa each epoch and keep the best epoch by
F1 (load_best_model_at_end), as lmtune selects on validation; --no-select turns it off. The files ship IOB1 tags; they
are converted to BIO (IOB2, what the Hub's conll2003 holds and run_ner.py trains on) before training.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score
from transformers import (AutoModelForTokenClassification, AutoTokenizer, DataCollatorForTokenClassification, Trainer,
                          TrainingArguments, set_seed)


def read_conll(path: Path) -> dict[str, list]:
    """Sentences of a CoNLL-2003 file (token first, NER tag last), IOB1 tags turned into BIO."""
    tokens, tags, sentences = [], [], {"tokens": [], "ner_tags": []}
    for line in list(path.read_text(encoding="utf-8").splitlines()) + [""]:
        columns = line.split()
        if not columns or columns[0] == "-DOCSTART-":
            if tokens:
                sentences["tokens"].append(tokens)
                sentences["ner_tags"].append(iob1_to_bio(tags))
            tokens, tags = [], []
            continue
        tokens.append(columns[0])
        tags.append(columns[-1])
    return sentences


def iob1_to_bio(tags: list[str]) -> list[str]:
    out = []
    for i, tag in enumerate(tags):
        previous = out[i - 1] if i else "O"
        if tag.startswith("I-") and (previous == "O" or previous[2:] != tag[2:]):
            tag = "B-" + tag[2:]
        out.append(tag)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="local model folder")
    parser.add_argument("--data-dir", required=True, help="folder with eng.train, eng.testa, eng.testb")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--max-steps", type=int, default=-1, help="smoke tests: stop after this many steps")
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--max-eval-samples", type=int, default=None)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--no-select", action="store_true", help="keep the last epoch, as run_ner.py does")
    parser.add_argument("--output-dir", default=None, help="Trainer checkpoints (default: a temporary folder)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    set_seed(args.seed)
    started = time.perf_counter()

    data = Path(args.data_dir)
    raw = {name: Dataset.from_dict(read_conll(data / f"eng.{name}")) for name in ("train", "testa", "testb")}
    if args.max_train_samples:
        raw["train"] = raw["train"].select(range(min(args.max_train_samples, len(raw["train"]))))
    if args.max_eval_samples:
        for name in ("testa", "testb"):
            raw[name] = raw[name].select(range(min(args.max_eval_samples, len(raw[name]))))
    label_list = sorted({tag for tags in raw["train"]["ner_tags"] for tag in tags})  # run_ner.py: get_label_list
    label_to_id = {label: i for i, label in enumerate(label_list)}

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForTokenClassification.from_pretrained(
        args.model, num_labels=len(label_list), id2label=dict(enumerate(label_list)), label2id=label_to_id,
        dtype=torch.float32)  # the carried copy is fp16: train fp32 master weights under bf16 autocast

    def tokenize_and_align_labels(examples: dict) -> dict:
        tokenized_inputs = tokenizer(examples["tokens"], truncation=True, max_length=args.max_length,
                                     is_split_into_words=True)
        labels = []
        for i, label in enumerate(examples["ner_tags"]):
            word_ids = tokenized_inputs.word_ids(batch_index=i)
            previous_word_idx = None
            label_ids = []
            for word_idx in word_ids:
                if word_idx is None:
                    label_ids.append(-100)
                elif word_idx != previous_word_idx:
                    label_ids.append(label_to_id[label[word_idx]])
                else:
                    label_ids.append(-100)
                previous_word_idx = word_idx
            labels.append(label_ids)
        tokenized_inputs["labels"] = labels
        return tokenized_inputs

    features = {name: ds.map(tokenize_and_align_labels, batched=True, remove_columns=ds.column_names)
                for name, ds in raw.items()}
    # Words cut off by truncation are not scored at all here (run_ner.py's behaviour): count them.
    dropped = {name: sum(len(t) for t in raw[name]["tokens"]) - sum(sum(x != -100 for x in labels)
                                                                   for labels in features[name]["labels"])
               for name in raw}

    def compute_metrics(p) -> dict[str, float]:
        predictions, labels = p
        predictions = np.argmax(predictions, axis=2)
        true_predictions = [[label_list[p] for (p, l) in zip(prediction, label) if l != -100]
                            for prediction, label in zip(predictions, labels)]
        true_labels = [[label_list[l] for (p, l) in zip(prediction, label) if l != -100]
                       for prediction, label in zip(predictions, labels)]
        return {"precision": precision_score(true_labels, true_predictions),
                "recall": recall_score(true_labels, true_predictions),
                "f1": f1_score(true_labels, true_predictions),
                "accuracy": accuracy_score(true_labels, true_predictions)}

    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    select = not args.no_select
    output_dir = args.output_dir or tempfile.mkdtemp(prefix="ner-trainer-")
    training_args = TrainingArguments(
        output_dir=output_dir, learning_rate=args.lr, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, num_train_epochs=args.epochs, max_steps=args.max_steps,
        seed=args.seed, bf16=bf16, report_to="none", logging_steps=100,
        eval_strategy="epoch" if select else "no", save_strategy="epoch" if select else "no",
        load_best_model_at_end=select, metric_for_best_model="f1" if select else None, save_total_limit=1 if select
        else None, save_only_model=True)
    trainer = Trainer(model=model, args=training_args, train_dataset=features["train"],
                      eval_dataset=features["testa"] if select else None, processing_class=tokenizer,
                      data_collator=DataCollatorForTokenClassification(tokenizer, pad_to_multiple_of=8 if bf16 else None),
                      compute_metrics=compute_metrics)
    train_result = trainer.train()
    validation = trainer.evaluate(features["testa"], metric_key_prefix="validation")
    test = trainer.evaluate(features["testb"], metric_key_prefix="test")
    results = {
        "system": "hf-trainer", "model": args.model, "bf16": bf16,
        "test": {k.removeprefix("test_"): v for k, v in test.items()},
        "validation": {k.removeprefix("validation_"): v for k, v in validation.items()},
        "train_seconds": round(train_result.metrics["train_runtime"], 2),
        "train_samples_per_second": train_result.metrics.get("train_samples_per_second"),
        "steps": train_result.global_step, "wall_seconds": round(time.perf_counter() - started, 2),
        "words_not_scored_after_truncation": dropped,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "output_dir")},
    }
    print(json.dumps(results, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
